"""nnsight backend: z, patterns and values of any Hugging Face causal LM in the architecture table.

z is the input of the attention output projection, read and replaced inside an nnsight trace,
so the same code runs locally and, with ``remote=True``, on NDIF. The residual stream
(``capture_residual``) is read locally only, through torch forward hooks on the modules of the
architecture row (attention norm, attention, position embeddings) during the same traced pass.

Patterns and z always come from one computation: a pass that needs patterns runs the whole
model with eager attention (and, where the architecture row says so, with
``output_attentions=True``, without which OPT, StableLM and Qwen2-MoE return no weights), so its
z is the eager model's. A pass without patterns runs the model's own attention implementation,
so its z is what that model computes. The two can differ: transformers 4.57's SDPA path ignores
Gemma-2's ``attn_logit_softcapping``, so z captured without patterns on an SDPA Gemma-2 is the
SDPA model's z, not the eager one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import reduce
from typing import Any, cast

import nnsight
import torch
from jaxtyping import Float, Int
from nnsight import Envoy
from nnsight.modeling.mixins.remotable import Remotable
from torch import Tensor, nn

from sae_lens_attn.backends.architectures import HF_ARCHITECTURES, hf_architecture
from sae_lens_attn.backends.base import (
    AttnBackend,
    AttnNorm,
    Interventions,
    ResidualKey,
    TorchForwardHook,
    UnsupportedModelError,
    expand_kv_heads,
    keep_output,
)
from sae_lens_attn.site import AttnSite, ValueBiasConvention


class NNsightBackend(AttnBackend):
    """Captures and splices z on a Hugging Face causal LM through nnsight.

    Args:
        model: a ``transformers.PreTrainedModel`` or an nnsight model wrapping one.
        tokenizer: the model's tokenizer, for callers that tokenize text (``sla.hooked``).
        remote: run every trace on NDIF (``model.trace(..., remote=True)``); the code path is
            the same as locally. Needs an nnsight model that names its checkpoint (e.g.
            ``LanguageModel(repo_id)``) and an NDIF API key (see nnsight's documentation).

    Raises:
        ValueError: the architecture is not in the table, its heads do not form whole groups,
            or ``remote=True`` with a model nnsight cannot run remotely.
    """

    name = "nnsight"

    def __init__(self, model: Any, tokenizer: Any = None, *, remote: bool = False) -> None:
        self._lm: Envoy | None = model if isinstance(model, Envoy) else None
        self.model: Any = model._module if isinstance(model, Envoy) else model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if remote and not isinstance(self._lm, Remotable):
            raise ValueError(
                f"remote=True needs an nnsight model that can name its checkpoint for NDIF (a "
                f"{Remotable.__module__}.Remotable such as nnsight.LanguageModel(repo_id)), got "
                f"{type(model).__module__}.{type(model).__qualname__}; pass one, or remote=False"
            )
        self.remote = remote
        self.arch_name = _architecture_name(self.model)
        self.arch = hf_architecture(self.arch_name)
        config = self.model.config
        self._n_heads: int = config.num_attention_heads
        self._n_kv_heads: int = self.arch.n_kv_heads(config, self._n_heads)
        if self._n_heads % self._n_kv_heads:
            raise ValueError(
                f"{type(self.model).__name__} has n_heads={self._n_heads}, not a multiple of "
                f"n_kv_heads={self._n_kv_heads}: grouped-query attention needs whole groups"
            )
        self._n_layers = len(_module_at(self.model, self.arch.layers_path))
        out_proj = _module_at(self.model, self.arch.out_proj_path(0))
        # Linear has in_features; GPT-2's Conv1D stores its weight as [in, out]. d_head is the
        # width of a head's z, the value width (multi-head latent attention: v_head_dim, not
        # the query/key width).
        d_in = getattr(out_proj, "in_features", None) or out_proj.weight.shape[0]
        if d_in % self._n_heads:
            raise ValueError(
                f"z width {d_in} of {type(self.model).__name__} is not a multiple of n_heads={self._n_heads}"
            )
        self._d_head = d_in // self._n_heads
        self._heads = AttnSite(
            layer=0, n_heads=self._n_heads, n_kv_heads=self._n_kv_heads, d_head=self._d_head
        )
        self._active: list[Interventions] = []
        # No pass here decodes further, so a KV cache would only cost copies of k and v.
        self._skip_cache = "use_cache" in inspect.signature(self.model.forward).parameters

    @property
    def lm(self) -> Envoy:
        """The nnsight model: the caller's, or ``nnsight.NNsight`` around a plain model.

        Token ids are all the backend feeds, so a plain model needs no tokenizer. Remote runs
        need an nnsight model that names its checkpoint (e.g. ``LanguageModel(repo_id)``).
        """
        if self._lm is None:
            self._lm = nnsight.NNsight(self.model)
        return self._lm

    @property
    def hf_architecture_name(self) -> str | None:
        return self.arch_name

    @property
    def native_convention(self) -> ValueBiasConvention:
        return "included"  # Hugging Face models never fold b_V away

    @property
    def n_layers(self) -> int:
        return self._n_layers

    def site(self, layer: int) -> AttnSite:
        return self._site_like(self._heads, layer)

    @torch.no_grad()
    def value_bias(self, site: AttnSite) -> Float[Tensor, " n_heads d_head"]:
        """``b_V' = b_V + β·W_V`` per query head: the values of a zero residual stream, whose
        attention norm outputs its bias β (0 for RMSNorm). This is what TransformerLens's
        ``fold_ln`` followed by ``fold_value_biases`` removes from z. A post-LN model's values
        read the residual itself: its ``b_V'`` is ``b_V``.

        Raises:
            ValueError: the folded convention is undefined for the model (attention sinks,
                latent or clamped values, no values module: ``HFArchitecture.folded_refusal``),
                or its weights are on the meta device.
        """
        refusal = self.arch.folded_refusal(self.model.config)
        if refusal is not None:
            raise ValueError(
                f"the 'folded' value-bias convention is undefined for {self.arch_name}: "
                f"{refusal}. Valid here: convention='included' (z as the model computes it)"
            )
        layer = _module_at(self.model, self.arch.layers_path)[site.layer]
        if _on_meta(layer):
            raise ValueError(
                f"{type(self.model).__name__} has its weights on the meta device (as nnsight "
                "builds models for remote runs), so its value biases cannot be read here and z "
                "cannot be delivered in the 'folded' convention; use convention='included', or "
                "load the weights (e.g. LanguageModel(..., dispatch=True))"
            )
        zero = torch.zeros(1, self.model.config.hidden_size, device=self._device, dtype=self._dtype)
        norm = self.arch.values_norm(layer, self.model.config)
        if norm is not None:
            zero = norm(zero)
        out = layer.get_submodule(cast(str, self.arch.values))(zero)  # checked by the refusal
        per_kv_head = self.arch.read_values(out[0], site.n_kv_heads, site.d_head)
        return expand_kv_heads(per_kv_head, site)

    def out_proj_weight(self, layer: int) -> Float[Tensor, " d_in d_model"]:
        """The weight of the architecture row's ``out_proj``, as ``[d_in, d_model]``: a
        ``Linear`` stores ``[out, in]`` (transposed here), GPT-2's ``Conv1D`` ``[in, out]``."""
        site = self.site(layer)
        path = self.arch.out_proj_path(site.layer)
        weight = _weight_in_out(_module_at(self.model, path), path, self.arch_name)
        expected = (site.d_in, self.model.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"W_O of layer {site.layer} has shape {tuple(weight.shape)}, expected "
                f"[n_heads * d_head, d_model] = {list(expected)}"
            )
        return weight

    def out_proj_bias(self, layer: int) -> Float[Tensor, " d_model"]:
        """The bias of the architecture row's ``out_proj`` (zeros where it has none)."""
        site = self.site(layer)
        module = _module_at(self.model, self.arch.out_proj_path(site.layer))
        bias = getattr(module, "bias", None)
        if bias is None:
            return torch.zeros(
                self.model.config.hidden_size, device=self._device, dtype=self._dtype
            )
        return bias.detach()

    def values_weight(self, layer: int) -> Float[Tensor, " n_heads d_model d_head"]:
        """The weight of the architecture row's values module, its values read out of it as the
        layout says (``HFArchitecture.read_values`` on ``[d_model, width]``), grouped KV heads
        expanded.

        Raises:
            UnsupportedModelError: no module computes the values from the normed residual
                alone (no values module, or latent values).
        """
        site = self.site(layer)
        if self.arch.values is None or self.arch.latent_values:
            raise UnsupportedModelError(
                f"{self.arch_name} has no module that computes its values from the normed "
                f"residual stream alone (backend {self.name!r}): "
                f"{self.arch.folded_refusal(self.model.config)}"
            )
        path = self.arch.path(site.layer, self.arch.values)
        weight = _weight_in_out(_module_at(self.model, path), path, self.arch_name)  # (M, width)
        per_kv = self.arch.read_values(weight, site.n_kv_heads, site.d_head)  # (M, KV, D)
        return expand_kv_heads(per_kv, site).transpose(0, 1)

    def attn_norm(self, layer: int) -> AttnNorm | None:
        """The row's attention norm: its ``weight`` (ones where it has none), centring if it
        maps a constant vector where it maps zero (the mean is what it takes away); ``None``
        where the values read the residual itself (post-LN, or no norm before attention)."""
        site = self.site(layer)
        norm = self._values_norm(site.layer)
        if norm is None:
            return None
        zero = torch.zeros(1, self.model.config.hidden_size, device=self._device, dtype=self._dtype)
        with torch.no_grad():
            centres = torch.allclose(norm(zero + 1.0), norm(zero), rtol=1e-3, atol=1e-5)
        gain = getattr(norm, "weight", None)
        weight = torch.ones_like(zero[0]) if gain is None else gain.detach()
        return AttnNorm(weight=weight, centres=centres)

    def _residual_hooks(
        self, sites: Sequence[AttnSite], store: dict[ResidualKey, Tensor]
    ) -> list[tuple[nn.Module, TorchForwardHook]]:
        """Hooks on the attention norm (its input is the residual stream, its output gives σ),
        the attention module (its output is what joins the stream) and the position
        embeddings; refused where the architecture row says the stream is not a sum of parts
        read through the norm, and on NDIF (torch hooks run on local modules only)."""
        refusal = self.arch.residual_refusal(self.model.config)
        if refusal is not None:
            raise self.residual_unsupported(refusal)
        if self.remote:
            raise self.residual_unsupported(
                "its residual stream is read through torch hooks on local modules, which a "
                "remote (NDIF) run does not have; load it here and use remote=False"
            )
        top = sites[-1].layer
        layers = _module_at(self.model, self.arch.layers_path)
        hooks: list[tuple[nn.Module, TorchForwardHook]] = []
        for site in sites:
            norm, spec = self._values_norm(site.layer), self.attn_norm(site.layer)
            assert norm is not None and spec is not None  # the refusal covers models without
            hooks.append((norm, _norm_reader(store, site.layer, spec, _norm_bias(norm))))
            if site.layer < top:
                attn = layers[site.layer].get_submodule(self.arch.attn)
                hooks.append((attn, _first_output(keep_output(store, ("attn_out", site.layer)))))
        if self.arch.position_embeddings is not None:
            module = _module_at(self.model, self.arch.position_embeddings)
            hooks.append((module, keep_output(store, ("position_embedding", 0))))
        return hooks

    def _values_norm(self, layer: int) -> nn.Module | None:
        block = _module_at(self.model, self.arch.layers_path)[layer]
        return self.arch.values_norm(block, self.model.config)

    def unembed(self) -> Float[Tensor, " d_model d_vocab"]:
        """``get_output_embeddings().weight``, transposed to ``[d_model, d_vocab]``."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(
                f"{type(self.model).__name__} has no output embeddings "
                "(get_output_embeddings() is None), so it has no W_U to read logits from; "
                "use its causal-LM class (with an LM head)"
            )
        return head.weight.detach().T

    @contextmanager
    def intervening(self, plan: Interventions) -> Iterator[None]:
        """Apply ``plan`` to every ``forward`` inside the block; always removed on exit."""
        self._check_plan(plan)
        self._active.append(plan)
        try:
            yield
        finally:
            self._active.remove(plan)

    def forward(
        self,
        tokens: Int[Tensor, " batch pos"],
        *,
        stop_at_layer: int | None = None,
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Float[Tensor, " batch pos d_vocab"] | None:
        plan = reduce(Interventions.merged, self._active, Interventions())
        return self.run(tokens, plan, stop_at_layer=stop_at_layer, attention_mask=attention_mask)

    def run(
        self,
        tokens: Int[Tensor, " batch pos"],
        plan: Interventions,
        *,
        stop_at_layer: int | None = None,
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Float[Tensor, " batch pos d_vocab"] | None:
        """One traced forward pass applying ``plan``; logits unless stopped early.

        With an attention mask, position ids count real tokens only, so left-padded rows see
        the positions they would see alone. With patterns in the plan, the whole pass (z
        included) runs with eager attention, and with ``output_attentions=True`` where the
        architecture returns weights only then.
        """
        self._check_plan(plan)
        arch = self.arch
        stops = stop_at_layer is not None
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if plan.patterns and arch.output_attentions:  # weights only when asked (OPT, ...)
            kwargs["output_attentions"] = True
        if self._skip_cache:
            kwargs["use_cache"] = False
        if self.remote:  # only then: nnsight.NNsight passes unknown keywords to the HF forward
            kwargs["remote"] = True
        grad = torch.is_grad_enabled()  # the trace body runs in another thread
        lm, n_kv_heads, d_head, config = self.lm, self._n_kv_heads, self._d_head, self.model.config
        values_module = cast(str, arch.values)  # read only with values in the plan: checked
        result: dict[str, Tensor] = {}
        with (
            self._patterns_available(bool(plan.patterns)),
            lm.trace(tokens, **kwargs) as tracer,
        ):
            result = nnsight.save({})
            with torch.set_grad_enabled(grad):
                for layer in plan.layers:
                    for fn in plan.values.get(layer, []):
                        out = _envoy_at(lm, arch.path(layer, values_module)).output
                        fn(arch.read_values(out, n_kv_heads, d_head, config))
                    if layer in plan.z:
                        envoy = _envoy_at(lm, arch.path(layer, arch.out_proj))
                        z = envoy.input.unflatten(-1, (-1, d_head))
                        replaced = False
                        for fn in plan.z[layer]:
                            new = fn(z)
                            if new is not None:
                                z, replaced = new, True
                        if replaced:
                            envoy.input = z.flatten(-2)
                    if layer in plan.patterns:
                        weights = _envoy_at(lm, arch.path(layer, arch.attn)).output[1]
                        if weights is None:
                            raise RuntimeError(
                                f"{type(self.model).__name__} returned no attention weights at layer "
                                f"{layer}; its attention implementation cannot produce patterns"
                            )
                        for fn in plan.patterns[layer]:
                            fn(weights)
            if stops:
                cast(Any, tracer).stop()  # untyped in nnsight
            else:
                result["logits"] = lm.output.logits
        return result.get("logits")

    def _check_plan(self, plan: Interventions) -> None:
        if plan.values and self.arch.values is None:
            raise ValueError(
                f"values were requested from {self.arch_name}, and no module of it outputs them "
                "(its architecture row has values=None), so values and DFA are not available; "
                "z, patterns and splices are"
            )

    def _patterns_available(self, needed: bool) -> Any:
        """Run the whole pass with eager attention while patterns are needed (SDPA returns no
        weights), so that z and patterns come from the same computation: z is then the eager
        model's, which on an SDPA Gemma-2 differs from what the SDPA model computes (its SDPA
        path drops ``attn_logit_softcapping``)."""
        if not needed or self.model.config._attn_implementation == "eager":
            return nullcontext()
        if not self.arch.eager_patterns:
            raise ValueError(
                f"attention patterns were requested from {type(self.model).__name__} running "
                f"{self.model.config._attn_implementation!r} attention, and recomputing them with "
                "eager attention is not supported for it: load it with attn_implementation='eager'"
            )
        return _eager_attention(self.model)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    configs = {
        id(c): c
        for c in [model.config, *(getattr(m, "config", None) for m in model.modules())]
        if c is not None and hasattr(c, "_attn_implementation")
    }
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


def _weight_in_out(module: nn.Module, path: str, arch_name: str) -> Tensor:
    """A linear module's weight as ``[in, out]``: an ``nn.Linear`` stores ``[out, in]``
    (transposed here), GPT-2's ``Conv1D`` ``[in, out]``."""
    weight = cast(Tensor, module.weight).detach()
    if isinstance(module, nn.Linear):
        return weight.T
    if type(module).__name__ == "Conv1D":
        return weight
    raise UnsupportedModelError(
        f"{path} of {arch_name} is a {type(module).__name__}; its weight can be read from an "
        "nn.Linear or a transformers Conv1D"
    )


@torch.no_grad()
def _norm_bias(norm: nn.Module) -> Tensor:
    """β: what the norm makes of a zero residual (0 for RMSNorm)."""
    param = next(norm.parameters(), None)
    if param is None:  # a norm without parameters has no bias
        return torch.zeros(())
    zero = torch.zeros(1, param.shape[-1], dtype=param.dtype, device=param.device)
    return norm(zero)[0].detach()


def _norm_reader(
    store: dict[ResidualKey, Tensor], layer: int, spec: AttnNorm, beta: Tensor
) -> TorchForwardHook:
    """Keeps the norm's input (the residual stream) and its scale σ at each position: with
    ``y − β = γ ⊙ P x / σ``, ``σ = ‖γ ⊙ P x‖ / ‖y − β‖`` (in float64)."""

    def read(_module: nn.Module, inputs: Any, output: Tensor) -> None:
        x = inputs[0].detach()
        wide = x.double()
        centred = wide - wide.mean(-1, keepdim=True) if spec.centres else wide
        numerator = (spec.weight.to(wide) * centred).norm(dim=-1)
        denominator = (output.detach().double() - beta.to(wide)).norm(dim=-1)
        store["resid_pre", layer] = x
        store["norm_scale", layer] = numerator / denominator.clamp_min(1e-30)

    return read


def _first_output(hook: TorchForwardHook) -> TorchForwardHook:
    """``hook`` on the first element of a module's output (attention: ``(output, weights)``)."""

    def first(module: nn.Module, inputs: Any, output: Any) -> None:
        hook(module, inputs, output[0] if isinstance(output, tuple) else output)

    return first


def _architecture_name(model: nn.Module) -> str:
    names = [type(model).__name__, *(getattr(model.config, "architectures", None) or [])]
    return next((name for name in names if name in HF_ARCHITECTURES), names[0])


def _on_meta(module: nn.Module) -> bool:
    return any(param.is_meta for param in module.parameters())


def _module_at(root: nn.Module, path: str) -> Any:
    return root.get_submodule(path)


def _envoy_at(lm: Envoy, path: str) -> Any:
    envoy: Any = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy
