"""TransformerLens backend: hook_z, hook_pattern and hook_v of a HookedTransformer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from sae_lens_attn.backends.architectures import HF_ARCHITECTURES
from sae_lens_attn.backends.base import (
    ActivationFn,
    AttnBackend,
    Interventions,
    TorchForwardHook,
    forward_hooks,
    hook_name_of,
)
from sae_lens_attn.site import AttnSite, check_layer


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

    @torch.no_grad()
    def value_bias(self, site: AttnSite) -> Float[Tensor, " n_heads d_head"]:
        """``b_V + β·W_V`` per query head, β the bias of ``ln1`` where it still has one (a model
        loaded without ``fold_ln``); ``from_pretrained``'s processing leaves zeros."""
        block = self.model.blocks[site.layer]
        # `b_V` and `W_V` expand grouped KV heads to query heads on GroupedQueryAttention.
        bias = block.attn.b_V.detach()
        ln_bias = getattr(block.ln1, "b", None)
        if ln_bias is None:
            return bias
        return bias + torch.einsum("m,hmd->hd", ln_bias.to(bias.dtype), block.attn.W_V)

    def out_proj_weight(self, layer: int) -> Float[Tensor, " d_in d_model"]:
        site = self.site(layer)
        return self.model.blocks[site.layer].attn.W_O.detach().flatten(0, 1)  # (H·D, M)

    def unembed(self) -> Float[Tensor, " d_model d_vocab"]:
        unembed = getattr(self.model, "unembed", None)
        if unembed is None:
            raise ValueError(
                f"{type(self.model).__name__} has no unembed module, so it has no W_U to read "
                "logits from; a HookedTransformer built with an unembedding is needed"
            )
        return unembed.W_U.detach()

    @contextmanager
    def intervening(self, plan: Interventions) -> Iterator[None]:
        """Attach the plan's callbacks to hook points as forward hooks; always detach them."""
        hook_points: dict[str, nn.Module] = self.model.hook_dict  # type: ignore[assignment]
        hooks = (
            (hook_points[hook_name_of(self.site(layer), kind)], _as_torch_hook(fn))
            for kind, layer, fn in plan.items()
        )
        with forward_hooks(hooks):
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


def _as_torch_hook(fn: ActivationFn) -> TorchForwardHook:
    return lambda _module, _inputs, output: fn(output)
