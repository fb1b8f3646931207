"""Backends: how a model's attention sites are captured and spliced.

``backend_for(model)`` picks the backend from the model's type; ``SUPPORTED_MODEL_TYPES`` lists them.
Each backend's module is imported when a model of its type first arrives, so nnsight is imported
only for a Hugging Face model.
"""

from __future__ import annotations

import sys
from typing import Any
from weakref import WeakValueDictionary

from sae_lens_attn.backends.base import (
    ActivationFn,
    AttnBackend,
    AttnCapture,
    AttnNorm,
    Captures,
    ResidualCapture,
    UnsupportedModelError,
    ZReplacement,
    expand_kv_heads,
)

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "transformer_lens.HookedTransformer": "transformer_lens",
    "transformer_lens.model_bridge.TransformerBridge (TransformerLens 3; also SAELens's "
    "SAETransformerBridge)": "bridge",
    "transformers.PreTrainedModel (causal LMs in sae_lens_attn.backends.architectures.HF_ARCHITECTURES)": "nnsight",
    "nnsight.Envoy (an nnsight model wrapping one of those)": "nnsight",
    "sae_lens_attn.HookedHFModel (from sla.hooked)": "nnsight",
}
"""Model types a backend accepts, mapped to the backend's name."""

_backends: WeakValueDictionary[int, AttnBackend] = WeakValueDictionary()
"""Live backends by ``id`` of the model they were made for. A backend holds its model, so while
an entry lives its model does too and the id cannot be reused; the table holds backends weakly,
so dropping the model and its backends frees both (GPU memory included)."""


def backend_for(model: Any) -> AttnBackend:
    """The backend for ``model`` (a backend passes through unchanged).

    While a backend for ``model`` is in use (held by the caller, a store, an open
    ``capturing``/``splicing`` block), the same one is returned, so interventions opened through
    one call apply to forward passes run through another.

    Raises:
        TypeError: no backend supports the model's type; the message lists the supported types.
        ValueError: a Hugging Face model whose architecture is not in the table.
    """
    if isinstance(model, AttnBackend):
        return model
    backend = getattr(model, "attn_backend", None)  # sla.hooked facades carry theirs
    if isinstance(backend, AttnBackend):
        return backend
    backend = _backends.get(id(model))
    if backend is None:
        backend = _new_backend(model)
        _backends[id(model)] = backend
    return backend


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face model, plain or wrapped by nnsight.

    Imports nnsight only to build the backend: an nnsight ``Envoy`` exists only once nnsight
    was imported, so it is looked for only then.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return True
    nnsight = sys.modules.get("nnsight")
    return nnsight is not None and isinstance(model, nnsight.Envoy)


def _new_backend(model: Any) -> AttnBackend:
    bridge_backend = _bridge_backend(model)
    if bridge_backend is not None:
        return bridge_backend
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        from sae_lens_attn.backends.transformer_lens import TransformerLensBackend

        return TransformerLensBackend(model)
    if is_hf_model(model):
        from sae_lens_attn.backends.nnsight import NNsightBackend  # imports nnsight

        return NNsightBackend(model)
    raise TypeError(
        f"no sae_lens_attn backend supports models of type {type(model).__module__}."
        f"{type(model).__qualname__}; supported: {list(SUPPORTED_MODEL_TYPES)}"
    )


def _bridge_backend(model: Any) -> AttnBackend | None:
    """A ``BridgeBackend`` for a ``TransformerBridge``, else ``None`` (always ``None`` on
    TransformerLens < 3, which has no bridge: the bridge module is imported only for bridges)."""
    try:
        from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
            TransformerBridge,  # TransformerLens >= 3 only
        )
    except ImportError:
        return None
    if not isinstance(model, TransformerBridge):
        return None
    from sae_lens_attn.backends.bridge import BridgeBackend

    return BridgeBackend(model)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ActivationFn",
    "AttnBackend",
    "AttnCapture",
    "AttnNorm",
    "Captures",
    "ResidualCapture",
    "UnsupportedModelError",
    "ZReplacement",
    "backend_for",
    "expand_kv_heads",
    "is_hf_model",
]
