"""Saving and loading the default model: a HookedTransformer config, its weights and tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_attn.default_model.corpus import load_tokenizer, save_tokenizer

PACKAGE_DIR = Path(__file__).parent / "files"
"""Where the package ships the default model, its tokenizer, SAEs and metrics."""
MODEL_NAME = "stdlib-2l-attn"
"""``model_name`` of the default model (recorded in its config and its SAEs' metadata)."""
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE = (
    "model_config.json",
    "model.safetensors",
    "tokenizer.json",
    "metrics.json",
)
"""File names inside a default-model folder."""
CHECKSUMS_FILE = "checksums.json"
"""SHA-256 of every other file of a default-model folder, keyed by path relative to the folder."""
SAES_DIR = "saes"
"""Sub-folder of the SAEs, one SAELens-native folder per hook (``blocks.L.attn.hook_z``)."""
CONFIG_KEYS = (
    "model_name",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "n_ctx",
    "d_vocab",
    "act_fn",
    "attn_only",
    "normalization_type",
    "positional_embedding_type",
    "default_prepend_bos",
    "seed",
)
"""The ``HookedTransformerConfig`` fields a saved model records; the others keep their defaults."""


def save_default_model(model: HookedTransformer, tokenizer: Any, directory: str | Path) -> None:
    """Write ``model`` (config and safetensors weights) and ``tokenizer`` to ``directory``.

    The weights are the parameters; buffers (each attention's causal mask and ``IGNORE``) are
    rebuilt from the config when loading.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {key: getattr(model.cfg, key) for key in CONFIG_KEYS}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    save_file(state, str(directory / WEIGHTS_FILE))
    save_tokenizer(tokenizer, directory / TOKENIZER_FILE)


def load_default_model(
    directory: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> tuple[HookedTransformer, transformers.PreTrainedTokenizerFast]:
    """The embedded default model and its tokenizer, offline.

    An attention-only 2-layer ``HookedTransformer`` trained on the Python standard library's
    source, with a byte-level BPE tokenizer (``recipes/train_default_model.py``). Its attention
    SAEs are the release ``stdlib-2l-attn-z``.

    Args:
        directory: a folder written by the recipe; by default the one shipped in the package.
        device: where the model is put.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        FileNotFoundError: a file of the model is missing (the message names it).
        ValueError: a file is corrupted or truncated (the message names it).

    Examples:
        >>> model, tokenizer = sla.load_default_model()
        >>> logits = model(tokenizer("def f(x):\\n    return x", return_tensors="pt").input_ids)
    """
    directory = PACKAGE_DIR if directory is None else Path(directory)
    config = read_json(verified(directory, CONFIG_FILE))
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{directory / CONFIG_FILE}: lacks the config keys {missing}")
    tokenizer = load_tokenizer(verified(directory, TOKENIZER_FILE))
    cfg = HookedTransformerConfig(**{key: config[key] for key in CONFIG_KEYS})
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    weights_path = verified(directory, WEIGHTS_FILE)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(
            f"cannot read the model weights {str(weights_path)!r} (corrupted or truncated?): {err}"
        ) from None
    # The weights are the parameters. Buffers (each attention's causal ``mask`` and ``IGNORE``)
    # are rebuilt from the config: files written before this loader carry them, but their shapes
    # depend on the TransformerLens version (3.x keeps an empty mask), so they are not loaded.
    expected = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    wrong = sorted(
        k for k in expected if k not in state or state[k].shape != expected[k].shape
    ) + sorted(set(state) - set(expected) - buffers)
    if wrong:
        raise ValueError(
            f"the model weights {str(weights_path)!r} do not fit {directory / CONFIG_FILE}: "
            f"missing, extra or misshapen tensors {wrong}"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    if torch.device(device) != torch.device("cpu"):
        model.to(device)
    model.eval()
    return model, tokenizer


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; errors name the file."""
    try:
        value = json.loads(_existing(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not valid JSON (corrupted or truncated?): {err}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"default-model file {str(path)!r} is missing; run recipes/train_default_model.py "
            "to make it, or reinstall sae-lens-attn"
        )
    return path


def write_checksums(directory: str | Path) -> dict[str, str]:
    """Record the SHA-256 of every file under ``directory`` in its ``checksums.json``.

    Returns:
        relative path → hex digest.
    """
    directory = Path(directory)
    sums = {
        path.relative_to(directory).as_posix(): _sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    }
    (directory / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=2) + "\n", encoding="utf-8")
    return sums


def verified(directory: Path, relative: str) -> Path:
    """``directory / relative``, after checking it against the folder's ``checksums.json``.

    Raises:
        FileNotFoundError: the file or ``checksums.json`` is missing (named).
        ValueError: the file is not listed, or its content is not what was written (corrupted or
            truncated); the message names it.
    """
    path = _existing(directory / relative)
    sums = read_json(directory / CHECKSUMS_FILE)
    expected = sums.get(relative)
    if expected is None:
        raise ValueError(
            f"{str(path)!r} is not listed in {str(directory / CHECKSUMS_FILE)!r}; listed: "
            f"{sorted(sums)}"
        )
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(
            f"{str(path)!r} is corrupted or truncated: its SHA-256 is {actual}, but "
            f"{CHECKSUMS_FILE} records {expected} ({path.stat().st_size} bytes now)"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
