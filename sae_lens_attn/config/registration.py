"""Registration with SAELens's registries, idempotent: importing or reloading twice raises nothing."""

from __future__ import annotations

from typing import Any

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class

from sae_lens_attn.config.sae_configs import ATTN_TRAINING_CLASSES


def register_training_classes() -> None:
    """Register the ``attn_*`` training architectures with SAELens.

    New names go through SAELens's ``register_sae_training_class``. An entry already registered
    by this package (an earlier import or a reload) is replaced by the current classes; a name
    taken by another package is an error, never silently overwritten.
    """
    for name, classes in ATTN_TRAINING_CLASSES.items():
        existing = SAE_TRAINING_CLASS_REGISTRY.get(name)
        if existing is not None and not _ours(existing):
            raise ValueError(
                f"SAELens training architecture {name!r} is already registered by "
                f"{existing[0].__module__}; sae_lens_attn cannot register its own"
            )
        if existing is None:
            register_sae_training_class(name, *classes)  # SAELens's public registration
        elif existing != classes:  # a reload of this package: SAELens has no way to replace
            SAE_TRAINING_CLASS_REGISTRY[name] = classes  # type: ignore[assignment]


def _ours(entry: tuple[Any, ...]) -> bool:
    return all(cls.__module__.startswith("sae_lens_attn.") for cls in entry)
