"""``sae-lens-attn train``: attention SAEs for chosen layers of a model, all from one model pass.

Text comes from a file, a folder of text files, a ``.pt`` token file or a Hugging Face dataset
saved with ``save_to_disk``; each SAE is written to ``OUT/blocks.L.attn.hook_z``, the folder that
``evaluate --sae``, ``dashboard``, ``explore`` and ``publish`` take.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import torch

from sae_lens_attn.cli.arguments import UsageError, count, integers
from sae_lens_attn.cli.inputs import load_model
from sae_lens_attn.config.sae_configs import AttnArchitecture
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.validation import context_limit, special_token_ids

HF_BACKENDS = ("nnsight", "hooked")
"""How a Hugging Face model (``--model hf:DIR``) is driven: nnsight directly, or behind
``sla.hooked``'s TransformerLens-style hook points."""
DEFAULT_CONTEXT_SIZE = 128
"""Tokens per context when neither ``--context-size`` nor a smaller model limit says otherwise."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "train",
        help="train attention SAEs for chosen layers from text, tokens or a dataset on disk",
        description="Train one attention SAE per layer from a single activation stream (one "
        "model pass serves every layer) and write each to OUT/blocks.L.attn.hook_z. With "
        "--checkpoints N the run saves N checkpoints under OUT/checkpoints; --resume continues "
        "from the latest.",
    )
    parser.add_argument("--model", default="default", help="'default', 'hf:DIR' or 'tl:NAME'")
    parser.add_argument(
        "--hf-backend", choices=HF_BACKENDS, default="nnsight",
        help="for hf: models, run them through nnsight or sla.hooked (default: nnsight)",
    )  # fmt: skip
    parser.add_argument(
        "--layers", type=integers, help="comma-separated layers, e.g. 0,1 (default: all)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a text file, or a folder of text files (see --glob)")
    source.add_argument("--tokens", help="a .pt file holding [contexts, ctx] token ids")
    source.add_argument("--dataset", help="a Hugging Face dataset folder (save_to_disk)")
    parser.add_argument("--glob", default="**/*.txt", help="files of a --text folder")
    parser.add_argument("--text-column", default="text", help="--dataset column of the texts")
    parser.add_argument("--out", required=True, help="folder for the SAEs (and checkpoints)")
    parser.add_argument(
        "--architecture", choices=get_args(AttnArchitecture), default="topk",
        help="SAE architecture (default: topk)",
    )  # fmt: skip
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--d-sae", type=count(), help="features per SAE")
    width.add_argument(
        "--expansion-factor", type=count(), default=8, help="features per SAE / d_in (default: 8)"
    )
    parser.add_argument("--k", type=count(), default=32, help="active features (topk, batchtopk)")
    parser.add_argument(
        "--l1-coefficient", type=float, default=1.0, help="sparsity coefficient (standard)"
    )
    parser.add_argument("--training-tokens", type=count(), required=True, help="tokens to train")
    parser.add_argument("--batch-size-tokens", type=count(), default=4096, help="tokens per step")
    parser.add_argument(
        "--buffer-size-tokens", type=count(), default=65536, help="tokens shuffled together"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate")
    parser.add_argument(
        "--context-size", type=count(), help="tokens per context (default: 128 or the model's)"
    )
    parser.add_argument("--batch-size", type=count(), default=8, help="contexts per model pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and shuffling")
    parser.add_argument(
        "--checkpoints", type=count(0), default=0, help="checkpoints to save during the run"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace SAEs an earlier train wrote"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_lens_attn.backends import backend_for
    from sae_lens_attn.training.train import train_attn_saes

    if args.hf_backend != "nnsight" and not args.model.startswith("hf:"):
        raise UsageError(f"--hf-backend {args.hf_backend} is for hf: models, not {args.model!r}")
    model, tokenizer = load_model(args.model)
    if args.hf_backend == "hooked":
        from sae_lens_attn.backends.hooked import hooked

        model = hooked(model, tokenizer)
    n_layers = backend_for(model).n_layers
    layers = list(range(n_layers)) if args.layers is None else args.layers
    outside = [layer for layer in layers if layer >= n_layers]
    if outside:
        raise ValueError(
            f"--layers {outside} are outside the model's layers 0..{n_layers - 1}; "
            f"valid: {list(range(n_layers))}"
        )
    context_size = _context_size(model, args.context_size)
    batches = _token_batches(args, tokenizer, context_size)
    d_in = backend_for(model).site(layers[0]).d_in
    sae_kwargs: dict[str, Any] = {"d_sae": args.d_sae or args.expansion_factor * d_in}
    if args.architecture in ("topk", "batchtopk"):
        sae_kwargs["k"] = args.k
    if args.architecture in ("standard", "jumprelu"):
        sae_kwargs["l1_coefficient"] = args.l1_coefficient
    saved = train_attn_saes(
        model,
        layers,
        batches,
        training_tokens=args.training_tokens,
        out_dir=args.out,
        architecture=args.architecture,
        model_name=_model_name(args.model),
        train_batch_size_tokens=args.batch_size_tokens,
        buffer_size_tokens=max(args.buffer_size_tokens, args.batch_size_tokens),
        lr=args.lr,
        exclude_special_tokens=special_token_ids(tokenizer) or None,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        n_checkpoints=args.checkpoints,
        resume=args.resume,
        **sae_kwargs,
    )
    for layer, folder in saved.items():
        print(f"layer {layer}: {folder}")
    return 0


def _context_size(model: Any, wanted: int | None) -> int:
    limit = context_limit(model)
    if wanted is None:
        return min(DEFAULT_CONTEXT_SIZE, limit or DEFAULT_CONTEXT_SIZE)
    if limit is not None and wanted > limit:
        raise ValueError(f"--context-size {wanted} exceeds the model's limit of {limit} positions")
    return wanted


def _model_name(spec: str) -> str:
    if spec == "default":
        from sae_lens_attn.default_model.model import MODEL_NAME

        return MODEL_NAME
    return spec.partition(":")[2]


def _token_batches(args: argparse.Namespace, tokenizer: Any, context_size: int) -> TokenBatches:
    if args.tokens is not None:
        loaded = torch.load(args.tokens, weights_only=True)
        if not isinstance(loaded, torch.Tensor) or loaded.ndim != 2 or loaded.numel() == 0:
            raise ValueError(
                f"{args.tokens} must hold a non-empty [contexts, ctx] tensor of token ids, got "
                + (f"shape {list(loaded.shape)}" if isinstance(loaded, torch.Tensor) else
                   type(loaded).__name__)
            )  # fmt: skip
        return TokenBatches(loaded.long(), args.batch_size)
    if tokenizer is None:
        raise ValueError("text needs the model's tokenizer, and this model has none; give --tokens")
    texts = _dataset_texts(args.dataset, args.text_column) if args.dataset else _texts(args)
    return TokenBatches.from_texts(
        tokenizer, texts, context_size=context_size, batch_size=args.batch_size,
        prepend_bos=tokenizer.bos_token_id is not None,
    )  # fmt: skip


def _texts(args: argparse.Namespace) -> list[str]:
    path = Path(args.text)
    if path.is_file():
        return [path.read_text(errors="replace")]
    if not path.is_dir():
        raise FileNotFoundError(f"--text {path}: no such file or folder")
    files = sorted(p for p in path.glob(args.glob) if p.is_file())
    if not files:
        raise FileNotFoundError(f"--text {path}: no files match --glob {args.glob!r}")
    return [p.read_text(errors="replace") for p in files]


def _dataset_texts(folder: str, column: str) -> Iterator[str]:
    import datasets

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--dataset {folder}: no such folder (save_to_disk writes one)")
    try:
        dataset = datasets.load_from_disk(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--dataset {folder} is not a dataset saved with save_to_disk: {err}"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"--dataset {folder} holds the splits {list(dataset)}; give one split's folder"
        )
    if column not in dataset.column_names:
        raise ValueError(
            f"--dataset {folder} has no column {column!r}; its columns: {dataset.column_names} "
            "(choose one with --text-column)"
        )
    return (str(text) for text in dataset[column])
