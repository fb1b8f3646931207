"""The attention metadata of a hook_z SAE: its one writer and its one reader.

Every SAE this package trains, converts or publishes carries, in SAELens's ``cfg.metadata``,
the keys ``ATTENTION_METADATA_KEYS`` (and SAELens's own ``model_name`` when it is known).
SAELens keeps metadata keys it does not know, so vanilla SAELens loads these SAEs unchanged.
``attention_metadata`` writes the keys; ``read_attention_metadata`` reads and validates them,
also from SAEs saved by plain SAELens, which record only ``hook_name``; ``recorded_site`` is the
one place a site is made from a recorded head structure (``AttnSite.from_sae`` and the training
configs use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sae_lens_attn.backends.architectures import HF_ARCHITECTURES, HFArchitecture, hf_architecture
from sae_lens_attn.site import (
    VALUE_BIAS_CONVENTIONS,
    AttnSite,
    ValueBiasConvention,
    convention_of_model_kwargs,
    folded_model_kwargs,
)

SITE_KEYS = ("hook_name", "layer", "n_heads", "n_kv_heads", "d_head")
"""Metadata keys that locate the site: the hook, its layer and the head structure."""
ATTENTION_METADATA_KEYS = (
    *SITE_KEYS,
    "value_bias_convention",
    "hf_architecture",
    "hf_module_path",
    "model_from_pretrained_kwargs",
)
"""Every metadata key an attention SAE is saved with, besides SAELens's ``model_name``."""


@dataclass(frozen=True)
class AttentionMetadata:
    """What a hook_z SAE's metadata records, validated; ``None`` where it records nothing."""

    hook_name: str
    """The hook the SAE reads, ``blocks.L.attn.hook_z``."""
    layer: int
    """The layer of ``hook_name``."""
    n_heads: int | None
    """Query heads of the site (``None`` for SAEs saved by plain SAELens)."""
    n_kv_heads: int | None
    """Key/value heads of the site (``None``: not recorded, the same as ``n_heads``)."""
    d_head: int | None
    """Width of one head's z (``None``: not recorded, ``d_in / n_heads``)."""
    value_bias_convention: ValueBiasConvention | None
    """Whether the SAE's z carries ``b_V + β·W_V`` (``None``: not recorded)."""
    model_name: str | None = None
    """SAELens's ``model_name`` of the model the SAE reads."""
    hf_architecture: str | None = None
    """Hugging Face class of that model (a row of ``HF_ARCHITECTURES``)."""
    hf_module_path: str | None = None
    """Module whose input is z in that class (derived from ``hf_architecture``)."""
    model_from_pretrained_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Kwargs SAELens's workflows load the model with; they deliver the SAE's convention."""

    def site(self, d_in: int) -> AttnSite | None:
        """The recorded site of an SAE of input width ``d_in`` (``None`` without ``n_heads``).

        Raises:
            ValueError: the head structure does not give ``d_in``.
        """
        if self.n_heads is None:
            return None
        return recorded_site(self.layer, d_in, self.n_heads, self.n_kv_heads, self.d_head)

    def sae_site(self, d_in: int, model_site: AttnSite | None = None) -> AttnSite:
        """The site an SAE of input width ``d_in`` with this metadata reads.

        Args:
            d_in: the SAE's input width.
            model_site: the site of this layer in the model the SAE runs on; it supplies the
                head structure the metadata lacks and must agree with what the metadata records.

        Raises:
            ValueError: the metadata records no ``n_heads`` and no ``model_site`` is given, the
                recorded head structure disagrees with ``model_site``, or ``d_in`` does not fit.
        """
        if model_site is not None:
            clashes = {
                key: (recorded, getattr(model_site, key))
                for key in ("n_heads", "n_kv_heads", "d_head")
                if (recorded := getattr(self, key)) is not None
                and recorded != getattr(model_site, key)
            }
            if clashes:
                raise ValueError(
                    f"SAE on {self.hook_name} was trained for another model's site: "
                    + ", ".join(
                        f"{key}={a} in the SAE but {b} in the model"
                        for key, (a, b) in clashes.items()
                    )
                )
            return model_site.check_sae_width(d_in)
        site = self.site(d_in)
        if site is None:
            raise ValueError(
                f"SAE on {self.hook_name} does not record n_heads in its metadata "
                "(it was not saved by sae_lens_attn); pass model= to read the head structure"
            )
        return site


def attention_metadata(
    site: AttnSite,
    value_bias_convention: ValueBiasConvention | None,
    *,
    model_name: str | None = None,
    hf_architecture: str | None = None,
    model_from_pretrained_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of an attention SAE on ``site``, to merge into SAELens's ``cfg.metadata``.

    Args:
        site: the site the SAE reads.
        value_bias_convention: the convention of its z (``None``: not known).
        model_name: SAELens's model name; left out when ``None`` (SAELens's runner sets it).
        hf_architecture: Hugging Face class of the model, to record the module path of z.
        model_from_pretrained_kwargs: the kwargs SAELens loads the model with; completed with
            ``FOLDED_MODEL_KWARGS`` for folded SAEs, so SAELens's workflows deliver folded z.

    Returns:
        ``ATTENTION_METADATA_KEYS`` (and ``model_name`` when given) → values, JSON-serialisable.

    Raises:
        ValueError: an unknown convention or architecture, or kwargs that deliver the other
            convention.
    """
    convention = check_value_bias_convention(value_bias_convention, "attention_metadata")
    kwargs = dict(model_from_pretrained_kwargs or {})
    if convention == "folded":
        kwargs = folded_model_kwargs(kwargs)
    elif convention == "included" and convention_of_model_kwargs(kwargs) == "folded":
        raise ValueError(
            f"model_from_pretrained_kwargs {kwargs} fold the value biases, which contradicts the "
            "'included' value-bias convention: SAELens's workflows would load the model with z "
            "lacking b_V'; record the SAE as 'folded' or drop fold_value_biases"
        )
    row = (
        None
        if hf_architecture is None
        else check_hf_architecture(hf_architecture, "attention_metadata")
    )
    metadata: dict[str, Any] = {
        "hook_name": site.hook_name,
        "layer": site.layer,
        "n_heads": site.n_heads,
        "n_kv_heads": site.n_kv_heads,
        "d_head": site.d_head,
        "value_bias_convention": convention,
        "hf_architecture": hf_architecture,
        "hf_module_path": None if row is None else row.out_proj_path(site.layer),
        "model_from_pretrained_kwargs": kwargs,
    }
    if model_name is not None:
        metadata["model_name"] = model_name
    return metadata


def read_attention_metadata(
    metadata: Any, *, d_in: int | None = None, source: str = "SAE metadata"
) -> AttentionMetadata:
    """Read and validate the attention metadata of a hook_z SAE.

    Args:
        metadata: SAELens's ``cfg.metadata`` (``SAEMetadata``) or a ``cfg.json``'s
            ``"metadata"`` mapping.
        d_in: the SAE's input width, checked against the recorded head structure when given.
        source: what the metadata belongs to, for error messages.

    Raises:
        ValueError: not a hook_z SAE, or the keys contradict each other (layer and hook, the
            head structure and ``d_in``, the module path and the architecture) or hold unknown
            values; the message names ``source``.
    """
    if not hasattr(metadata, "get"):
        raise TypeError(
            f"{source}: expected SAELens metadata (SAEMetadata or a mapping), got "
            f"{type(metadata).__name__}"
        )
    hook_name = metadata.get("hook_name")
    try:
        layer = AttnSite.layer_of(hook_name)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    recorded_layer = metadata.get("layer")
    if recorded_layer is not None and recorded_layer != layer:
        raise ValueError(
            f"{source}: layer={recorded_layer!r} but hook_name={hook_name!r} is layer {layer}"
        )
    heads = {key: metadata.get(key) for key in ("n_heads", "n_kv_heads", "d_head")}
    if heads["n_heads"] is None and any(v is not None for v in heads.values()):
        raise ValueError(f"{source}: records {heads} without n_heads; record n_heads too")
    if heads["n_heads"] is not None:
        try:
            structure = AttnSite(
                layer,
                heads["n_heads"],
                heads["n_kv_heads"] or heads["n_heads"],
                heads["d_head"] or 1,
            )
            heads = {  # as recorded (NumPy and tensor integers as ints), None where not
                key: getattr(structure, key) if value is not None else None
                for key, value in heads.items()
            }
            if d_in is not None:
                recorded_site(layer, d_in, structure.n_heads, heads["n_kv_heads"], heads["d_head"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None
    convention = check_value_bias_convention(metadata.get("value_bias_convention"), source)
    architecture = metadata.get("hf_architecture")
    module_path = metadata.get("hf_module_path")
    if architecture is not None:
        expected = check_hf_architecture(architecture, source).out_proj_path(layer)
        if module_path is not None and module_path != expected:
            raise ValueError(
                f"{source}: hf_module_path={module_path!r} but z of {architecture} at layer "
                f"{layer} is the input of {expected!r}"
            )
        module_path = expected
    kwargs = metadata.get("model_from_pretrained_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(
            f"{source}: model_from_pretrained_kwargs must be a mapping, got {kwargs!r}"
        )
    return AttentionMetadata(
        hook_name=hook_name,
        layer=layer,
        n_heads=heads["n_heads"],
        n_kv_heads=heads["n_kv_heads"],
        d_head=heads["d_head"],
        value_bias_convention=convention,
        model_name=metadata.get("model_name"),
        hf_architecture=architecture,
        hf_module_path=module_path,
        model_from_pretrained_kwargs=dict(kwargs),
    )


def recorded_site(
    layer: int,
    d_in: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    d_head: int | None = None,
) -> AttnSite:
    """The site of an SAE of input width ``d_in`` at ``layer`` with a recorded head structure.

    Args:
        layer: the layer of the SAE's hook.
        d_in: the SAE's input width.
        n_heads: query heads.
        n_kv_heads: key/value heads; ``None`` (not recorded) means ``n_heads``.
        d_head: width of one head's z; ``None`` (not recorded) means ``d_in // n_heads``.

    Raises:
        TypeError: a count that is not an integer.
        ValueError: not a valid site, or ``d_in != n_heads * d_head``.
    """
    d_head = d_head or d_in // n_heads
    return AttnSite(layer, n_heads, n_kv_heads or n_heads, d_head).check_sae_width(d_in)


def check_value_bias_convention(value: Any, source: str) -> ValueBiasConvention | None:
    """``value`` if it is a value-bias convention or ``None`` (not known).

    Raises:
        ValueError: any other value; the message names ``source`` and lists the valid ones.
    """
    if value is not None and value not in VALUE_BIAS_CONVENTIONS:
        raise ValueError(
            f"{source}: unknown value_bias_convention {value!r}; valid: "
            f"{list(VALUE_BIAS_CONVENTIONS)} (or None when not known)"
        )
    return value


def check_hf_architecture(name: Any, source: str) -> HFArchitecture:
    """The row of ``HF_ARCHITECTURES`` for the Hugging Face class ``name``.

    Raises:
        ValueError: ``name`` has no row; the message names ``source`` and lists the valid ones.
    """
    if not isinstance(name, str) or name not in HF_ARCHITECTURES:
        raise ValueError(
            f"{source}: unknown hf_architecture {name!r}; valid: {sorted(HF_ARCHITECTURES)}"
        )
    return hf_architecture(name)
