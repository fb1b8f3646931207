"""Backends: how a model's attention sites are captured and spliced.

``backend_for(model)`` picks the backend from the model's type; ``SUPPORTED_MODEL_TYPES`` lists them.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from sae_lens_attn.backends.base import (
    ActivationFn,
    AttnBackend,
    AttnCapture,
    Captures,
    ZReplacement,
    expand_kv_heads,
)

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "transformer_lens.HookedTransformer": "transformer_lens",
    "transformers.PreTrainedModel (causal LMs in sae_lens_attn.architectures.HF_ARCHITECTURES)": "nnsight",
    "nnsight.Envoy (an nnsight model wrapping one of those)": "nnsight",
    "sae_lens_attn.HookedHFModel (from sla.hooked)": "nnsight",
}
"""Model types a backend accepts, mapped to the backend's name."""

_backends: WeakKeyDictionary[Any, AttnBackend] = WeakKeyDictionary()


def backend_for(model: Any) -> AttnBackend:
    """The backend for ``model`` (a backend passes through unchanged; one per model is kept).

    Raises:
        TypeError: no backend supports the model's type; the message lists the supported types.
        ValueError: a Hugging Face model whose architecture is not in the table.
    """
    if isinstance(model, AttnBackend):
        return model
    backend = getattr(model, "attn_backend", None)  # sla.hooked facades carry theirs
    if isinstance(backend, AttnBackend):
        return backend
    try:
        return _backends[model]
    except (KeyError, TypeError):
        pass
    backend = _new_backend(model)
    _backends[model] = backend
    return backend


def _new_backend(model: Any) -> AttnBackend:
    from nnsight import Envoy
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel

    from sae_lens_attn.backends.nnsight import NNsightBackend
    from sae_lens_attn.backends.transformer_lens import TransformerLensBackend

    if isinstance(model, HookedTransformer):
        return TransformerLensBackend(model)
    if isinstance(model, PreTrainedModel | Envoy):
        return NNsightBackend(model)
    raise TypeError(
        f"no sae_lens_attn backend supports models of type {type(model).__module__}."
        f"{type(model).__qualname__}; supported: {list(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ActivationFn",
    "AttnBackend",
    "AttnCapture",
    "Captures",
    "ZReplacement",
    "backend_for",
    "expand_kv_heads",
]
