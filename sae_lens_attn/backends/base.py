"""What every backend provides: captures of (z, pattern, values) and splices of z, per site, and
the residual stream read as a sum of parts (``capture_residual``, with the weights that map it to
the values and back: ``attn_norm``, ``values_weight``, ``out_proj_weight``, ``out_proj_bias``)."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from sae_lens_attn.site import (
    POS_EMBED_HOOK_NAME,
    VALUE_BIAS_CONVENTIONS,
    AttnSite,
    ValueBiasConvention,
    check_layer,
)

ZReplacement = Callable[[Float[Tensor, " batch pos n_heads d_head"]], Tensor]
"""Maps z (in the requested value-bias convention) to the z the model should use instead."""


class UnsupportedModelError(ValueError):
    """A model, through its backend, cannot serve an analysis (e.g. its residual stream is not a
    sum of parts, or its backend does not read it). The message names the backend and what would
    serve. A ``ValueError``, so that callers that treat it as bad input keep working; callers
    that show an analysis when it can be made (dashboard panels) catch this type alone."""


class AttnCapture(NamedTuple):
    """What one forward pass saw at one attention site, in one value-bias convention."""

    z: Float[Tensor, " batch pos n_heads d_head"]
    """Per-head attention outputs, the input of W_O."""
    pattern: Float[Tensor, " batch n_heads q k"] | None
    """Attention probabilities, if requested."""
    values: Float[Tensor, " batch pos n_heads d_head"] | None
    """Values with grouped KV heads expanded to query heads, if requested."""

    @property
    def z_flat(self) -> Float[Tensor, " batch pos d_in"]:
        """z with heads concatenated head-major, the SAE's input."""
        return self.z.flatten(-2)


class Captures(Mapping[int, AttnCapture]):
    """Raw tensors a backend collected, keyed by layer, delivered in one value-bias convention.

    Filled while the model runs inside ``AttnBackend.capturing``; read it afterwards.
    """

    def __init__(
        self,
        sites: Iterable[AttnSite],
        value_biases: Mapping[int, Float[Tensor, " n_heads d_head"]],
        convention: ValueBiasConvention,
    ) -> None:
        self.sites = {site.layer: site for site in sites}
        self.raw: dict[tuple[int, str], Tensor] = {}
        self._value_biases = value_biases
        self._convention = convention

    def __getitem__(self, layer: int) -> AttnCapture:
        site = self.sites[layer]
        if (layer, "z") not in self.raw:
            raise RuntimeError(
                f"no z was captured at {site.hook_name}: run the model inside the capturing context"
            )
        bias = self._value_biases[layer] if self._convention == "folded" else None
        z = self.raw[layer, "z"]
        values = self.raw.get((layer, "values"))
        if values is not None:
            values = expand_kv_heads(values, site)
        if bias is not None:
            z = z - bias
            values = None if values is None else values - bias
        return AttnCapture(z=z, pattern=self.raw.get((layer, "pattern")), values=values)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)


ActivationFn = Callable[[Tensor], Tensor | None]
"""Sees one activation; for z, a returned tensor replaces it in the forward pass."""


def saver(store: dict[tuple[int, str], Tensor], key: tuple[int, str]) -> ActivationFn:
    """An ``ActivationFn`` that keeps a detached copy of what it sees under ``key``."""

    def save(activation: Tensor) -> None:
        store[key] = activation.detach()

    return save


def splicer(replace: ZReplacement, bias: Tensor | None) -> ActivationFn:
    """An ``ActivationFn`` that replaces z by ``replace(z)``, converting to the folded
    convention and back when the model's ``bias`` (b_V per head) is given."""

    def splice(z: Tensor) -> Tensor:
        if bias is None:
            return replace(z)
        return replace(z - bias) + bias

    return splice


TorchForwardHook = Callable[[nn.Module, Any, Tensor], Tensor | None]
"""A torch forward hook: sees a module's output; a returned tensor replaces it."""


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, TorchForwardHook]]) -> Iterator[None]:
    """Register each ``(module, hook)`` as a torch forward hook for the block; all are removed
    on exit, exceptions included (also one raised while ``hooks`` is still being read)."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class AttnNorm(NamedTuple):
    """The norm whose output a layer's values read, as the model holds it now: with x the
    residual stream and σ its scale at each position, ``norm(x) = weight ⊙ P x / σ + β``."""

    weight: Float[Tensor, " d_model"]
    """γ: the norm's gain (ones where it has none)."""
    centres: bool
    """Whether ``P`` subtracts the mean over ``d_model`` first (LayerNorm), or not (RMSNorm)."""


ResidualKind = Literal["resid_pre", "norm_scale", "attn_out", "position_embedding"]
"""What a residual read holds (the fields of ``ResidualCapture``)."""
ResidualKey = tuple[ResidualKind, int]
"""A residual read and its layer (0 for the model's position embeddings)."""


class ResidualCapture(NamedTuple):
    """One forward pass read as the parts of the residual stream, up to one layer's attention
    (``AttnBackend.capture_residual``)."""

    resid_pre: tuple[Float[Tensor, " batch pos d_model"], ...]
    """Layers ``0..top``: the residual stream entering each layer (its attention norm's input)."""
    norm_scale: tuple[Float[Tensor, " batch pos"], ...]
    """Layers ``0..top``: σ, the attention norm's scale at each position (ones without a norm)."""
    attn_out: tuple[Float[Tensor, " batch pos d_model"], ...]
    """Layers ``0..top-1``: what each attention adds to the residual stream."""
    position_embedding: Float[Tensor, " batch pos d_model"] | None
    """The learned position embeddings added to the residual stream; ``None`` where positions
    do not enter it (rotary, ALiBi, shortformer)."""
    attention: Captures
    """z, patterns and values of layers ``0..top`` from the same pass, z as the model computes
    it (its native value-bias convention: ``value_bias`` is what z holds of ``b_V'``)."""


def residual_hook_names(
    sites: Sequence[AttnSite], *, norm: bool, positions: bool
) -> list[tuple[ResidualKey, str]]:
    """The TransformerLens hooks holding ``capture_residual``'s reads for ``sites`` (layers
    ``0..top`` in order): ``norm``, whether the layers have an attention norm (``ln1``);
    ``positions``, whether learned position embeddings join the residual stream."""
    top = sites[-1].layer
    names: list[tuple[ResidualKey, str]] = []
    if positions:
        names.append((("position_embedding", 0), POS_EMBED_HOOK_NAME))
    for site in sites:
        names.append((("resid_pre", site.layer), site.resid_pre_hook_name))
        if norm:
            names.append((("norm_scale", site.layer), site.attn_norm_scale_hook_name))
        if site.layer < top:
            names.append((("attn_out", site.layer), site.attn_out_hook_name))
    return names


def keep_output(store: dict[ResidualKey, Tensor], key: ResidualKey) -> TorchForwardHook:
    """A torch forward hook that keeps a detached copy of its module's output under ``key``."""

    def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        store[key] = output.detach()

    return keep


InterventionKind = Literal["z", "values", "patterns"]
"""What a callback sees: z (replaceable), values (KV heads not expanded), attention patterns."""
INTERVENTION_KINDS: tuple[InterventionKind, ...] = get_args(InterventionKind)
_SITE_HOOK: dict[InterventionKind, str] = {
    "z": "hook_name",
    "values": "values_hook_name",
    "patterns": "pattern_hook_name",
}
"""The ``AttnSite`` property naming the TransformerLens hook of each kind."""


def hook_name_of(site: AttnSite, kind: InterventionKind) -> str:
    """The TransformerLens hook name at which ``site`` has the activation of ``kind``."""
    return getattr(site, _SITE_HOOK[kind])


@dataclass
class Interventions:
    """Per-layer callbacks for a forward pass, in TransformerLens shapes; a backend applies
    them in order (a returned z replaces the one the next callback and the model see).

    z ``[batch, pos, n_heads, d_head]`` (as the model computes it), values
    ``[batch, pos, n_kv_heads, d_head]``, patterns ``[batch, n_heads, q, k]``.
    """

    z: dict[int, list[ActivationFn]] = field(default_factory=dict)
    values: dict[int, list[ActivationFn]] = field(default_factory=dict)
    patterns: dict[int, list[ActivationFn]] = field(default_factory=dict)

    def add(self, kind: InterventionKind, layer: int, fn: ActivationFn) -> None:
        getattr(self, kind).setdefault(layer, []).append(fn)

    def merged(self, other: Interventions) -> Interventions:
        out = Interventions()
        for source in (self, other):
            for kind in INTERVENTION_KINDS:
                for layer, fns in getattr(source, kind).items():
                    getattr(out, kind).setdefault(layer, []).extend(fns)
        return out

    def items(self) -> Iterator[tuple[InterventionKind, int, ActivationFn]]:
        """Every ``(kind, layer, fn)``, in the order they were added per layer and kind."""
        for kind in INTERVENTION_KINDS:
            for layer, fns in getattr(self, kind).items():
                for fn in fns:
                    yield kind, layer, fn

    @property
    def layers(self) -> list[int]:
        return sorted({*self.z, *self.values, *self.patterns})


def expand_kv_heads(
    values: Float[Tensor, " batch pos n_kv_heads d_head"], site: AttnSite
) -> Float[Tensor, " batch pos n_heads d_head"]:
    """Give each query head the values of the KV head it reads (``kv(h) = h // group_size``)."""
    if values.shape[-2] == site.n_heads:
        return values
    return values.repeat_interleave(site.group_size, dim=-2)


def check_convention(convention: str) -> ValueBiasConvention:
    """Return ``convention`` if it is a value-bias convention, else raise ``ValueError``."""
    if convention not in VALUE_BIAS_CONVENTIONS:
        raise ValueError(
            f"unknown value-bias convention {convention!r}; valid: {list(VALUE_BIAS_CONVENTIONS)}"
        )
    return convention  # type: ignore[return-value]


class AttnBackend(ABC):
    """A model seen as a stack of attention sites that can be captured and spliced.

    Hooks live only inside the context managers ``capturing`` and ``splicing``, which remove them
    on exit, exceptions included.
    """

    name: str
    """Short backend name used in messages and metadata."""
    model: Any

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of attention layers."""

    @property
    def hf_architecture_name(self) -> str | None:
        """The model's Hugging Face class in ``HF_ARCHITECTURES``, when it has one."""
        return None

    @property
    def native_convention(self) -> ValueBiasConvention:
        """The convention of z as this model computes it: ``"included"`` if it holds a non-zero
        b_V, else ``"folded"`` (folded away, or a model without value biases)."""
        biases = (self.value_bias(self.site(layer)) for layer in range(self.n_layers))
        return "included" if any(bool(b.abs().max() > 0) for b in biases) else "folded"

    @abstractmethod
    def site(self, layer: int) -> AttnSite:
        """The attention site of ``layer``; raises ``ValueError`` when it is out of range."""

    @abstractmethod
    def value_bias(self, site: AttnSite) -> Float[Tensor, " n_heads d_head"]:
        """b_V per query head as the model holds it now (zeros if the model has none or folded it)."""

    @abstractmethod
    def intervening(self, plan: Interventions) -> AbstractContextManager[None]:
        """Apply ``plan`` to the forward passes inside the block; always removed on exit."""

    @contextmanager
    def capturing(
        self,
        sites: Iterable[AttnSite],
        *,
        pattern: bool = False,
        values: bool = False,
        convention: ValueBiasConvention = "folded",
    ) -> Iterator[Captures]:
        """Collect z (and optionally patterns and values) at ``sites`` during forward passes."""
        convention = self._deliverable(convention)
        sites = [self._own(site) for site in sites]
        # Value biases are read only where they are subtracted: a model on the meta device
        # (nnsight's remote runs) has none to read, and captures in its own convention.
        biases = self.value_biases(sites) if convention == "folded" else {}
        captures = Captures(sites, biases, convention)
        plan = Interventions()
        for site in sites:
            plan.add("z", site.layer, saver(captures.raw, (site.layer, "z")))
            if pattern:
                plan.add("patterns", site.layer, saver(captures.raw, (site.layer, "pattern")))
            if values:
                plan.add("values", site.layer, saver(captures.raw, (site.layer, "values")))
        with self.intervening(plan):
            yield captures

    @contextmanager
    def splicing(
        self,
        replacements: Mapping[AttnSite, ZReplacement],
        *,
        convention: ValueBiasConvention = "folded",
    ) -> Iterator[None]:
        """Replace z at each site by ``fn(z)`` during forward passes; ``z`` in ``convention``."""
        convention = self._deliverable(convention)
        plan = Interventions()
        for site, replace in replacements.items():
            bias = self.value_bias(self._own(site)) if convention == "folded" else None
            plan.add("z", site.layer, splicer(replace, bias))
        with self.intervening(plan):
            yield

    @abstractmethod
    def out_proj_weight(self, layer: int) -> Float[Tensor, " d_in d_model"]:
        """W_O of ``layer`` as the model holds it now, heads concatenated head-major
        (``[n_heads * d_head, d_model]``): ``z_cat @ W_O`` is the attention output before b_O.

        Raises:
            ValueError: ``layer`` is out of range.
        """

    @abstractmethod
    def unembed(self) -> Float[Tensor, " d_model d_vocab"]:
        """W_U as the model holds it now: ``resid @ W_U`` are the logits, with no final norm and
        no unembedding bias applied.

        Raises:
            ValueError: the model has no unembedding (no LM head).
        """

    @abstractmethod
    def forward(
        self,
        tokens: Int[Tensor, " batch pos"],
        *,
        stop_at_layer: int | None = None,
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Float[Tensor, " batch pos d_vocab"] | None:
        """Run the model on ``tokens`` and return its logits; with ``stop_at_layer=n``, stop once
        layers ``0..n-1`` have given what the active captures need, and return ``None``."""

    @property
    def has_mlp(self) -> bool:
        """Whether each block adds an MLP output to the residual stream (``False``: the stream
        changes between layers by the attention output alone)."""
        return True

    def attn_norm(self, layer: int) -> AttnNorm | None:
        """The norm whose output the values of ``layer`` read, or ``None`` where they read the
        residual stream itself (no norm, or one that follows attention: post-LN).

        Raises:
            UnsupportedModelError: the backend does not read it.
        """
        raise self._unsupported("attention norms")

    def values_weight(self, layer: int) -> Float[Tensor, " n_heads d_model d_head"]:
        """W_V of ``layer`` per query head (grouped KV heads expanded) as the model holds it now:
        head h's values are ``(γ ⊙ P x / σ) @ W_V[h] + value_bias[h]`` (``attn_norm``).

        Raises:
            UnsupportedModelError: the backend does not read it, or no module holds W_V alone.
        """
        raise self._unsupported("value weights")

    def out_proj_bias(self, layer: int) -> Float[Tensor, " d_model"]:
        """b_O of ``layer`` as the model holds it now (zeros where it has none):
        ``z_cat @ out_proj_weight(layer) + b_O`` is what the attention adds to the residual.

        Raises:
            UnsupportedModelError: the backend does not read it.
        """
        raise self._unsupported("output-projection biases")

    @torch.no_grad()
    def capture_residual(self, tokens: Int[Tensor, " batch pos"], top: int) -> ResidualCapture:
        """One forward pass, stopped after layer ``top``'s attention, read as the parts of the
        residual stream (``ResidualCapture``) with z, patterns and values of layers ``0..top``.

        Raises:
            ValueError: ``top`` is out of range.
            UnsupportedModelError: the backend does not read the residual stream, or the
                model's is not read this way (the message says why and what would serve).
        """
        sites = [self.site(layer) for layer in range(self.site(top).layer + 1)]
        store: dict[ResidualKey, Tensor] = {}
        hooks = list(self._residual_hooks(sites, store))  # refusals come before the pass
        convention = self.native_convention  # z as the model computes it
        with (
            self.capturing(sites, pattern=True, values=True, convention=convention) as attention,
            forward_hooks(hooks),
        ):
            self.forward(tokens, stop_at_layer=top + 1)

        def read(kind: ResidualKind, layer: int) -> Tensor:
            if (kind, layer) not in store:
                raise RuntimeError(
                    f"the forward pass gave no {kind} of layer {layer} on backend {self.name!r}: "
                    "its residual hooks did not fire"
                )
            return store[kind, layer]

        resid = tuple(read("resid_pre", site.layer) for site in sites)
        scales = tuple(
            read("norm_scale", site.layer).reshape(x.shape[:-1])  # TransformerLens: [b, pos, 1]
            if self.attn_norm(site.layer) is not None
            else torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
            for site, x in zip(sites, resid, strict=True)
        )
        position = store.get(("position_embedding", 0))
        return ResidualCapture(
            resid_pre=resid,
            norm_scale=scales,
            attn_out=tuple(read("attn_out", site.layer) for site in sites[:-1]),
            position_embedding=None if position is None else position.expand_as(resid[0]),
            attention=attention,
        )

    def _residual_hooks(
        self, sites: Sequence[AttnSite], store: dict[ResidualKey, Tensor]
    ) -> Iterable[tuple[nn.Module, TorchForwardHook]]:
        """Torch forward hooks that put ``capture_residual``'s reads of ``sites`` (layers
        ``0..top``) into ``store``; raises ``UnsupportedModelError`` where the model's residual
        stream cannot be read as a sum of parts."""
        raise self._unsupported("the residual stream")

    def residual_unsupported(self, why: str) -> UnsupportedModelError:
        """The error for a model whose residual stream cannot be split into the parts that
        ``capture_residual`` reads (``why``: a clause about the model), saying what would serve."""
        model = self.hf_architecture_name or type(self.model).__name__
        return UnsupportedModelError(
            f"the residual stream of this {model} cannot be split into parts (backend "
            f"{self.name!r}): {why}. Recursive DFA splits pre-norm models whose residual stream "
            "is the sum of the embeddings and of each layer's attention and MLP outputs, with a "
            "LayerNorm or an RMSNorm (with gain γ) before attention, e.g. GPT-2, GPT-NeoX, "
            "Llama, Mistral or Qwen2, as HookedTransformers, TransformerBridges or Hugging Face "
            "models"
        )

    def _unsupported(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"backend {self.name!r} ({type(self).__name__}) does not read {what}; the "
            "transformer_lens, bridge and nnsight backends do (HookedTransformer, "
            "TransformerBridge and Hugging Face models)"
        )

    def value_biases(self, sites: Iterable[AttnSite]) -> dict[int, Tensor]:
        """b_V per head for every site, keyed by layer."""
        return {site.layer: self.value_bias(site) for site in sites}

    @torch.no_grad()
    def capture(
        self,
        tokens: Int[Tensor, " batch pos"],
        sites: Iterable[AttnSite],
        *,
        pattern: bool = False,
        values: bool = False,
        convention: ValueBiasConvention = "folded",
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Captures:
        """One forward pass, stopped after the last layer needed, capturing every site."""
        sites = list(sites)
        if not sites:
            raise ValueError("capture needs at least one AttnSite, got none")
        with self.capturing(sites, pattern=pattern, values=values, convention=convention) as caps:
            self.forward(
                tokens,
                stop_at_layer=max(s.layer for s in sites) + 1,
                attention_mask=attention_mask,
            )
        return caps

    def _deliverable(self, convention: str) -> ValueBiasConvention:
        """``convention`` if z can be delivered in it on this model, else ``ValueError``; every
        backend checks that it is a value-bias convention, some also refuse one they cannot
        restore."""
        return check_convention(convention)

    def _site_like(self, heads: AttnSite, layer: int) -> AttnSite:
        """The site of ``layer`` (checked against ``n_layers``) with the heads of ``heads``,
        for a model whose layers all have the same heads."""
        return dataclasses.replace(heads, layer=check_layer(layer, self.n_layers))

    def _own(self, site: AttnSite) -> AttnSite:
        """``site`` if it is one of this model's sites, else a clear error."""
        mine = self.site(site.layer)
        if mine != site:
            raise ValueError(
                f"{site} does not belong to this model, whose layer {site.layer} is {mine}"
            )
        return site
