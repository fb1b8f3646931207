"""Checks of user input shared by the store, the analyzers, evaluation and the dashboards.

Each check raises ``ValueError`` (``TypeError`` for a wrong type) whose message names what was
expected, what was given and the valid choices; each lookup (tokenizer, special tokens, vocabulary,
context) is written once here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import as_integer


def tokenizer_of(model: Any) -> Any:
    """The tokenizer a model or backend carries, else ``None``."""
    backend = backend_for(model)
    for owner in (backend, backend.model):
        tokenizer = getattr(owner, "tokenizer", None)
        if tokenizer is not None:
            return tokenizer
    return None


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding, ...), as SAELens finds them."""
    if tokenizer is None:
        return []
    from sae_lens.util import get_special_token_ids

    return get_special_token_ids(tokenizer)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as text (``tokenizer.decode([id])``), or ``<id>`` without a tokenizer."""
    return [token_text(tokenizer, i) for i in ids]


def token_text(tokenizer: Any, token: int) -> str:
    """One token id as text (``tokenizer.decode([id])``), or ``<id>`` without a tokenizer: the
    one way this package shows a token."""
    return f"<{int(token)}>" if tokenizer is None else str(tokenizer.decode([int(token)]))


def _model_configs(model: Any) -> tuple[Any, Any]:
    inner = backend_for(model).model
    inner = getattr(inner, "_model", inner)  # an nnsight Envoy wraps the HF model
    return getattr(inner, "cfg", None), getattr(inner, "config", None)


def vocab_size(model: Any) -> int | None:
    """The model's vocabulary size (``cfg.d_vocab`` or ``config.vocab_size``), if it states one."""
    cfg, config = _model_configs(model)
    size = getattr(cfg, "d_vocab", None) or getattr(config, "vocab_size", None)
    return int(size) if size else None


def context_limit(model: Any) -> int | None:
    """The most positions the model takes (``n_ctx`` or its HF config's limit), if it has one."""
    cfg, config = _model_configs(model)
    limit = getattr(cfg, "n_ctx", None)
    for key in ("n_positions", "max_position_embeddings"):
        limit = limit or getattr(config, key, None)
    return int(limit) if limit else None


def check_tokens(tokens: Any, model: Any = None) -> Int[Tensor, "batch pos"]:
    """``tokens`` if it is a non-empty ``[batch, pos]`` integer tensor the model can read.

    With ``model``, every id must be in ``0..d_vocab-1`` and ``pos`` within the model's context.

    Raises:
        TypeError: not a tensor, or not integer-typed.
        ValueError: wrong shape, ids out of range, or contexts longer than the model's.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"tokens must be a torch.Tensor of token ids [batch, pos], got {type(tokens).__name__}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(
            f"tokens must hold integer token ids (torch.long), got dtype {tokens.dtype}; "
            "tokenize text first, or convert ids with .long()"
        )
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}"
        )
    if model is None:
        return tokens
    size = vocab_size(model)
    if size is not None:
        bad = tokens[(tokens < 0) | (tokens >= size)].unique()
        if bad.numel():
            raise ValueError(
                f"token ids {bad[:10].tolist()} are out of range: the model's vocabulary has "
                f"{size} tokens (valid ids: 0..{size - 1})"
            )
    check_context(model, tokens.shape[1])
    return tokens


def check_context(model: Any, width: int) -> None:
    """Raise ``ValueError`` if contexts of ``width`` tokens exceed the model's positions."""
    limit = context_limit(model)
    if limit is not None and width > limit:
        raise ValueError(
            f"contexts of {width} tokens exceed the model's {limit} positions; "
            f"use a context size of at most {limit}"
        )


def check_features(features: Tensor | Sequence[int] | None, d_sae: int) -> Int[Tensor, " F"]:
    """Feature indices as a 1-d long tensor (all ``d_sae`` features for ``None``).

    Raises:
        ValueError: no features, or indices out of range (the message gives the valid range).
    """
    if features is None:
        return torch.arange(d_sae)
    idx = torch.as_tensor(features).flatten()
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"feature indices must be integers, got {idx.dtype}")
    idx = idx.long()
    if idx.numel() == 0:
        raise ValueError(
            f"no features given: give at least one index in 0..{d_sae - 1}, or None for all"
        )
    bad = idx[(idx < 0) | (idx >= d_sae)]
    if bad.numel():
        raise ValueError(
            f"feature indices {bad.tolist()[:10]} are out of range: the SAE has d_sae={d_sae} "
            f"(valid: 0..{d_sae - 1})"
        )
    return idx


def check_positions(positions: Any, tokens: Tensor) -> Int[Tensor, "batch q"]:
    """Query positions as ``[batch, q]`` (every position for ``None``; ``[batch]`` gives q = 1).

    Raises:
        ValueError: wrong shape, or positions outside the tokens.
    """
    check_tokens(tokens)
    batch, n_pos = tokens.shape
    if positions is None:
        return torch.arange(n_pos).expand(batch, n_pos)
    query = torch.as_tensor(positions, dtype=torch.long)
    query = query[:, None] if query.ndim == 1 else query
    if query.ndim != 2 or query.shape[0] != batch:
        raise ValueError(
            f"positions must be [batch] or [batch, q] with batch={batch}, got shape {tuple(query.shape)}"
        )
    bad = query[(query < 0) | (query >= n_pos)]
    if bad.numel():
        raise ValueError(
            f"positions {bad.tolist()[:10]} are out of range for {n_pos} tokens (valid: 0..{n_pos - 1})"
        )
    return query


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer ≥ ``minimum`` (Python, NumPy or 0-d tensor), else raise.

    Raises:
        TypeError: not an integer (bools and floats are refused).
        ValueError: below ``minimum``.
    """
    as_int = as_integer(value)
    if as_int is None:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if as_int < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {as_int}")
    return as_int


def check_sae_folder(folder: str | Path) -> Path:
    """``folder`` as a ``Path`` if it holds a readable SAELens SAE: a ``cfg.json`` JSON object
    and a complete ``sae_weights.safetensors`` (SAELens's own errors name neither file).

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: a file is corrupt, empty or truncated (named).
    """
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path, weights_path = folder / SAE_CFG_FILENAME, folder / SAE_WEIGHTS_FILENAME
    missing = [path.name for path in (cfg_path, weights_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not a saved SAE folder: it lacks {missing} (a SAELens SAE folder "
            f"holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{str(cfg_path)!r} is not valid JSON (corrupted or truncated?): {err}"
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{str(cfg_path)!r} must hold a JSON object (an SAE config), got {type(cfg).__name__}"
        )
    try:
        with safe_open(str(weights_path), framework="pt") as weights:  # type: ignore[no-untyped-call]
            weights.keys()
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(
            f"cannot read the SAE weights {str(weights_path)!r} (empty, corrupted or "
            f"truncated?): {err}"
        ) from None
    return folder
