"""Hugging Face architectures as data: where each keeps z, its values and its attention pattern.

Adding an architecture means adding one row to ``HF_ARCHITECTURES``; nothing else branches on
architecture names. A row names, relative to one decoder layer: the attention module (whose
output is ``(attn_output, attn_weights)``), its output projection (whose input is z), the
module whose output holds the values, with the layout of the values in that output, and the
norm whose output the values are computed from.

The folded value-bias convention subtracts ``b_V' = b_V + β·W_V`` per head (DESIGN.md), where β is
the bias of that norm; a norm without a bias (RMSNorm) contributes nothing. Both terms come from
running the norm and the values module on a zero residual: ``norm(0) = β`` (0 for RMSNorm), then
``values(β) = β·W_V + b_V``. So the convention is data (the norm's path), not a branch.

Where that construction does not hold, the row says why, and ``folded_refusal`` turns it into
the reason the folded convention is refused: attention sinks (pattern rows sum to less than 1,
so z and z − b_V' are not related by a constant), values computed from a latent through a norm
of its own (multi-head latent attention: not affine in the residual), values clamped to a bound
(OLMo's ``clip_qkv``: not affine either), or no module whose output holds the values. A
post-LN model (the norm after attention) computes its values from the residual itself, so its
``b_V'`` is the values of a zero residual without the norm; so does a model whose norms come
only after its sublayers (OLMo-2, ``attn_norm=None``).

Where a class keeps a quantity in different places across its configurations, the row holds a
rule as data: the names the norm has in each (Falcon: ``ln_attn`` or ``input_layernorm``), or a
function of the config (Falcon's KV-head count, from ``num_kv_heads`` and ``multi_query``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor, nn

ValuesLayout = Literal["separate", "qkv_blocks", "qkv_per_head", "kv_per_head", "qkv_per_group"]
"""How values sit in the output of the values module.

``separate``: a value projection, ``[..., n_kv_heads * d_head]``.
``qkv_blocks``: fused q|k|v blocks, values last, ``[..., (n_heads + 2 n_kv_heads) * d_head]`` (GPT-2).
``qkv_per_head``: fused per head, ``[..., n_heads, 3 * d_head]`` with values last in each head
(GPT-NeoX, BLOOM).
``kv_per_head``: keys and values per head, ``[..., n_heads, d_key + d_head]`` with values last in
each head (DeepSeek's multi-head latent attention ``kv_b_proj``, where ``d_key != d_head``;
transformers 5 gives it ``[batch, 1, pos, width]``, read as ``[batch, pos, width]``).
``qkv_per_group``: fused per KV group, ``[..., n_kv_heads, (n_heads / n_kv_heads + 2) * d_head]``:
the group's queries, its key, then its value (Falcon; with one group this is q|k|v blocks, as in
multi-query Falcon-7B, and with one head per group it is ``qkv_per_head``).
"""


def _separate(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    return out.unflatten(-1, (n_kv_heads, d_head))


def _qkv_blocks(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    return out[..., -n_kv_heads * d_head :].unflatten(-1, (n_kv_heads, d_head))


def _last_per_head(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    return out.unflatten(-1, (n_kv_heads, -1))[..., -d_head:]


def _latent_per_head(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    # transformers 5 runs kv_b_proj on the latent as [batch, 1, pos, rank]: drop that axis
    if out.ndim == 4 and out.shape[1] == 1:
        out = out.squeeze(1)
    return _last_per_head(out, n_kv_heads, d_head)


_VALUE_READERS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "separate": _separate,
    "qkv_blocks": _qkv_blocks,
    "qkv_per_head": _last_per_head,
    "kv_per_head": _latent_per_head,
    "qkv_per_group": _last_per_head,
}


@dataclass(frozen=True)
class HFArchitecture:
    """How one Hugging Face causal-LM class lays out its attention."""

    layers_path: str
    """Dotted path of the list of decoder layers, e.g. ``model.layers``."""
    attn: str
    """Attention module inside a layer; its output is ``(attn_output, attn_weights)``."""
    out_proj: str
    """Output projection inside a layer; its input is z (the input of W_O)."""
    values: str | None
    """Module inside a layer whose output holds the values; ``None`` where no module's output
    does (then z, patterns and splices work, and values, DFA and the folded convention are
    refused)."""
    values_layout: ValuesLayout
    """Where the values sit in that output (see ``ValuesLayout``); unused without ``values``."""
    attn_norm: str | tuple[str, ...] | None
    """Norm inside a layer whose output feeds the attention (``ln_1``, ``input_layernorm``). A
    tuple names it in each configuration of the class, and the layer's norm is the first of
    those it has (Falcon: ``ln_attn`` where its new decoder architecture has a norm per
    parallel branch, ``input_layernorm`` otherwise). ``None``: no norm comes before the
    attention, so the values read the residual itself (OLMo-2 normalises sublayer outputs)."""
    eager_patterns: bool = True
    """Whether patterns can be recomputed by running the layer with eager attention."""
    kv_heads: str | Callable[[Any], int] | None = "num_key_value_heads"
    """Config attribute holding the number of KV heads (a config without it: one per query
    head), or a function of the config where the class derives the number from several fields
    (Falcon); ``None`` where every query head has values of its own whatever the config says
    (multi-head latent attention expands its latent to all heads)."""
    norm_before: str | None = None
    """Config attribute that is false when ``attn_norm`` comes after attention (post-LN, as
    OPT's ``do_layer_norm_before``), so that the values read the residual itself; ``None``:
    the norm always comes first."""
    attention_sinks: bool = False
    """Whether the softmax also runs over learned per-head sink logits that take no value
    (GPT-OSS): pattern rows sum to less than 1, so the folded convention is undefined."""
    output_attentions: bool = False
    """Whether the attention returns its weights only when the model is called with
    ``output_attentions=True`` (OPT, StableLM, Qwen2-MoE); the backend then passes it while
    patterns are needed. Only then: models built on transformers' ``check_model_inputs`` record
    attentions by swapping module ``forward``s and put them back only when the forward
    returns, so a pass stopped early would leave a wrapper behind on every attention module."""
    latent_values: bool = False
    """Whether the values come from a compressed latent through a norm of their own
    (multi-head latent attention: ``kv_a_proj_with_mqa`` → ``kv_a_layernorm`` → ``kv_b_proj``)
    rather than from ``attn_norm`` through the values module alone; they are then not affine
    in the residual and the folded convention is undefined."""
    values_clip: str | None = None
    """Config attribute holding a bound that the attention clamps its values to right after
    projecting them (OLMo's ``clip_qkv``, set in OLMo-7B-0424 and later; ``None`` in the config:
    no clamp). Where the config sets it, the values are read clamped the same way, and the
    folded convention is refused (clamped values are not affine in the residual)."""

    position_embeddings: str | None = None
    """Module (dotted path from the model) whose output is the learned position embeddings
    added to the residual stream (GPT-2's ``transformer.wpe``); ``None`` where positions do not
    enter the stream (rotary, ALiBi). Recursive DFA reads it to split them from the tokens'."""
    sublayer_norms: bool = False
    """Whether the attention output passes through a norm of its own before it joins the
    residual stream (Gemma-2/3's post-attention norm, OLMo-2); recursive DFA refuses those."""

    def path(self, layer: int, inside: str) -> str:
        """Dotted module path of ``inside`` (e.g. ``self.out_proj``) in decoder layer ``layer``."""
        return f"{self.layers_path}.{layer}.{inside}"

    def out_proj_path(self, layer: int) -> str:
        """Dotted module path of the output projection of ``layer``."""
        return self.path(layer, self.out_proj)

    def n_kv_heads(self, config: Any, n_heads: int) -> int:
        """The number of KV heads of a model with this layout and ``config``."""
        if self.kv_heads is None:
            return n_heads
        if callable(self.kv_heads):
            return self.kv_heads(config) or n_heads
        return getattr(config, self.kv_heads, None) or n_heads

    def norm_feeds_values(self, config: Any) -> bool:
        """Whether ``attn_norm``'s output is the input of the values module (pre-LN)."""
        if self.attn_norm is None:
            return False
        return self.norm_before is None or bool(getattr(config, self.norm_before, True))

    def values_norm(self, layer: nn.Module, config: Any) -> nn.Module | None:
        """The norm in decoder layer ``layer`` whose output the values module reads, or ``None``
        where the values read the residual itself (no norm before attention, or post-LN).

        Raises:
            ValueError: the layer has none of the norms the row names.
        """
        if not self.norm_feeds_values(config):
            return None
        names = (self.attn_norm,) if isinstance(self.attn_norm, str) else self.attn_norm or ()
        found = next((name for name in names if _has_submodule(layer, name)), None)
        if found is None:
            children = sorted(name for name, _ in layer.named_children())
            raise ValueError(
                f"{type(layer).__name__} has no attention norm named {' or '.join(names)} "
                f"(its architecture row's attn_norm); its children are {children}"
            )
        return layer.get_submodule(found)

    def values_clip_bound(self, config: Any) -> float | None:
        """The bound the attention clamps its values to under ``config`` (``values_clip``)."""
        return None if self.values_clip is None else getattr(config, self.values_clip, None)

    def folded_refusal(self, config: Any = None) -> str | None:
        """Why a model of this layout (and, where given, this ``config``) cannot deliver z in
        the folded convention (a clause about "it"), or ``None`` when it can
        (``b_V' = values(attn_norm(0))``)."""
        if self.attention_sinks:
            return (
                "it has attention sinks: its softmax also runs over a learned logit per head "
                "that takes no value, so the rows of its attention pattern sum to less than 1 "
                "(Σ_s A ≠ 1) and z − b_V' is not z without the value bias"
            )
        if self.values is None:
            return (
                "no module of it outputs its values (its architecture row has values=None), "
                "so its value bias b_V' cannot be read"
            )
        if self.latent_values:
            return (
                "it computes its values from a compressed latent through a norm of their own "
                f"(multi-head latent attention, read at {self.values}), so they are not affine "
                "in the residual stream and have no value bias b_V' to fold"
            )
        bound = self.values_clip_bound(config)
        if bound is not None:
            return (
                f"it clamps its values to ±{bound} after projecting them ({self.values_clip}="
                f"{bound} in its config), so they are not affine in the residual stream and "
                "have no value bias b_V' to fold"
            )
        return None

    def residual_refusal(self, config: Any = None) -> str | None:
        """Why the residual stream of a model of this layout (and ``config``) is not a sum of
        parts that its values read through their attention norm (a clause about "its"), or
        ``None`` when it is: pre-norm layers whose attention output joins the stream as it is,
        with values affine in the normed stream and a folded convention (recursive DFA)."""
        if not self.norm_feeds_values(config):
            return (
                "its values do not read a norm of the residual stream that comes before "
                "attention (post-LN, or norms only after the sublayers), so the stream is not a "
                "sum of parts they read"
            )
        if self.sublayer_norms:
            return (
                "its attention output passes through a norm of its own before joining the residual"
            )
        return self.folded_refusal(config)

    def read_values(
        self,
        out: Float[Tensor, " *batch width"],
        n_kv_heads: int,
        d_head: int,
        config: Any = None,
    ) -> Float[Tensor, " *batch n_kv_heads d_head"]:
        """The values (or the value bias, given the bias vector) in the values module's output,
        clamped as the attention clamps them where ``config`` sets ``values_clip``."""
        values = _VALUE_READERS[self.values_layout](out, n_kv_heads, d_head)
        bound = self.values_clip_bound(config)
        return values if bound is None else values.clamp(-bound, bound)


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _falcon_kv_heads(config: Any) -> int:
    """Falcon's KV-head count, as its attention derives it: ``num_kv_heads`` in its new decoder
    architecture (grouped, Falcon-40B/180B) and without ``multi_query`` (one per head,
    Falcon-RW); one with ``multi_query`` alone (Falcon-7B)."""
    grouped = config.new_decoder_architecture or not config.multi_query
    return config.num_kv_heads if grouped else 1


_LLAMA_LIKE = HFArchitecture(
    layers_path="model.layers",
    attn="self_attn",
    out_proj="self_attn.o_proj",
    values="self_attn.v_proj",
    values_layout="separate",
    attn_norm="input_layernorm",
)

# z (the o_proj input) is [n_heads * v_head_dim]; v_head_dim may differ from q/k's
_DEEPSEEK_MLA = replace(
    _LLAMA_LIKE,
    values="self_attn.kv_b_proj",  # [n_heads, qk_nope_head_dim + v_head_dim], values last
    values_layout="kv_per_head",
    kv_heads=None,
    latent_values=True,
)

HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "GPT2LMHeadModel": HFArchitecture(
        layers_path="transformer.h",
        attn="attn",
        out_proj="attn.c_proj",
        values="attn.c_attn",
        values_layout="qkv_blocks",
        attn_norm="ln_1",
        position_embeddings="transformer.wpe",
    ),
    "GPTNeoXForCausalLM": HFArchitecture(
        layers_path="gpt_neox.layers",
        attn="attention",
        out_proj="attention.dense",
        values="attention.query_key_value",
        values_layout="qkv_per_head",
        attn_norm="input_layernorm",
    ),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": replace(_LLAMA_LIKE, sublayer_norms=True),
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen2MoeForCausalLM": replace(_LLAMA_LIKE, output_attentions=True),
    "StableLmForCausalLM": replace(_LLAMA_LIKE, output_attentions=True),  # LayerNorm with bias
    "GptOssForCausalLM": replace(_LLAMA_LIKE, attention_sinks=True),
    "OPTForCausalLM": HFArchitecture(
        layers_path="model.decoder.layers",
        attn="self_attn",
        out_proj="self_attn.out_proj",
        values="self_attn.v_proj",
        values_layout="separate",
        attn_norm="self_attn_layer_norm",
        norm_before="do_layer_norm_before",  # False in OPT-350m: the norm follows attention
        output_attentions=True,
        position_embeddings="model.decoder.embed_positions",
    ),
    "BloomForCausalLM": HFArchitecture(
        layers_path="transformer.h",
        attn="self_attention",
        out_proj="self_attention.dense",
        values="self_attention.query_key_value",
        values_layout="qkv_per_head",
        attn_norm="input_layernorm",
    ),
    "DeepseekV2ForCausalLM": _DEEPSEEK_MLA,
    "DeepseekV3ForCausalLM": _DEEPSEEK_MLA,
    "GPTJForCausalLM": HFArchitecture(
        layers_path="transformer.h",
        attn="attn",
        out_proj="attn.out_proj",
        values="attn.v_proj",
        values_layout="separate",
        attn_norm="ln_1",  # LayerNorm with bias, shared by the parallel attention and MLP
    ),
    "MixtralForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "Qwen3MoeForCausalLM": _LLAMA_LIKE,
    "Gemma3ForCausalLM": replace(_LLAMA_LIKE, sublayer_norms=True),
    # input_layernorm: LayerNorm with bias, shared by the parallel MLP
    "PhiForCausalLM": replace(_LLAMA_LIKE, out_proj="self_attn.dense"),
    "Phi3ForCausalLM": replace(
        _LLAMA_LIKE,
        values="self_attn.qkv_proj",
        values_layout="qkv_blocks",  # q|k|v, GQA
    ),
    "OlmoForCausalLM": replace(_LLAMA_LIKE, values_clip="clip_qkv"),  # LayerNorm, no parameters
    # norms after the sublayers only
    "Olmo2ForCausalLM": replace(_LLAMA_LIKE, attn_norm=None, sublayer_norms=True),
    "CohereForCausalLM": _LLAMA_LIKE,  # LayerNorm without bias, parallel MLP
    "GraniteForCausalLM": _LLAMA_LIKE,
    "GlmForCausalLM": _LLAMA_LIKE,
    "Glm4ForCausalLM": _LLAMA_LIKE,
    "SmolLM3ForCausalLM": _LLAMA_LIKE,
    "FalconForCausalLM": HFArchitecture(
        layers_path="transformer.h",
        attn="self_attention",
        out_proj="self_attention.dense",
        values="self_attention.query_key_value",
        values_layout="qkv_per_group",
        attn_norm=("ln_attn", "input_layernorm"),
        kv_heads=_falcon_kv_heads,
    ),
}


def hf_architecture(name: str) -> HFArchitecture:
    """The table row for a Hugging Face architecture class name.

    Raises:
        ValueError: the architecture is not in the table; the message lists those that are and
            says how to add one.
    """
    try:
        return HF_ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unsupported Hugging Face architecture {name!r}; supported: "
            f"{sorted(HF_ARCHITECTURES)}. To add one, add a row to "
            "sae_lens_attn.backends.architectures.HF_ARCHITECTURES naming its decoder-layer list, its "
            "attention module, the output projection and the module holding the values."
        ) from None
