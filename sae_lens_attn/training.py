"""Building attention SAE training configs from a model."""

from __future__ import annotations

from typing import Any, get_args

from sae_lens_attn.architectures import HF_ARCHITECTURES
from sae_lens_attn.backends import backend_for
from sae_lens_attn.sae_config import ATTN_TRAINING_CLASSES, AttnArchitecture, AttnTrainingFields


def attn_sae_training_config(
    model: Any,
    layer: int,
    architecture: AttnArchitecture = "standard",
    **kwargs: Any,
) -> AttnTrainingFields:
    """The training config of an attention SAE for ``layer`` of ``model``.

    Fills ``d_in``, the head structure, the hook name, the value-bias convention the backend
    delivers and the Hugging Face architecture from the model; ``kwargs`` are the base SAELens
    config's own fields (``d_sae``, ``k``, ``l1_coefficient``, ...).

    Example:
        >>> cfg = attn_sae_training_config(model, 1, "topk", d_sae=2048, k=16)
        >>> runner_cfg = LanguageModelSAERunnerConfig(sae=cfg, hook_name=cfg.metadata.hook_name, ...)
    """
    name = f"attn_{architecture}"
    if name not in ATTN_TRAINING_CLASSES:
        raise ValueError(
            f"unknown attention SAE architecture {architecture!r}; valid: "
            f"{list(get_args(AttnArchitecture))}"
        )
    backend = backend_for(model)
    site = backend.site(layer)
    # z carries whatever b_V the model holds now: none (folded or bias-free) or the real one.
    has_value_bias = bool(backend.value_bias(site).abs().max() > 0)
    arch = getattr(getattr(model, "cfg", None), "original_architecture", None)
    cfg_cls = ATTN_TRAINING_CLASSES[name][1]
    cfg = cfg_cls(  # type: ignore[call-arg]
        d_in=site.d_in,
        n_heads=site.n_heads,
        n_kv_heads=site.n_kv_heads,
        value_bias_convention="included" if has_value_bias else "folded",
        hf_architecture=arch if arch in HF_ARCHITECTURES else None,
        **kwargs,
    )
    cfg.metadata.hook_name = site.hook_name  # type: ignore[attr-defined]
    return cfg
