"""`AttnSite`: one attention layer's hook_z, the only place hook names and module paths are made."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex, get_args

if TYPE_CHECKING:
    from sae_lens import SAE

ValueBiasConvention = Literal["folded", "included"]
"""Whether z carries the value bias ``b_V' = b_V + β·W_V`` (β the bias of the attention's norm).

``"folded"``: z has no ``b_V'``, as TransformerLens ``from_pretrained`` delivers it (``fold_ln``
moves β into ``b_V``, then ``fold_value_biases`` moves ``b_V'`` into b_O; the published GPT-2
Small attention SAEs use this). ``"included"``: z carries ``b_V'``, as in Hugging Face models and
``from_pretrained_no_processing``. The two differ by exactly ``b_V'`` per head, since Σ_s A = 1.
"""
VALUE_BIAS_CONVENTIONS: tuple[str, ...] = get_args(ValueBiasConvention)

FOLDED_MODEL_KWARGS: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}
"""``HookedTransformer.from_pretrained``'s default processing spelled out, so that SAELens's
loaders, which call ``from_pretrained_no_processing(**model_from_pretrained_kwargs)``, deliver z
in the folded convention (``fold_ln`` and ``fold_value_biases`` set z; the centering keeps the
rest of the model as the SAEs were trained on)."""


def folded_model_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` completed with ``FOLDED_MODEL_KWARGS``, for an SAE in the folded convention.

    Raises:
        ValueError: ``kwargs`` turns off a processing step that the folded convention needs.
    """
    given = dict(kwargs or {})
    clashes = [k for k in ("fold_ln", "fold_value_biases") if given.get(k, True) is not True]
    if clashes:
        raise ValueError(
            f"model_from_pretrained_kwargs {given} contradict the 'folded' value-bias convention: "
            f"{', '.join(clashes)} must be true (folded z is what from_pretrained's fold_ln and "
            "fold_value_biases deliver); record the SAE as 'included' or drop those kwargs"
        )
    return {**FOLDED_MODEL_KWARGS, **given}


def convention_of_model_kwargs(kwargs: dict[str, Any] | None) -> ValueBiasConvention:
    """The convention of z in a model loaded by ``from_pretrained_no_processing(**kwargs)``.

    Raises:
        ValueError: ``fold_value_biases`` without ``fold_ln``: z then lacks ``b_V`` but keeps
            ``β·W_V`` on LayerNorm models, which is neither convention.
    """
    given = dict(kwargs or {})
    if not given.get("fold_value_biases"):
        return "included"
    if not given.get("fold_ln"):
        raise ValueError(
            f"model_from_pretrained_kwargs {given} fold the value biases without fold_ln: z then "
            "keeps the LayerNorm bias term β·W_V, which is neither value-bias convention; add "
            f"fold_ln=True (the folded convention is {FOLDED_MODEL_KWARGS}) or drop "
            "fold_value_biases (the included convention)"
        )
    return "folded"


_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")

POS_EMBED_HOOK_NAME = "hook_pos_embed"
"""TransformerLens hook of the learned position embeddings ``[batch, pos, d_model]`` (the model's,
not a layer's: on models that add them to the residual stream)."""


@dataclass(frozen=True)
class AttnSite:
    """The hook_z activation of one attention layer: z of every head, concatenated head-major.

    The fields take any integer (``int``, NumPy integer, 0-d integer tensor) and hold it as an
    ``int``; anything else raises ``TypeError``, a value below the minimum ``ValueError``.
    """

    layer: int
    """Index of the attention layer (0-based)."""
    n_heads: int
    """Number of query heads; z has one ``d_head`` block per query head."""
    n_kv_heads: int
    """Number of key/value heads (equal to ``n_heads`` without grouped-query attention)."""
    d_head: int
    """Width of one head's z."""

    def __post_init__(self) -> None:
        for name in ("layer", "n_heads", "n_kv_heads", "d_head"):
            value = getattr(self, name)
            minimum = 0 if name == "layer" else 1
            as_int = as_integer(value)
            if as_int is None:
                raise TypeError(
                    f"AttnSite.{name} must be an integer >= {minimum} (int, NumPy integer or 0-d "
                    f"integer tensor), got {value!r} of type {type(value).__name__}"
                )
            if as_int < minimum:
                raise ValueError(f"AttnSite.{name} must be an integer >= {minimum}, got {as_int}")
            object.__setattr__(self, name, as_int)  # NumPy and tensor integers become ints
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention shares each KV head among n_heads / n_kv_heads query heads"
            )

    @property
    def d_in(self) -> int:
        """Width of the flattened z, ``n_heads * d_head``: the SAE's input size."""
        return self.n_heads * self.d_head

    @property
    def hook_name(self) -> str:
        """TransformerLens hook of z, ``blocks.L.attn.hook_z``."""
        return f"blocks.{self.layer}.attn.hook_z"

    @property
    def pattern_hook_name(self) -> str:
        """TransformerLens hook of the attention pattern ``[batch, n_heads, q, k]``."""
        return f"blocks.{self.layer}.attn.hook_pattern"

    @property
    def values_hook_name(self) -> str:
        """TransformerLens hook of the values ``[batch, pos, n_kv_heads, d_head]``."""
        return f"blocks.{self.layer}.attn.hook_v"

    @property
    def resid_pre_hook_name(self) -> str:
        """TransformerLens hook of the residual stream entering the layer ``[batch, pos, d_model]``."""
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def attn_norm_scale_hook_name(self) -> str:
        """TransformerLens hook of the attention norm's scale σ ``[batch, pos, 1]`` (``ln1``)."""
        return f"blocks.{self.layer}.ln1.hook_scale"

    @property
    def attn_out_hook_name(self) -> str:
        """TransformerLens hook of what the attention adds to the residual ``[batch, pos, d_model]``."""
        return f"blocks.{self.layer}.hook_attn_out"

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads: ``head // (n_heads / n_kv_heads)``."""
        return head // self.group_size

    def head_slice(self, head: int) -> slice:
        """Rows of the flattened z (and of W_enc) that belong to ``head``."""
        return slice(head * self.d_head, (head + 1) * self.d_head)

    @staticmethod
    def layer_of(hook_name: str) -> int:
        """The layer of a hook_z name ``blocks.L.attn.hook_z``.

        Raises:
            ValueError: ``hook_name`` is not a hook_z name.
        """
        match = _HOOK_Z.match(hook_name) if isinstance(hook_name, str) else None
        if match is None:
            raise ValueError(
                f"expected a hook_z hook name 'blocks.<layer>.attn.hook_z', got {hook_name!r}: "
                "attention SAEs read the per-head attention outputs (the input of W_O)"
            )
        return int(match.group(1))

    @classmethod
    def from_model(cls, model: Any, layer: SupportsIndex) -> AttnSite:
        """The site of ``layer`` in ``model`` (any model a backend supports).

        ``layer`` is an integer: an ``int``, a NumPy integer or a 0-d integer tensor.

        Raises:
            ValueError: ``layer`` is out of range.
            TypeError: ``layer`` is not an integer, or no backend supports ``model`` (the message
                lists those that exist).
        """
        from sae_lens_attn.backends import backend_for

        backend = backend_for(model)
        return backend.site(check_layer(layer, backend.n_layers))

    @classmethod
    def from_sae(cls, sae: SAE[Any], model: Any = None) -> AttnSite:
        """The site a hook_z SAE reads: its metadata first, ``model`` for what it lacks.

        SAEs saved by this package carry ``n_heads``, ``n_kv_heads`` and ``d_head``; SAEs saved by
        plain SAELens carry only the hook name, so the head structure comes from ``model``. When
        both are present they must agree.

        Raises:
            ValueError: the SAE is not on hook_z, does not fit the site, or disagrees with ``model``.
        """
        from sae_lens_attn.config.metadata import read_attention_metadata  # it imports this module

        meta = sae.cfg.metadata
        recorded = read_attention_metadata(meta, source=f"SAE on {meta.hook_name}")
        model_site = None if model is None else cls.from_model(model, recorded.layer)
        return recorded.sae_site(sae.cfg.d_in, model_site)

    def check_sae_width(self, d_in: int) -> AttnSite:
        """Return self if an SAE of input width ``d_in`` fits this site, else raise."""
        if d_in != self.d_in:
            raise ValueError(
                f"SAE d_in={d_in} does not match the site {self.hook_name}: expected "
                f"n_heads*d_head = {self.n_heads}*{self.d_head} = {self.d_in}"
            )
        return self


def check_layer(layer: SupportsIndex, n_layers: int) -> int:
    """``layer`` as an ``int`` if a model with ``n_layers`` layers has it.

    Raises:
        TypeError: ``layer`` is not an integer (see ``as_integer``).
        ValueError: ``layer`` is out of range.
    """
    as_int = as_integer(layer)
    if as_int is None:
        raise TypeError(
            f"layer must be an integer in 0..{n_layers - 1} (int, NumPy integer or 0-d integer "
            f"tensor), got {layer!r} of type {type(layer).__name__}"
        )
    if not 0 <= as_int < n_layers:
        raise ValueError(
            f"layer {as_int} is out of range: the model has {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    return as_int


def as_integer(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integer (Python, NumPy, or a 0-d integer tensor or
    array), else ``None``: bools, floats and arrays with dimensions are not integers."""
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, bool) or dtype in ("bool", "torch.bool") or getattr(value, "ndim", 0):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def saes_by_layer(
    saes: SAE[Any] | Iterable[SAE[Any]] | Mapping[int, SAE[Any]], model: Any = None
) -> dict[int, SAE[Any]]:
    """Hook_z SAEs keyed by the layer each reads (``AttnSite.from_sae(sae, model)``), by layer.

    Args:
        saes: one SAE, several, or a mapping layer → SAE (each key must be its SAE's layer).
        model: the model they read (any model a backend supports, or its backend), which
            checks that each SAE fits it; without it, the SAEs' metadata alone.

    Raises:
        TypeError: something other than a SAELens SAE among ``saes``.
        ValueError: no SAEs, two SAEs on one layer, a key that is not its SAE's layer, or an SAE
            that ``AttnSite.from_sae`` refuses.
    """
    from sae_lens import SAE  # a dependency of the package; imported where it is needed

    if isinstance(saes, SAE):
        saes = [saes]
    given = list(saes.items()) if isinstance(saes, Mapping) else [(None, s) for s in saes]
    if not given:
        raise ValueError("no SAEs were given: give at least one SAE")
    layers: list[int] = []
    for key, sae in given:
        if not isinstance(sae, SAE):
            raise TypeError(f"saes must hold SAELens SAEs, got {type(sae).__name__}")
        layer = AttnSite.from_sae(sae, model).layer
        if key is not None and key != layer:
            raise ValueError(f"the SAE given for layer {key} reads layer {layer}")
        layers.append(layer)
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(
            f"two SAEs read layer {repeated[0]} (give at most one SAE per layer; the SAEs' layers "
            f"are {layers})"
        )
    return dict(sorted(zip(layers, (sae for _, sae in given), strict=True)))
