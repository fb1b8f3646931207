"""Hugging Face architectures as data: where each keeps z, its values and its attention pattern.

Adding an architecture means adding one row to ``HF_ARCHITECTURES``; nothing else branches on
architecture names. A row names, relative to one decoder layer: the attention module (whose
output is ``(attn_output, attn_weights)``), its output projection (whose input is z), and the
module whose output holds the values, with the layout of the values in that output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from jaxtyping import Float
from torch import Tensor

ValuesLayout = Literal["separate", "qkv_blocks", "qkv_per_head"]
"""How values sit in the output of the values module.

``separate``: a value projection, ``[..., n_kv_heads * d_head]``.
``qkv_blocks``: fused q|k|v blocks, values last, ``[..., (n_heads + 2 n_kv_heads) * d_head]`` (GPT-2).
``qkv_per_head``: fused per head, ``[..., n_heads, 3 * d_head]`` with values last in each head (GPT-NeoX).
"""


def _separate(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    return out.unflatten(-1, (n_kv_heads, d_head))


def _qkv_blocks(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    return out[..., -n_kv_heads * d_head :].unflatten(-1, (n_kv_heads, d_head))


def _qkv_per_head(out: Tensor, n_kv_heads: int, d_head: int) -> Tensor:
    return out.unflatten(-1, (n_kv_heads, 3 * d_head))[..., 2 * d_head :]


_VALUE_READERS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "separate": _separate,
    "qkv_blocks": _qkv_blocks,
    "qkv_per_head": _qkv_per_head,
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
    values: str
    """Module inside a layer whose output holds the values."""
    values_layout: ValuesLayout
    """Where the values sit in that output (see ``ValuesLayout``)."""
    eager_patterns: bool = True
    """Whether patterns can be recomputed by running the layer with eager attention."""

    def path(self, layer: int, inside: str) -> str:
        """Dotted module path of ``inside`` (e.g. ``self.out_proj``) in decoder layer ``layer``."""
        return f"{self.layers_path}.{layer}.{inside}"

    def out_proj_path(self, layer: int) -> str:
        """Dotted module path of the output projection of ``layer``."""
        return self.path(layer, self.out_proj)

    def read_values(
        self, out: Float[Tensor, " *batch width"], n_kv_heads: int, d_head: int
    ) -> Float[Tensor, " *batch n_kv_heads d_head"]:
        """The values (or the value bias, given the bias vector) in the values module's output."""
        return _VALUE_READERS[self.values_layout](out, n_kv_heads, d_head)


_LLAMA_LIKE = HFArchitecture(
    layers_path="model.layers",
    attn="self_attn",
    out_proj="self_attn.o_proj",
    values="self_attn.v_proj",
    values_layout="separate",
)

HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "GPT2LMHeadModel": HFArchitecture(
        layers_path="transformer.h",
        attn="attn",
        out_proj="attn.c_proj",
        values="attn.c_attn",
        values_layout="qkv_blocks",
    ),
    "GPTNeoXForCausalLM": HFArchitecture(
        layers_path="gpt_neox.layers",
        attn="attention",
        out_proj="attention.dense",
        values="attention.query_key_value",
        values_layout="qkv_per_head",
    ),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
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
            "sae_lens_attn.architectures.HF_ARCHITECTURES naming its decoder-layer list, its "
            "attention module, the output projection and the module holding the values."
        ) from None
