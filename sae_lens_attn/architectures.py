"""Hugging Face architectures as data: where each one keeps the input of its attention output projection.

Adding an architecture means adding one row here; nothing else branches on architecture names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HFArchitecture:
    """How one Hugging Face causal-LM class lays out its attention."""

    layers_path: str
    """Dotted path of the list of decoder layers, e.g. ``model.layers``."""
    out_proj: str
    """Path, inside one decoder layer, of the projection whose input is z (W_O)."""

    def out_proj_path(self, layer: int) -> str:
        """Dotted module path of the output projection of ``layer``."""
        return f"{self.layers_path}.{layer}.{self.out_proj}"


_LLAMA_LIKE = HFArchitecture(layers_path="model.layers", out_proj="self_attn.o_proj")

HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "GPT2LMHeadModel": HFArchitecture(layers_path="transformer.h", out_proj="attn.c_proj"),
    "GPTNeoXForCausalLM": HFArchitecture(layers_path="gpt_neox.layers", out_proj="attention.dense"),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
}


def hf_architecture(name: str) -> HFArchitecture:
    """The table row for a Hugging Face architecture class name.

    Raises:
        ValueError: the architecture is not in the table; the message lists those that are.
    """
    try:
        return HF_ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unsupported Hugging Face architecture {name!r}; supported: "
            f"{sorted(HF_ARCHITECTURES)}. To add one, add a row to "
            "sae_lens_attn.architectures.HF_ARCHITECTURES naming its decoder-layer list and "
            "the attention output projection inside a layer."
        ) from None
