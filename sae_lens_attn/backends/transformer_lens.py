"""TransformerLens backend: hook_z, hook_pattern and hook_v of a HookedTransformer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from sae_lens_attn.architectures import HF_ARCHITECTURES
from sae_lens_attn.backends.base import (
    ActivationFn,
    AttnBackend,
    Captures,
    ZReplacement,
    check_convention,
    saver,
    splicer,
)
from sae_lens_attn.site import AttnSite, ValueBiasConvention, check_layer

HookFn = ActivationFn


class TransformerLensBackend(AttnBackend):
    """Captures and splices z on a ``HookedTransformer`` through its hook points."""

    name = "transformer_lens"

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def hf_architecture_name(self) -> str | None:
        name = self.model.cfg.original_architecture
        return name if name in HF_ARCHITECTURES else None

    def site(self, layer: int) -> AttnSite:
        cfg = self.model.cfg
        return AttnSite(
            layer=check_layer(layer, cfg.n_layers),
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
            d_head=cfg.d_head,
        )

    def value_bias(self, site: AttnSite) -> Float[Tensor, " n_heads d_head"]:
        # `b_V` expands grouped KV heads to query heads on GroupedQueryAttention.
        return self.model.blocks[site.layer].attn.b_V.detach()

    @contextmanager
    def capturing(
        self,
        sites: Iterable[AttnSite],
        *,
        pattern: bool = False,
        values: bool = False,
        convention: ValueBiasConvention = "folded",
    ) -> Iterator[Captures]:
        sites = [self._own(site) for site in sites]
        captures = Captures(sites, self.value_biases(sites), check_convention(convention))
        hooks: dict[str, HookFn] = {}
        for site in sites:
            hooks[site.hook_name] = saver(captures.raw, (site.layer, "z"))
            if pattern:
                hooks[site.pattern_hook_name] = saver(captures.raw, (site.layer, "pattern"))
            if values:
                hooks[site.values_hook_name] = saver(captures.raw, (site.layer, "values"))
        with self._hooked(hooks):
            yield captures

    @contextmanager
    def splicing(
        self,
        replacements: Mapping[AttnSite, ZReplacement],
        *,
        convention: ValueBiasConvention = "folded",
    ) -> Iterator[None]:
        check_convention(convention)
        hooks: dict[str, HookFn] = {}
        for site, replace in replacements.items():
            bias = self.value_bias(self._own(site)) if convention == "folded" else None
            hooks[site.hook_name] = splicer(replace, bias)
        with self._hooked(hooks):
            yield

    def forward(
        self,
        tokens: Int[Tensor, " batch pos"],
        *,
        stop_at_layer: int | None = None,
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Float[Tensor, " batch pos d_vocab"] | None:
        if stop_at_layer is not None:
            self.model(
                tokens, return_type=None, stop_at_layer=stop_at_layer, attention_mask=attention_mask
            )
            return None
        return self.model(tokens, return_type="logits", attention_mask=attention_mask)

    def _own(self, site: AttnSite) -> AttnSite:
        """``site`` if it is one of this model's sites, else a clear error."""
        mine = self.site(site.layer)
        if mine != site:
            raise ValueError(
                f"{site} does not belong to this model, whose layer {site.layer} is {mine}"
            )
        return site

    @contextmanager
    def _hooked(self, hooks: Mapping[str, HookFn]) -> Iterator[None]:
        """Attach forward hooks to hook points by name; always detach them on exit."""
        hook_points: dict[str, nn.Module] = self.model.hook_dict  # type: ignore[assignment]
        handles = []
        try:
            for name, fn in hooks.items():
                handles.append(hook_points[name].register_forward_hook(_as_torch_hook(fn)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _as_torch_hook(fn: HookFn) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
    return lambda _module, _inputs, output: fn(output)
