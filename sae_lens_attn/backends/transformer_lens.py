"""TransformerLens backend: hook_z, hook_pattern and hook_v of a HookedTransformer, and its
residual stream through ``hook_resid_pre``, ``ln1.hook_scale``, ``hook_attn_out`` and
``hook_pos_embed``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from sae_lens_attn.backends.architectures import HF_ARCHITECTURES
from sae_lens_attn.backends.base import (
    ActivationFn,
    AttnBackend,
    AttnNorm,
    Interventions,
    ResidualKey,
    TorchForwardHook,
    expand_kv_heads,
    forward_hooks,
    hook_name_of,
    keep_output,
    residual_hook_names,
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

    @property
    def has_mlp(self) -> bool:
        return not self.model.cfg.attn_only

    def attn_norm(self, layer: int) -> AttnNorm | None:
        """``ln1``: its gain ``w`` (ones for ``LNPre``/``RMSPre``, which ``fold_ln`` leaves),
        centring for ``LN``/``LNPre``; ``None`` without normalisation."""
        site = self.site(layer)
        kind = self.model.cfg.normalization_type
        if kind is None:
            return None
        gain = getattr(self.model.blocks[site.layer].ln1, "w", None)
        weight = torch.ones_like(self.out_proj_bias(layer)) if gain is None else gain.detach()
        return AttnNorm(weight=weight, centres=kind in ("LN", "LNPre"))

    def values_weight(self, layer: int) -> Float[Tensor, " n_heads d_model d_head"]:
        site = self.site(layer)
        weight = self.model.blocks[site.layer].attn.W_V.detach()  # (H or KV, M, D)
        return expand_kv_heads(weight.transpose(0, 1), site).transpose(0, 1)

    def out_proj_bias(self, layer: int) -> Float[Tensor, " d_model"]:
        return self.model.blocks[self.site(layer).layer].attn.b_O.detach()

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

    def _residual_hooks(
        self, sites: Sequence[AttnSite], store: dict[ResidualKey, Tensor]
    ) -> list[tuple[nn.Module, TorchForwardHook]]:
        cfg = self.model.cfg
        hook_points: dict[str, nn.Module] = self.model.hook_dict  # type: ignore[assignment]
        names = residual_hook_names(
            sites,
            norm=cfg.normalization_type is not None,
            positions=cfg.positional_embedding_type == "standard",  # added to the stream
        )
        return [(hook_points[name], keep_output(store, key)) for key, name in names]

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
