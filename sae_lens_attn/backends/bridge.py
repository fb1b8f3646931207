"""TransformerBridge backend: z, patterns and values of TransformerLens 3's bridge over an HF model.

``TransformerBridge`` wraps a Hugging Face model in bridge components and names their hook points
as TransformerLens does. Each attention component ``blocks.L.attn`` declares its own aliases
(``hook_z`` → ``o.hook_in``, ``hook_v`` → ``v.hook_out``); this backend resolves them on the
component, not through ``bridge.hook_dict``, so it also works on SAELens's
``SAETransformerBridge``, whose ``hook_dict`` drops the aliases. It attaches plain torch forward
hooks and reshapes the raw tensors itself (``[batch, pos, n_heads * d_head]`` →
``[batch, pos, n_heads, d_head]``), so it does not depend on the hook points' reshaping rule
either, which SAELens's ``reset_saes()`` discards.

Value-bias convention, as measured on the tiny GPT-2, Llama and GPT-NeoX test models: a bridge
booted by ``boot_transformers`` runs the HF weights unprocessed, so its z is the HF ``o_proj``
input and carries ``b_V' = b_V + β·W_V`` (``"included"``). ``enable_compatibility_mode()`` folds
LayerNorm and value biases (``fold_ln``, ``fold_value_biases``): z then lacks exactly ``b_V'``
(≤ 2e-6) and is ``"folded"``. ``value_bias`` returns what is still in z (the values of a zero
residual stream through the bridge's own ``ln1`` and ``attn.v``), so both conventions convert
exactly, except ``"included"`` on a bridge that folded its value biases away: that is refused.

SAELens's ``SAETransformerBridge`` loses ``hook_z`` (and every other alias), and after
``reset_saes()`` leaves the hook point it spliced at flattened and misnamed; ``sae_bridge`` boots
one with these worked around (see ``docs/upstream.md`` for the upstream fix).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens.analysis.hooked_sae_transformer import set_deep_attr
from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
    TransformerBridge,  # TransformerLens >= 3 only: this module is imported only for bridges
)

from sae_lens_attn.backends.architectures import HF_ARCHITECTURES, HFArchitecture
from sae_lens_attn.backends.base import (
    ActivationFn,
    AttnBackend,
    AttnNorm,
    InterventionKind,
    Interventions,
    ResidualKey,
    TorchForwardHook,
    UnsupportedModelError,
    expand_kv_heads,
    forward_hooks,
    hook_name_of,
    keep_output,
    residual_hook_names,
)
from sae_lens_attn.site import AttnSite, ValueBiasConvention


class BridgeBackend(AttnBackend):
    """Captures and splices z on a ``transformer_lens.model_bridge.TransformerBridge``.

    Args:
        bridge: a bridge over a decoder-only model (``bridge.blocks[L].attn``), plain or
            SAELens's ``SAETransformerBridge``, with or without compatibility mode.

    Raises:
        TypeError: ``bridge`` is not a ``TransformerBridge``.
        ValueError: the bridge has no ``blocks`` with an ``attn`` component, or its heads do
            not form whole grouped-query groups.
    """

    name = "bridge"

    def __init__(self, bridge: TransformerBridge) -> None:
        if not isinstance(bridge, TransformerBridge):
            raise TypeError(
                f"BridgeBackend needs a transformer_lens.model_bridge.TransformerBridge, got "
                f"{type(bridge).__module__}.{type(bridge).__qualname__}"
            )
        blocks = getattr(bridge, "blocks", None)
        if blocks is None or not all(hasattr(block, "attn") for block in blocks):
            raise ValueError(
                f"the {bridge.cfg.architecture} bridge has no decoder blocks with an attention "
                "component (bridge.blocks[L].attn), which hook_z SAEs read; encoder-decoder "
                "and block-list variants (encoder_blocks, L_blocks, ...) are not supported"
            )
        self.model = bridge
        cfg = bridge.cfg
        self._n_layers = len(blocks)
        # AttnSite validates the head structure (whole grouped-query groups)
        self._heads = AttnSite(
            layer=0,
            n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            d_head=_z_head_width(blocks[0].attn, cfg.n_heads) or cfg.d_head,
        )
        self.site(0)  # a bridge without blocks has no site
        self._probing = False

    @property
    def tokenizer(self) -> Any:
        """The bridge's tokenizer, for callers that tokenize text."""
        return self.model.tokenizer

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def hf_architecture_name(self) -> str | None:
        names = [type(self.model.original_model).__name__, self.model.cfg.architecture]
        return next((name for name in names if name in HF_ARCHITECTURES), None)

    @property
    def native_convention(self) -> ValueBiasConvention:
        """``"included"`` where the model has value biases in z (a bridge as booted), else
        ``"folded"`` (compatibility mode folded them, or the model has none). Where the folded
        convention is undefined (attention sinks, ...), ``"included"``: z as computed."""
        if self._folded_refusal() is not None:
            return "included"
        return super().native_convention

    def site(self, layer: int) -> AttnSite:
        return self._site_like(self._heads, layer)

    @torch.no_grad()
    def value_bias(self, site: AttnSite) -> Float[Tensor, " n_heads d_head"]:
        """What of ``b_V' = b_V + β·W_V`` is still in z, per query head: the values of a zero
        residual stream through the block's ``ln1`` and ``attn.v`` as the bridge runs them now
        (``b_V'`` as booted, zeros once compatibility mode has folded the value biases; a
        post-LN model's values read the residual itself, without ``ln1``).

        Raises:
            ValueError: the folded convention is undefined for the architecture (attention
                sinks, latent values), or the attention component has no ``v`` projection.
        """
        refusal = self._folded_refusal()
        if refusal is not None:
            raise ValueError(
                f"the 'folded' value-bias convention is undefined for {self.hf_architecture_name}: "
                f"{refusal}. Valid here: convention='included' (z as the model computes it)"
            )
        block = self.model.blocks[site.layer]
        values = getattr(block.attn, "v", None)
        if values is None:
            raise ValueError(
                f"the attention of {site.hook_name} has no value projection attn.v, so its value "
                "bias b_V' cannot be read and z cannot be delivered in the 'folded' convention; "
                "use convention='included'"
            )
        param = next(self.model.parameters())
        residual = torch.zeros(1, 1, self.model.cfg.d_model, device=param.device, dtype=param.dtype)
        with self._probe():  # our own hooks must not record this pass
            normed = block.ln1(residual) if self._norm_feeds_values() else residual
            out = values(normed)
        per_kv_head = _split_heads(out, site.n_kv_heads, site.d_head, site.values_hook_name)
        return expand_kv_heads(per_kv_head[0, 0], site)

    def out_proj_weight(self, layer: int) -> Float[Tensor, " d_in d_model"]:
        site = self.site(layer)
        return self.model.blocks[site.layer].attn.W_O.detach().flatten(0, 1)  # (H·D, M)

    @property
    def has_mlp(self) -> bool:
        return not self.model.cfg.attn_only and all(
            hasattr(block, "mlp") for block in self.model.blocks
        )

    def attn_norm(self, layer: int) -> AttnNorm | None:
        """``ln1``: the gain of the norm it wraps (ones where it has none, or compatibility mode
        folded it), centring for the bridge's ``LN``/``LNPre`` normalisation; ``None`` without
        one, or where the values read the residual itself (post-LN)."""
        site = self.site(layer)
        kind = self.model.cfg.normalization_type
        norm = getattr(self.model.blocks[site.layer], "ln1", None)
        if kind is None or norm is None or not self._norm_feeds_values():
            return None
        gain = getattr(getattr(norm, "original_component", None), "weight", None)
        weight = torch.ones_like(self.out_proj_bias(layer)) if gain is None else gain.detach()
        return AttnNorm(weight=weight, centres=kind in ("LN", "LNPre"))

    def values_weight(self, layer: int) -> Float[Tensor, " n_heads d_model d_head"]:
        """``blocks.L.attn.W_V`` (the bridge reads it from the wrapped values projection, fused
        or not), grouped KV heads expanded."""
        site = self.site(layer)
        weight = getattr(self.model.blocks[site.layer].attn, "W_V", None)
        if weight is None:
            raise UnsupportedModelError(
                f"the {self.model.cfg.architecture} bridge's attention at layer {site.layer} "
                f"gives no W_V (backend {self.name!r}); bridges whose attention wraps a value "
                "projection (attn.v) do"
            )
        return expand_kv_heads(weight.detach().transpose(0, 1), site).transpose(0, 1)

    def out_proj_bias(self, layer: int) -> Float[Tensor, " d_model"]:
        site = self.site(layer)
        bias = self.model.blocks[site.layer].attn.b_O
        if bias is None:  # an output projection without bias
            return torch.zeros_like(self.out_proj_weight(layer)[0])
        return bias.detach()

    def unembed(self) -> Float[Tensor, " d_model d_vocab"]:
        if getattr(self.model, "unembed", None) is None:
            raise ValueError(
                f"this {type(self.model).__name__} has no unembed component, so it has no W_U "
                "to read logits from; boot it over a causal LM with an LM head"
            )
        return self.model.W_U.detach()

    @contextmanager
    def intervening(self, plan: Interventions) -> Iterator[None]:
        """Attach the plan's callbacks as forward hooks on the attention's hook points (resolved
        through its aliases: ``hook_z`` is ``o.hook_in``); always detach them."""
        with forward_hooks(self._forward_hooks(plan)):
            yield

    def forward(
        self,
        tokens: Int[Tensor, " batch pos"],
        *,
        stop_at_layer: int | None = None,
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Float[Tensor, " batch pos d_vocab"] | None:
        """The bridge's forward; with an attention mask it derives position ids from it, so
        left-padded rows see the positions they would see alone.

        The bridge stops at the start of block ``stop_at_layer``; there is none after the last
        block, so ``stop_at_layer=n_layers`` is stopped here once the last block has run
        (the bridge alone would run ``ln_final`` and the unembedding, on GPT-2 small as much
        compute as five layers)."""
        if stop_at_layer is None:
            return self.model(tokens, return_type="logits", attention_mask=attention_mask)
        last_block = self.model.blocks[-1] if stop_at_layer == self._n_layers else None
        handle = None if last_block is None else last_block.register_forward_hook(_stop_here)
        try:
            self.model(
                tokens, return_type=None, stop_at_layer=stop_at_layer, attention_mask=attention_mask
            )
        except _AfterLastBlock:
            pass
        finally:
            if handle is not None:
                handle.remove()
        return None

    def _forward_hooks(self, plan: Interventions) -> Iterator[tuple[nn.Module, TorchForwardHook]]:
        """Each callback of ``plan`` as a torch forward hook, with the module it goes on."""
        for kind, layer, fn in plan.items():
            site = self.site(layer)
            yield self._hook_point(site, kind), self._torch_hook(kind, site, fn)

    def _hook_point(self, site: AttnSite, kind: InterventionKind) -> nn.Module:
        """The module at the attention's hook of ``kind`` (a ``HookPoint``, or the SAE wrapper
        that SAELens put in its place)."""
        return self._hook_module(hook_name_of(site, kind))

    def _hook_module(self, hook_name: str) -> nn.Module:
        """The module at a TransformerLens hook name, resolved through the aliases of the
        component that owns it (``blocks.L.attn.hook_z`` is ``blocks.L.attn.o.hook_in``,
        ``blocks.L.hook_resid_pre`` is ``blocks.L.hook_in``), not through ``hook_dict``.

        Raises:
            ValueError: the bridge has no such hook (the message lists the owner's hooks).
        """
        owner_path, _, alias = hook_name.rpartition(".")
        try:
            owner: Any = self.model.get_submodule(owner_path) if owner_path else self.model
        except AttributeError:
            owner = None
        aliases = getattr(owner, "hook_aliases", None) or {}
        target = aliases.get(alias, alias)
        for path in [target] if isinstance(target, str) else target:
            try:
                return owner.get_submodule(path)
            except AttributeError:
                continue
        hooks = sorted(owner.get_hooks()) if hasattr(owner, "get_hooks") else []
        raise ValueError(
            f"the {self.model.cfg.architecture} bridge has no {hook_name} (looked for "
            f"{target!r} in {owner_path or 'the bridge'}), so it cannot be read there; the "
            f"hooks there: {hooks}"
        )

    def _residual_hooks(
        self, sites: Sequence[AttnSite], store: dict[ResidualKey, Tensor]
    ) -> list[tuple[nn.Module, TorchForwardHook]]:
        """The bridge's own hook points (``hook_resid_pre``, ``ln1.hook_scale``,
        ``hook_attn_out``, ``hook_pos_embed``), refused where the architecture row says its
        residual stream is not a sum of parts read through ``ln1``."""
        arch = self._arch()
        refusal = None if arch is None else arch.residual_refusal(self.model.original_model.config)
        if refusal is not None:
            raise self.residual_unsupported(refusal)
        names = residual_hook_names(
            sites,
            norm=self.attn_norm(sites[0].layer) is not None,
            positions=self.model.cfg.positional_embedding_type == "standard",
        )
        return [
            (self._hook_module(name), self._quiet(keep_output(store, key))) for key, name in names
        ]

    def _quiet(self, hook: TorchForwardHook) -> TorchForwardHook:
        """``hook``, silent while ``value_bias`` runs bridge components itself."""

        def quiet(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            return None if self._probing else hook(module, inputs, output)

        return quiet

    def _torch_hook(
        self, kind: InterventionKind, site: AttnSite, fn: ActivationFn
    ) -> TorchForwardHook:
        """A torch forward hook giving ``fn`` the activation in TransformerLens shape; a z that
        ``fn`` returns goes back into the model in the raw layout."""
        heads = site.n_kv_heads if kind == "values" else site.n_heads
        name = hook_name_of(site, kind)

        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
            if self._probing:
                return None
            if kind == "patterns":
                fn(_pattern(output, site))
                return None
            new = fn(_split_heads(output, heads, site.d_head, name))
            if kind != "z" or new is None:
                return None
            return new.reshape(output.shape)

        return hook

    @contextmanager
    def _probe(self) -> Iterator[None]:
        """Silence this backend's hooks while ``value_bias`` runs bridge components itself."""
        before, self._probing = self._probing, True
        try:
            yield
        finally:
            self._probing = before

    def _deliverable(self, convention: str) -> ValueBiasConvention:
        """``convention``, refusing ``"included"`` where compatibility mode folded the value
        biases away."""
        convention = super()._deliverable(convention)
        if convention == "included" and self._value_biases_folded_away():
            raise ValueError(
                "z was asked for in the 'included' value-bias convention (z with b_V + β·W_V, "
                "as an SAE recording value_bias_convention='included' was trained on), but this "
                f"{type(self.model).__name__} runs in compatibility mode with its value biases "
                "folded into b_O (enable_compatibility_mode() folds them by default), so its z is "
                "in the 'folded' convention and b_V + β·W_V cannot be restored. Valid on this "
                "bridge: convention='folded'. For an 'included' SAE, use a bridge without "
                "enable_compatibility_mode(), or with enable_compatibility_mode("
                "fold_value_biases=False)"
            )
        return convention

    def _value_biases_folded_away(self) -> bool:
        """Whether compatibility mode removed value biases that the model's modules hold: a
        bias parameter in ``attn.v`` or ``ln1`` while nothing of ``b_V'`` is left in z."""
        if not self.model.compatibility_mode:
            return False
        modules = [m for b in self.model.blocks for m in (getattr(b.attn, "v", None), b.ln1)]
        holds_biases = any(
            name.endswith("bias")
            for module in modules
            if module is not None
            for name, _ in module.named_parameters()
        )
        return holds_biases and self.native_convention == "folded"

    def _arch(self) -> HFArchitecture | None:
        name = self.hf_architecture_name
        return None if name is None else HF_ARCHITECTURES[name]

    def _folded_refusal(self) -> str | None:
        arch = self._arch()
        return None if arch is None else arch.folded_refusal(self.model.original_model.config)

    def _norm_feeds_values(self) -> bool:
        """Pre-LN (``ln1`` feeds the values) unless the architecture row says otherwise."""
        arch = self._arch()
        return arch is None or arch.norm_feeds_values(self.model.original_model.config)


class _AfterLastBlock(Exception):
    """Stops a ``stop_at_layer=n_layers`` pass once the last block has run."""


def _stop_here(_module: nn.Module, _inputs: Any, _output: Any) -> None:
    raise _AfterLastBlock


def _z_head_width(attn: Any, n_heads: int) -> int | None:
    """Width of a head's z: the input width of the wrapped output projection over ``n_heads``
    (None where the bridge exposes none). ``cfg.d_head`` is the query/key width, which multi-head
    latent attention (DeepSeek-V2/V3: z holds ``v_head_dim`` per head) does not share."""
    projection = getattr(getattr(attn, "o", None), "original_component", None)
    weight = getattr(projection, "weight", None)
    if weight is None:
        return None
    # Linear has in_features; GPT-2's Conv1D stores its weight as [in, out]
    width = getattr(projection, "in_features", None) or weight.shape[0]
    return width // n_heads if width % n_heads == 0 else None


def _split_heads(
    raw: Float[Tensor, " batch pos width"], heads: int, d_head: int, hook_name: str
) -> Float[Tensor, " batch pos heads d_head"]:
    """``[batch, pos, heads * d_head]`` (or already ``[batch, pos, heads, d_head]``) per head."""
    if raw.ndim == 4 and raw.shape[-2:] == (heads, d_head):
        return raw
    if raw.ndim != 3 or raw.shape[-1] != heads * d_head:
        raise RuntimeError(
            f"{hook_name} on the bridge gave shape {tuple(raw.shape)}; expected [batch, pos, "
            f"{heads * d_head}] or [batch, pos, {heads}, {d_head}] ({heads} heads of {d_head})"
        )
    return raw.unflatten(-1, (heads, d_head))


def _pattern(raw: Tensor, site: AttnSite) -> Float[Tensor, " batch n_heads q k"]:
    if raw.ndim != 4 or raw.shape[1] != site.n_heads:
        raise RuntimeError(
            f"{site.pattern_hook_name} on the bridge gave shape {tuple(raw.shape)}; expected "
            f"[batch, {site.n_heads}, q, k]"
        )
    return raw


class HookZSAETransformerBridge(SAETransformerBridge):
    """SAELens's ``SAETransformerBridge`` with its hook_z bugs worked around (SAELens 6.54.12).

    - ``hook_dict`` keeps ``TransformerBridge``'s aliases (``blocks.L.attn.hook_z``,
      ``hook_v``, ...): SAELens's override lists the registry only, so ``run_with_cache`` and
      ``run_with_hooks`` on ``hook_z`` silently see nothing, and SAELens's ``ActivationsStore``
      finds no ``hook_z``.
    - removing an SAE (``reset_saes``, the end of ``run_with_saes``) puts back the hook point
      the SAE replaced. SAELens puts a new ``HookPoint()`` there, without the reshaping rule (so
      ``o.hook_in``, i.e. ``hook_z``, stays flattened ``[batch, pos, d_in]``) and renamed
      ``"hook_in"`` by the bridge component it is set on (so ``run_with_hooks`` on it by name
      silently adds nothing).
    - an SAE on hook_z that an inner ``saes()`` context (or ``run_with_saes``) puts back gets its
      hook_z reshaping turned on again when it is finally removed: SAELens leaves it off, so the
      SAE no longer takes ``[..., n_heads, d_head]`` input.

    Boot one with ``sae_bridge``. The upstream fix is in ``docs/upstream.md``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replaced_hook_points: dict[str, HookPoint] = {}

    @classmethod
    def boot_transformers(  # type: ignore[override]
        cls, model_name: str, **kwargs: Any
    ) -> HookZSAETransformerBridge:
        bridge: Any = super().boot_transformers(model_name, **kwargs)  # re-classes the bridge
        bridge._replaced_hook_points = {}
        return bridge

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        hooks = super().hook_dict
        self._add_aliases_to_hooks(hooks)
        return hooks

    def add_sae(self, sae: Any, use_error_term: bool | None = None) -> None:
        target = self._resolve_hook_name(
            sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name
        )
        point = self._hook_registry.get(target)
        super().add_sae(sae, use_error_term=use_error_term)
        if isinstance(point, HookPoint) and self._hook_registry.get(target) is not point:
            self._replaced_hook_points.setdefault(target, point)
        wrapper = self._acts_to_saes.get(sae.cfg.metadata.hook_name)
        if wrapper is not None and wrapper.sae is sae and sae.cfg.reshape_activations == "hook_z":
            # SAELens marks it only when it turned the SAE's reshaping off itself, so an SAE put
            # back by an inner saes() context (already off) would stay off for good.
            wrapper.bridge_disabled_hook_z_reshaping = True  # pyright: ignore[reportArgumentType]

    def _reset_sae(self, act_name: str, prev_wrapper: Any = None) -> None:
        target = self._transcoder_output_hooks.get(act_name) or self._resolve_hook_name(act_name)
        super()._reset_sae(act_name, prev_wrapper)
        original = self._replaced_hook_points.get(target)
        if original is None or not isinstance(self._hook_registry.get(target), HookPoint):
            return  # nothing replaced here, or an SAE (prev_wrapper) is attached there again
        set_deep_attr(self, target, original)
        original.name = target  # set_deep_attr renamed it to its attribute name
        self._hook_registry[target] = original
        del self._replaced_hook_points[target]


def sae_bridge(model_name: str, **boot_kwargs: Any) -> HookZSAETransformerBridge:
    """SAELens's ``SAETransformerBridge.boot_transformers(model_name, **boot_kwargs)``, with
    ``hook_z`` kept in ``hook_dict``, and the hook points SAEs replaced put back as they were
    (shape and name) when the SAEs are removed.

    Args:
        model_name: the name ``TransformerBridge.boot_transformers`` takes (a Hub id, or any
            name with ``hf_model=``).
        boot_kwargs: ``TransformerBridge.boot_transformers``'s keywords (``hf_model``,
            ``tokenizer``, ``device``, ``dtype``, ...).

    Returns:
        An ``SAETransformerBridge`` (``add_sae``, ``run_with_saes``, ...) on which hook_z
        SAEs train through SAELens's runner and splice back.

    Examples:
        >>> bridge = sae_bridge("gpt2", device="cpu")
        >>> logits = bridge.run_with_saes(tokens, saes=[sae])  # sae on blocks.5.attn.hook_z
    """
    return HookZSAETransformerBridge.boot_transformers(model_name, **boot_kwargs)
