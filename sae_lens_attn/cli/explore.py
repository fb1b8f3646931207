"""``sae-lens-attn explore``: the prompt explorer, served locally or exported as static pages."""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path
from typing import Any

from sae_lens_attn.cli.arguments import UsageError, count, key_value
from sae_lens_attn.cli.inputs import load_model, load_sae, load_tokens

DEFAULT_RELEASE = "stdlib-2l-attn-z"
"""The SAEs explored with the default model when neither ``--release`` nor ``--sae`` is given."""
LABEL_CONTEXT_SIZE = 128
"""Tokens per label context (or the model's context, if shorter)."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "explore",
        help="explore prompts in a local web page: tokens, top features, DFA by source and head",
        description="Serve the prompt explorer on this machine: type a prompt, see its tokens and "
        "each loaded layer's top features per token; click a feature for its direct feature "
        "attribution (DFA) over source tokens and heads, its logit effects, family label and "
        "dashboard page. Behind the page is a JSON API (POST /api/run, POST /api/feature; "
        "schema at /api/openapi.json). With --export, write the same views for --prompts as "
        "pages that open from disk instead. Needs the explore extra.",
    )
    parser.add_argument(
        "--model", default="default", help="'default', 'tl:NAME' or 'hf:PATH' (default: default)"
    )
    saes = parser.add_mutually_exclusive_group()
    saes.add_argument(
        "--release", help=f"a release's SAEs (default with the default model: {DEFAULT_RELEASE})"
    )
    saes.add_argument("--sae", nargs="+", metavar="SAE", help="SAE folders or RELEASE:ID")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to serve on (default: 127.0.0.1, local)"
    )
    parser.add_argument(
        "--port", type=count(minimum=0), default=0, help="port (default: a free port)"
    )
    parser.add_argument("--top", type=count(), default=10, help="features listed per token")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--text", help="text file for family labels, cut into contexts")
    labels.add_argument("--tokens", help="a .pt file of [contexts, ctx] token ids for labels")
    parser.add_argument(
        "--family-contexts",
        type=count(minimum=0),
        default=32,
        help="contexts for family labels (default: 32; with the default model, held-out "
        "standard-library files unless --text or --tokens; 0: no family labels)",
    )
    parser.add_argument(
        "--dashboards",
        type=key_value,
        action="append",
        metavar="LAYER=DIR",
        help="a folder of `sae-lens-attn dashboard` pages for a layer's SAE (repeatable)",
    )
    parser.add_argument(
        "--max-body-bytes", type=count(), default=64 * 1024, help="largest request body accepted"
    )
    parser.add_argument("--export", metavar="DIR", help="write static pages here instead")
    parser.add_argument("--prompts", help="with --export: a .json list or one prompt per line")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --export an earlier export wrote"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.export is None) != (args.prompts is None):
        raise UsageError("--export DIR and --prompts FILE go together: give both or neither")
    specs = _sae_specs(args)
    explorer = _explorer_package()
    prompts = explorer.read_prompts(args.prompts) if args.prompts else None
    sock = None
    if args.export is None:
        if not explorer.is_loopback(args.host):
            print(
                f"warning: serving on {args.host}: anyone who can reach this machine there can "
                "run prompts through the model; the default --host 127.0.0.1 keeps it local",
                file=sys.stderr,
            )
        sock = explorer.bind(args.host, args.port)  # a port in use fails before loading
    model, tokenizer = load_model(args.model)
    session = explorer.ExplorerSession(
        model,
        [load_sae(spec) for spec in specs],
        tokenizer=tokenizer,
        top_k=args.top,
        family_tokens=_label_contexts(args, model, tokenizer),
        dashboards=_dashboards(args.dashboards or []),
        max_body_bytes=args.max_body_bytes,
    )
    if prompts is not None:
        export = explorer.export_prompts(session, prompts, args.export, overwrite=args.overwrite)
        print(f"wrote {len(export.pages)} prompt pages to {export.out_dir}")
        print(f"  open {export.index.resolve().as_uri()}")
        return 0
    assert sock is not None
    hosts = None if explorer.is_loopback(args.host) else ["*"]
    app = explorer.create_app(session, allowed_hosts=hosts)
    print(f"prompt explorer: {explorer.url_of(sock)}/  (Ctrl-C stops it)", flush=True)
    explorer.serve(app, sock)
    return 0


def _explorer_package() -> Any:
    try:
        import sae_lens_attn.explorer as explorer
    except ModuleNotFoundError as err:
        raise ValueError(
            f"sae-lens-attn explore needs the explore extra (FastAPI and uvicorn; {err.name} is "
            "missing): pip install 'sae-lens-attn[explore]'"
        ) from None
    return explorer


def _sae_specs(args: argparse.Namespace) -> list[str]:
    from sae_lens_attn.cli.evaluate import release_specs

    if args.sae:
        return list(args.sae)
    if args.release is None and args.model != "default":
        raise UsageError(f"--model {args.model} needs its SAEs: give --release or --sae")
    return release_specs(args.release or DEFAULT_RELEASE)


def _dashboards(pairs: list[tuple[str, str]]) -> dict[int, Path]:
    folders = {}
    for layer, folder in pairs:
        if not layer.isdigit():
            raise UsageError(f"--dashboards expects LAYER=DIR with an integer layer, got {layer!r}")
        folders[int(layer)] = Path(folder)
    return folders


def _label_contexts(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """Contexts for family labels: ``--text``/``--tokens``, the default model's held-out
    standard-library files, or ``None`` (no labels)."""
    from sae_lens_attn.validation import context_limit

    if args.family_contexts == 0:
        return None
    size = min(LABEL_CONTEXT_SIZE, context_limit(model) or LABEL_CONTEXT_SIZE)
    if args.text or args.tokens:
        return load_tokens(
            text=args.text, tokens=args.tokens, tokenizer=tokenizer, context_size=size,
            max_prompts=args.family_contexts,
        )  # fmt: skip
    if args.model != "default":
        print("note: no family labels without --text or --tokens", file=sys.stderr)
        return None
    return held_out_contexts(tokenizer, args.family_contexts, size)


def held_out_contexts(tokenizer: Any, n_contexts: int, context_size: int) -> Any:
    """``[n, context_size]`` BOS-led contexts from the default model's held-out files (the
    Python standard library's files it was not trained on), in a fixed order; ``None`` when
    there are none."""
    from sae_lens_attn.default_model import corpus
    from sae_lens_attn.store import TokenBatches

    held_out = corpus.split_corpus(Path(sysconfig.get_paths()["stdlib"])).held_out
    texts: list[str] = []
    for path in sorted(held_out):
        texts.extend(corpus.read_texts([path]))
        if sum(len(t) for t in texts) >= 4 * n_contexts * context_size:  # ~4 characters a token
            break
    if not texts:
        return None
    batches = TokenBatches.from_texts(tokenizer, texts, context_size=context_size, batch_size=1)
    return batches.tokens[:n_contexts]
