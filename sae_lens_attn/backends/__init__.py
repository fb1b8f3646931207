"""Backends: how a model's attention sites are captured and spliced.

``backend_for(model)`` picks the backend from the model's type; ``SUPPORTED_MODEL_TYPES`` lists them.
"""

from __future__ import annotations

from typing import Any

from sae_lens_attn.backends.base import (
    AttnBackend,
    AttnCapture,
    Captures,
    ZReplacement,
    expand_kv_heads,
)
from sae_lens_attn.backends.transformer_lens import TransformerLensBackend

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "transformer_lens.HookedTransformer": TransformerLensBackend.name,
}
"""Model types a backend accepts, mapped to the backend's name."""


def backend_for(model: Any) -> AttnBackend:
    """The backend for ``model`` (a backend passes through unchanged).

    Raises:
        TypeError: no backend supports the model's type; the message lists the supported types.
    """
    from transformer_lens import HookedTransformer

    if isinstance(model, AttnBackend):
        return model
    if isinstance(model, HookedTransformer):
        return TransformerLensBackend(model)
    raise TypeError(
        f"no sae_lens_attn backend supports models of type {type(model).__module__}."
        f"{type(model).__qualname__}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttnBackend",
    "AttnCapture",
    "Captures",
    "TransformerLensBackend",
    "ZReplacement",
    "backend_for",
    "expand_kv_heads",
]
