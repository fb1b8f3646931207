"""The architecture matrix: each Hugging Face causal-LM class of the nnsight table, tiny.

Each case builds a two-layer model from its transformers config (small dims, eager attention,
seeded random weights, non-zero biases wherever the class has them) and checks the nnsight
backend against computations that do not go through it. The checks (``CHECKS``):

- ``z``: z is the input of the output projection, as a plain forward pre-hook sees it, with the
  head counts the case states (Falcon's KV heads from ``num_kv_heads`` / ``multi_query``).
- ``patterns``: patterns are the eager model's ``output_attentions=True`` attentions.
- ``dfa``: ``by_src.sum(2) + bias == pre_act``, and ``pre_act`` is a SAELens SAE's own
  ``hook_sae_acts_pre`` on the pre-hook z (convention "included").
- ``splice``: ``backend.splicing({site: fn})`` changes the logits exactly as a pre-hook doing the
  same replacement does.
- ``evaluate``: ``sla.evaluate`` runs, and its clean and zero-ablation cross-entropies are the
  model's own, without and with a pre-hook that zeroes z.
- ``folded``: the norm the case names feeds the values module and is the table's
  ``attn_norm``; ``z_included − z_folded == b_V + β·W_V`` computed from the weights (β·W_V
  non-zero where that norm has a bias); a folded splice matches a pre-hook. Where the folded
  convention is undefined (attention sinks, latent or clamped values), it is refused, with why.

The bridge checks (``BRIDGE_CHECKS``, TransformerLens >= 3 only, slow: a bridge boot each) run
``z``, ``patterns`` and ``splice`` again through ``TransformerBridge.boot_transformers`` over a
fresh build of each case, against the same pre-hook references on the Hugging Face model; what
the bridge is known to fail is in ``BRIDGE_LIMITS``, as strict xfails.

Where a case states something (the output projection, the values module and their layout, the
norm, the KV heads), it says it here, not through the architecture table, so the table is
checked against the model rather than against itself.

``docs/gen_support_matrix.py`` runs this module and writes ``docs/support.md`` from the
outcomes: the test ids ``test_<check>[<case>]``, ``CASES`` and ``CHECKS`` are its interface.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import sae_lens_attn as sla
from sae_lens_attn import AttnSite, NNsightBackend, backend_for
from sae_lens_attn.backends import architectures as arch_table

from .factories import batch, random_sae, sae_lens_encode
from .hf_twins import make_tokenizer

if TYPE_CHECKING:
    from sae_lens_attn.backends.bridge import BridgeBackend  # TransformerLens >= 3 only

VOCAB = 64
CTX = 32
N_HEADS = 4
D_SAE = 32
ATOL = 1e-5
_IDS: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


# ---- where each case keeps its values in the values module's output vector ----


def _separate(vec: Tensor, n_kv: int, d_head: int) -> Tensor:
    return vec.view(n_kv, d_head)


def _blocks(vec: Tensor, n_kv: int, d_head: int) -> Tensor:  # q | k | v, values last
    return vec[-n_kv * d_head :].view(n_kv, d_head)


def _per_head(vec: Tensor, n_kv: int, d_head: int) -> Tensor:  # per head: q, k, v
    return vec.view(n_kv, 3, d_head)[:, 2]


def _per_group(vec: Tensor, n_kv: int, d_head: int) -> Tensor:  # per KV group: q..., k, v
    return vec.view(n_kv, -1, d_head)[:, -1]


def _latent(vec: Tensor, n_kv: int, d_head: int) -> Tensor:  # per head: k_nope, v
    return vec.view(n_kv, -1)[:, -d_head:]


class Case(NamedTuple):
    """One tiny model and what the tests expect of it."""

    label: str
    """What the docs call it."""
    hf_class: str
    """The transformers class (a case whose class the installed version lacks is skipped)."""
    config: Callable[[], Any]
    """The tiny config."""
    layers: str
    """Dotted path of the decoder layers."""
    out_proj: str
    """Output projection inside a layer: its input is z."""
    values: str
    """Module inside a layer that projects the values (alone or fused with q and k)."""
    values_of: Callable[[Tensor, int, int], Tensor]
    """``(output vector, n_kv_heads, d_head) -> [n_kv_heads, d_head]``: the values in it."""
    norm: str | None
    """Norm inside a layer whose output the values module reads; ``None``: the residual."""
    kv_heads: int
    """KV heads the model has (query heads: ``N_HEADS``)."""
    refusal: str | None = None
    """Pattern of the reason the folded convention is refused; ``None``: it is defined."""


def _of(cls: str, **fields: Any) -> Callable[[], Any]:
    return lambda: getattr(transformers, cls)(vocab_size=VOCAB, **_IDS, **fields)


def _ll(cls: str, **kw: Any) -> Callable[[], Any]:
    """A Llama-like ``cls`` config: the dims those cases share (GQA 4/2), updated by ``kw``."""
    dims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    heads = {"num_attention_heads": N_HEADS, "num_key_value_heads": 2}
    rest = {"max_position_embeddings": CTX, "tie_word_embeddings": False}
    return _of(cls, **{**dims, **heads, **rest, **kw})


_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_MOE = {"moe_intermediate_size": 16, "num_experts_per_tok": 2}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
_MLA = {
    "num_key_value_heads": N_HEADS,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 6,  # d_head of z (6) is not the query/key width (12)
    **_MOE,
}
_SLIDING = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
_FALCON = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": N_HEADS,
    "max_position_embeddings": CTX,
    "bias": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}
_OPT = {
    "hidden_size": 32,
    "ffn_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": N_HEADS,
    "max_position_embeddings": CTX,
    "word_embed_proj_dim": 32,
    "dropout": 0.0,
    "enable_bias": True,
}


def _deepseek_v2() -> Any:
    config = _ll("DeepseekV2Config", **_MLA)()
    config.q_lora_rank = None  # a plain q_proj, as in DeepSeek-V2-Lite
    return config


_GPT2 = _of("GPT2Config", n_embd=32, n_layer=2, n_head=N_HEADS, n_positions=CTX, **_NO_DROPOUT)
_NEOX = _of(
    "GPTNeoXConfig",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=N_HEADS,
    rotary_pct=0.25,
    max_position_embeddings=CTX,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
_GPTJ = _of(
    "GPTJConfig", n_embd=32, n_layer=2, n_head=N_HEADS, rotary_dim=4, n_positions=CTX, **_NO_DROPOUT
)
_BLOOM = _of(
    "BloomConfig",
    hidden_size=32,
    n_layer=2,
    n_head=N_HEADS,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
_PHI = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}
_GRANITE = {
    "attention_multiplier": 0.2,
    "residual_multiplier": 0.5,
    "embedding_multiplier": 2.0,
    "logits_scaling": 2.0,
}

# Layouts the cases share: layers, out_proj, values, values_of, norm, kv_heads.
_LL = ("model.layers", "self_attn.o_proj", "self_attn.v_proj", _separate, "input_layernorm", 2)
_FALCON_AT = ("transformer.h", "self_attention.dense", "self_attention.query_key_value")
_OPT_AT = ("model.decoder.layers", "self_attn.out_proj", "self_attn.v_proj", _separate)
_MLA_AT = ("model.layers", "self_attn.o_proj", "self_attn.kv_b_proj", _latent)
_BIAS = {"attention_bias": True}
_LATENT = r"multi-head latent attention.*not affine"

# fmt: off
CASES: dict[str, Case] = {
    "gpt2": Case("GPT-2", "GPT2LMHeadModel", _GPT2,
                 "transformer.h", "attn.c_proj", "attn.c_attn", _blocks, "ln_1", N_HEADS),
    "gpt_neox": Case("GPT-NeoX (Pythia)", "GPTNeoXForCausalLM", _NEOX,
                     "gpt_neox.layers", "attention.dense", "attention.query_key_value", _per_head,
                     "input_layernorm", N_HEADS),
    "gptj": Case("GPT-J", "GPTJForCausalLM", _GPTJ,
                 "transformer.h", "attn.out_proj", "attn.v_proj", _separate, "ln_1", N_HEADS),
    "llama": Case("Llama (GQA)", "LlamaForCausalLM", _ll("LlamaConfig", **_BIAS), *_LL),
    "llama3": Case("Llama-3 (llama3 rope scaling, head_dim 12 ≠ 32/4)", "LlamaForCausalLM",
                   _ll("LlamaConfig", head_dim=12, rope_theta=5e5, rope_scaling=_LLAMA3_ROPE,
                       **_BIAS), *_LL),
    "mistral": Case("Mistral", "MistralForCausalLM",
                    _ll("MistralConfig", head_dim=8, sliding_window=8), *_LL),
    "mixtral": Case("Mixtral (MoE)", "MixtralForCausalLM",
                    _ll("MixtralConfig", num_local_experts=4, num_experts_per_tok=2), *_LL),
    "qwen2": Case("Qwen2", "Qwen2ForCausalLM", _ll("Qwen2Config"), *_LL),
    "qwen2_moe": Case("Qwen2-MoE", "Qwen2MoeForCausalLM",
                      _ll("Qwen2MoeConfig", num_experts=4, shared_expert_intermediate_size=32,
                          **_MOE), *_LL),
    "qwen3": Case("Qwen3 (q/k norms)", "Qwen3ForCausalLM",
                  _ll("Qwen3Config", head_dim=8, **_BIAS), *_LL),
    "qwen3_moe": Case("Qwen3-MoE", "Qwen3MoeForCausalLM",
                      _ll("Qwen3MoeConfig", head_dim=8, num_experts=4, decoder_sparse_step=1,
                          **_MOE, **_BIAS), *_LL),
    "gemma": Case("Gemma (multi-query)", "GemmaForCausalLM",
                  _ll("GemmaConfig", num_key_value_heads=1, head_dim=16, **_BIAS), *_LL[:5], 1),
    "gemma2": Case("Gemma-2 (softcaps, local/global)", "Gemma2ForCausalLM",
                   _ll("Gemma2Config", head_dim=8, query_pre_attn_scalar=8, **_SLIDING, **_BIAS),
                   *_LL),
    "gemma3": Case("Gemma-3 text (q/k norms, local/global)", "Gemma3ForCausalLM",
                   _ll("Gemma3TextConfig", head_dim=8, query_pre_attn_scalar=8, **_SLIDING,
                       **_BIAS), *_LL),
    "phi": Case("Phi (Phi-1, Phi-2)", "PhiForCausalLM",
                _ll("PhiConfig", num_key_value_heads=N_HEADS, partial_rotary_factor=0.5, **_PHI),
                "model.layers", "self_attn.dense", "self_attn.v_proj", _separate,
                "input_layernorm", N_HEADS),
    "phi3": Case("Phi-3 (fused qkv)", "Phi3ForCausalLM", _ll("Phi3Config", **_PHI),
                 "model.layers", "self_attn.o_proj", "self_attn.qkv_proj", _blocks,
                 "input_layernorm", 2),
    "olmo": Case("OLMo", "OlmoForCausalLM", _ll("OlmoConfig", **_BIAS), *_LL),
    "olmo_clip": Case("OLMo with clip_qkv (OLMo-7B-0424)", "OlmoForCausalLM",
                      _ll("OlmoConfig", clip_qkv=0.5, **_BIAS), *_LL,
                      refusal=r"clamps its values to ±0\.5 .*clip_qkv=0\.5.*not affine"),
    "olmo2": Case("OLMo-2 (norms after the sublayers)", "Olmo2ForCausalLM",
                  _ll("Olmo2Config", **_BIAS), *_LL[:4], None, 2),
    "cohere": Case("Cohere (Command-R, parallel)", "CohereForCausalLM",
                   _ll("CohereConfig", **_BIAS), *_LL),
    "granite": Case("Granite (multipliers)", "GraniteForCausalLM",
                    _ll("GraniteConfig", **_GRANITE, **_BIAS), *_LL),
    "glm": Case("GLM (partial rotary)", "GlmForCausalLM",
                _ll("GlmConfig", head_dim=8, **_BIAS), *_LL),
    "glm4": Case("GLM-4 (sandwich norms)", "Glm4ForCausalLM",
                 _ll("Glm4Config", head_dim=8, **_BIAS), *_LL),
    "smollm3": Case("SmolLM3 (NoPE layers)", "SmolLM3ForCausalLM",
                    _ll("SmolLM3Config", no_rope_layers=[1, 0], use_sliding_window=False,
                        **_BIAS), *_LL),
    "gpt_oss": Case("GPT-OSS (attention sinks, MoE)", "GptOssForCausalLM",
                    _ll("GptOssConfig", intermediate_size=32, head_dim=8, num_local_experts=4,
                        num_experts_per_tok=2, rope_scaling=None, **_SLIDING, **_BIAS),
                    *_LL, refusal=r"Σ_s A ≠ 1"),
    "falcon_mq": Case("Falcon (multi-query, parallel; Falcon-7B)", "FalconForCausalLM",
                      _of("FalconConfig", multi_query=True, parallel_attn=True, **_FALCON),
                      *_FALCON_AT, _blocks, "input_layernorm", 1),
    "falcon_gqa": Case("Falcon (grouped, new decoder; Falcon-40B)", "FalconForCausalLM",
                       _of("FalconConfig", new_decoder_architecture=True, num_kv_heads=2,
                           parallel_attn=True, **_FALCON),
                       *_FALCON_AT, _per_group, "ln_attn", 2),
    "falcon_alibi": Case("Falcon (multi-head, ALiBi, sequential; Falcon-RW)", "FalconForCausalLM",
                         _of("FalconConfig", multi_query=False, alibi=True, parallel_attn=False,
                             **_FALCON),
                         *_FALCON_AT, _per_head, "input_layernorm", N_HEADS),
    "bloom": Case("BLOOM (ALiBi)", "BloomForCausalLM", _BLOOM,
                  "transformer.h", "self_attention.dense", "self_attention.query_key_value",
                  _per_head, "input_layernorm", N_HEADS),
    "opt": Case("OPT (pre-LN)", "OPTForCausalLM", _of("OPTConfig", **_OPT),
                *_OPT_AT, "self_attn_layer_norm", N_HEADS),
    "opt_post_ln": Case("OPT (post-LN; OPT-350m)", "OPTForCausalLM",
                        _of("OPTConfig", do_layer_norm_before=False, **_OPT),
                        *_OPT_AT, None, N_HEADS),
    "stablelm": Case("StableLM (LayerNorm with bias)", "StableLmForCausalLM",
                     _ll("StableLmConfig", use_qkv_bias=True), *_LL),
    "deepseek_v2": Case("DeepSeek-V2 (multi-head latent attention)", "DeepseekV2ForCausalLM",
                        _deepseek_v2, *_MLA_AT, "input_layernorm", N_HEADS, refusal=_LATENT),
    "deepseek_v3": Case("DeepSeek-V3 (multi-head latent attention)", "DeepseekV3ForCausalLM",
                        _ll("DeepseekV3Config", q_lora_rank=16, n_group=1, topk_group=1, **_MLA),
                        *_MLA_AT, "input_layernorm", N_HEADS, refusal=_LATENT),
}
"""Every case, by test id. Cases may share a class (its configurations differ)."""
# fmt: on

CHECKS: dict[str, str] = {
    "z": "z is the output projection's input (forward pre-hook), with the stated head counts",
    "patterns": "patterns are the eager model's output_attentions=True attentions",
    "dfa": "DFA sums to pre_act, and pre_act is the SAE's hook_sae_acts_pre on the pre-hook z",
    "splice": "splicing z changes the logits exactly as a pre-hook doing the same replacement",
    "evaluate": "sla.evaluate runs; its clean and zero-ablation CE are the model's own",
    "folded": "z_included − z_folded = b_V + β·W_V from the weights, or folded is refused",
}
"""The checks, by the name of their test function (``test_<check>``)."""


each_case = pytest.mark.parametrize("key", list(CASES))
"""Every case on both stacks: each class exists in transformers 4.57 and 5.x, so a class that
goes missing fails its cases rather than skipping them."""


# ---- building: seeded weights, the global RNG untouched ----


def _randomize_(model: nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 0.15²), biases ~ N(0, 0.2²), other vectors (norm gains, sinks) = HF's
    init + N(0, 0.1²), all from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif param.ndim == 1:
                param.add_(0.1 * noise)
            else:
                param.copy_(0.15 * noise)


@cache
def built(key: str) -> Any:
    """The case's float32 eager model in eval mode (one per case: the tests only read it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # HF's own init of the vectors we only perturb (GPT-OSS's sinks)
        model: Any = transformers.AutoModelForCausalLM.from_config(
            CASES[key].config(), attn_implementation="eager", dtype=torch.float32
        )
    _randomize_(model, seed=0)
    return model.eval()


def layer_of(key: str, layer: int) -> nn.Module:
    return built(key).get_submodule(f"{CASES[key].layers}.{layer}")


def backend(key: str) -> NNsightBackend:
    b = backend_for(built(key))
    assert isinstance(b, NNsightBackend)
    return b


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's: its weight is [in, out]


def z_width(key: str) -> int:
    """The width of z: the input width of the output projection."""
    out_proj = layer_of(key, 0).get_submodule(CASES[key].out_proj)
    weight = cast(Tensor, out_proj.weight)
    return weight.shape[0] if _is_conv1d(out_proj) else weight.shape[1]


@contextmanager
def pre_hooks(key: str, hook: Callable[[int, Tensor], Tensor | None]) -> Iterator[None]:
    """``hook(layer, z_flat)`` on every output projection's input; a returned tensor replaces it."""

    def make(layer: int) -> Any:
        def pre_hook(_module: Any, args: tuple[Any, ...]) -> Any:
            new = hook(layer, args[0])
            return None if new is None else (new, *args[1:])

        return pre_hook

    out_projs = [layer_of(key, layer).get_submodule(CASES[key].out_proj) for layer in (0, 1)]
    handles = [m.register_forward_pre_hook(make(layer)) for layer, m in enumerate(out_projs)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_z(key: str, tokens: Tensor) -> dict[int, Tensor]:
    """z of each layer, flat, as a plain pre-hook on the output projection sees it."""
    seen: dict[int, Tensor] = {}
    with torch.no_grad(), pre_hooks(key, lambda layer, z: seen.__setitem__(layer, z.detach())):
        built(key)(tokens)
    return seen


def norm_of(key: str, layer: int) -> nn.Module | None:
    """The norm the case says feeds the values of ``layer``."""
    norm = CASES[key].norm
    return None if norm is None else layer_of(key, layer).get_submodule(norm)


def value_bias(key: str, layer: int, *, with_norm: bool = True) -> Tensor:
    """``b_V + β·W_V`` per KV head from the weights, β the bias of the case's norm (none for
    RMSNorm, a norm without parameters, or no norm before the values); ``b_V`` alone without
    ``with_norm``."""
    case = CASES[key]
    values = layer_of(key, layer).get_submodule(case.values)
    weight = cast(Tensor, values.weight).detach()
    w_out_in = weight.T if _is_conv1d(values) else weight
    bias: Tensor | None = getattr(values, "bias", None)
    beta: Tensor | None = getattr(norm_of(key, layer), "bias", None) if with_norm else None
    vec = torch.zeros(w_out_in.shape[0]) if bias is None else bias.detach().clone()
    if beta is not None:
        vec = vec + w_out_in @ beta.detach()
    return case.values_of(vec, case.kv_heads, z_width(key) // N_HEADS)


def per_query_head(per_kv_head: Tensor) -> Tensor:
    return per_kv_head.repeat_interleave(N_HEADS // per_kv_head.shape[0], dim=0)


# ---- the checks ----


@each_case
def test_z(key: str) -> None:
    b = backend(key)
    site = b.site(1)
    assert (site.n_heads, site.n_kv_heads, site.d_in) == (
        N_HEADS,
        CASES[key].kv_heads,
        z_width(key),
    )
    tokens = batch(vocab=VOCAB)
    reference = reference_z(key, tokens)
    caps = b.capture(tokens, [b.site(0), site], convention="included")
    for layer, cap in caps.items():
        torch.testing.assert_close(cap.z.flatten(-2), reference[layer])


@each_case
def test_patterns(key: str) -> None:
    b = backend(key)
    tokens = batch(vocab=VOCAB)
    with torch.no_grad():
        attentions = built(key)(tokens, output_attentions=True).attentions
    reference = reference_z(key, tokens)
    caps = b.capture(tokens, [b.site(0), b.site(1)], pattern=True, convention="included")
    for layer, cap in caps.items():
        assert cap.pattern is not None and cap.pattern.shape == (3, N_HEADS, 12, 12)
        torch.testing.assert_close(cap.pattern, attentions[layer], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(cap.z.flatten(-2), reference[layer], atol=ATOL, rtol=1e-4)
        assert cap.pattern.triu(1).abs().max() == 0  # causal


@each_case
def test_dfa(key: str) -> None:
    site = backend(key).site(1)
    sae = random_sae(site, d_sae=D_SAE, value_bias_convention="included")
    tokens = batch(vocab=VOCAB)
    result = sla.analysis.dfa(built(key), sae, tokens)
    torch.testing.assert_close(
        result.by_src.sum(2) + result.bias, result.pre_act, atol=1e-4, rtol=1e-4
    )
    z = reference_z(key, tokens)[1].unflatten(-1, (site.n_heads, site.d_head))
    torch.testing.assert_close(result.pre_act, sae_lens_encode(sae, z)[0], atol=1e-4, rtol=1e-4)
    assert result.pre_act.abs().max() > 0.1


def _replace(z: Tensor) -> Tensor:
    return 0.5 * z.flip(-2) + 0.1  # mixes heads: a wrong head order or width would show


def _splice_hook(site: AttnSite, bias: Tensor) -> Callable[[int, Tensor], Tensor | None]:
    """A pre-hook replacing z at ``site`` by ``_replace(z − bias) + bias``."""

    def hook(layer: int, z_flat: Tensor) -> Tensor | None:
        if layer != site.layer:
            return None
        z = z_flat.unflatten(-1, (site.n_heads, site.d_head))
        return (_replace(z - bias) + bias).flatten(-2)

    return hook


@each_case
def test_splice(key: str) -> None:
    b = backend(key)
    site = b.site(1)
    tokens = batch(vocab=VOCAB)
    with torch.no_grad():
        clean = built(key)(tokens).logits
        with pre_hooks(key, _splice_hook(site, torch.zeros(()))):
            want = built(key)(tokens).logits
        with b.splicing({site: _replace}, convention="included"):
            got = b.forward(tokens)
    assert got is not None
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert (want - clean).abs().max() > 1e-3


def _ce(logits: Tensor, tokens: Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


@pytest.mark.slow
@each_case
def test_evaluate(key: str) -> None:
    site = backend(key).site(1)
    tokens = batch(vocab=VOCAB)
    sae = random_sae(site, d_sae=D_SAE, value_bias_convention="included")
    metrics = sla.evaluate(built(key), sae, tokens, batch_size=3, progress=False)
    assert all(math.isfinite(value) for value in metrics.values()), dict(metrics)
    assert metrics["l0"] > 0
    with torch.no_grad():
        clean = built(key)(tokens).logits
        with pre_hooks(key, lambda layer, z: torch.zeros_like(z) if layer == 1 else None):
            zero = built(key)(tokens).logits
    assert metrics["ce_clean"] == pytest.approx(_ce(clean, tokens), rel=1e-4)
    assert metrics["ce_zero_ablation"] == pytest.approx(_ce(zero, tokens), rel=1e-4)
    assert metrics["ce_zero_ablation"] != metrics["ce_clean"]


@each_case
def test_folded(key: str) -> None:
    case, b = CASES[key], backend(key)
    tokens = batch(vocab=VOCAB)
    sites = [b.site(0), b.site(1)]
    if case.refusal is not None:
        match = (
            rf"'folded' value-bias convention is undefined for {case.hf_class}: .*{case.refusal}"
        )
        with pytest.raises(ValueError, match=match):
            b.capture(tokens, sites, convention="folded")
        return
    row = arch_table.hf_architecture(case.hf_class)
    for layer in (0, 1):
        assert row.values_norm(layer_of(key, layer), built(key).config) is norm_of(key, layer)
        assert_norm_feeds_values(key, layer, tokens)
    included = b.capture(tokens, sites, convention="included")
    folded = b.capture(tokens, sites, convention="folded")
    for site in sites:
        want = per_query_head(value_bias(key, site.layer))
        got = included[site.layer].z - folded[site.layer].z
        torch.testing.assert_close(got, want.expand_as(got), atol=ATOL, rtol=1e-4)
    if getattr(norm_of(key, 1), "bias", None) is not None:  # β·W_V matters: not b_V alone
        assert (value_bias(key, 1) - value_bias(key, 1, with_norm=False)).abs().max() > 1e-2
    site = sites[1]  # a folded splice puts b_V' back: a pre-hook replacing z − b_V'
    with torch.no_grad():
        with pre_hooks(key, _splice_hook(site, per_query_head(value_bias(key, 1)))):
            want_logits = built(key)(tokens).logits
        with b.splicing({site: _replace}, convention="folded"):
            got_logits = b.forward(tokens)
    assert got_logits is not None
    torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=1e-4)


def assert_norm_feeds_values(key: str, layer: int, tokens: Tensor) -> None:
    """The case's norm output (or, without a norm, the layer's input) is what the values
    module reads."""
    block, norm = layer_of(key, layer), norm_of(key, layer)
    seen: dict[str, Tensor] = {}

    def first_input(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def norm_output(_module: nn.Module, _args: Any, out: Tensor) -> None:
        seen["source"] = out

    values = block.get_submodule(CASES[key].values)
    handles = [values.register_forward_pre_hook(first_input("values"), with_kwargs=True)]
    if norm is None:
        handles.append(block.register_forward_pre_hook(first_input("source"), with_kwargs=True))
    else:
        handles.append(norm.register_forward_hook(norm_output))
    try:
        with torch.no_grad():
            built(key)(tokens)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(seen["values"], seen["source"], atol=0, rtol=0)


# ---- what the matrix rows rest on ----


def test_every_table_row_has_a_case() -> None:
    covered = {case.hf_class for case in CASES.values()}
    assert set(arch_table.HF_ARCHITECTURES) <= covered, set(arch_table.HF_ARCHITECTURES) - covered


def test_olmo_clip_bites_and_values_are_read_clamped() -> None:
    """The clip_qkv case clamps some values (else its DFA check would prove nothing)."""
    key = "olmo_clip"
    tokens = batch(vocab=VOCAB)
    raw: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
        raw.append(out.detach().clone())  # before the attention clamps it in place

    handle = layer_of(key, 1).get_submodule(CASES[key].values).register_forward_hook(keep)
    try:
        with torch.no_grad():
            built(key)(tokens)
    finally:
        handle.remove()
    assert raw[0].abs().max() > 0.5
    b = backend(key)
    cap = b.capture(tokens, [b.site(1)], values=True, pattern=True, convention="included")[1]
    assert cap.values is not None and cap.pattern is not None
    assert cap.values.abs().max() <= 0.5
    torch.testing.assert_close(
        torch.einsum("bhqs,bshd->bqhd", cap.pattern, cap.values), cap.z, atol=ATOL, rtol=1e-4
    )


def test_llama3_case_has_scaled_rope_and_wide_heads() -> None:
    config = built("llama3").config
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3"
    assert config.head_dim == 12 != config.hidden_size // config.num_attention_heads
    assert backend("llama3").site(1).d_head == 12


def test_falcon_cases_span_its_kv_layouts() -> None:
    mq, gqa, alibi = (built(k).config for k in ("falcon_mq", "falcon_gqa", "falcon_alibi"))
    assert mq.multi_query and not mq.new_decoder_architecture
    assert gqa.new_decoder_architecture and gqa.num_kv_heads == 2
    assert alibi.alibi and not alibi.multi_query and not alibi.parallel_attn
    assert hasattr(layer_of("falcon_gqa", 0), "ln_attn")


# ---- z, patterns and splices through TransformerBridge (TransformerLens >= 3) ----

BRIDGE_CHECKS: dict[str, str] = {
    "bridge_z": "through TransformerBridge, z is the output projection's input (forward pre-hook)",
    "bridge_patterns": (
        "through TransformerBridge, patterns are the eager model's output_attentions=True "
        "attentions"
    ),
    "bridge_splice": (
        "through TransformerBridge, splicing z changes the logits exactly as a pre-hook doing the "
        "same replacement on the Hugging Face model"
    ),
}
"""The bridge checks, by the name of their test function; ``docs/gen_support_matrix.py`` sums
them up in its TransformerBridge column."""


class BridgeLimit(NamedTuple):
    """Bridge checks a case is known to fail, as strict xfails: a check that starts passing (a
    newer TransformerLens) fails the suite until its limit is removed here."""

    checks: tuple[str, ...]
    """The ``BRIDGE_CHECKS`` it fails."""
    error: type[Exception]
    """What they raise."""
    reason: str
    """Why, for the docs (measured with TransformerLens 3.9.0 and transformers 5.24.0)."""
    boots: bool = True
    """``False``: ``boot_transformers`` itself raises, so the bridge does not support the case."""


BRIDGE_LIMITS: dict[str, BridgeLimit] = {
    "cohere": BridgeLimit(
        tuple(BRIDGE_CHECKS),
        AssertionError,
        "TransformerBridge computes Cohere's attention differently from transformers' "
        "CohereAttention: its z is off the o_proj input by up to 0.9, and its own logits off the "
        "model's by 0.05 (largest logit 0.18)",
    ),
    "falcon_gqa": BridgeLimit(
        tuple(BRIDGE_CHECKS),
        RuntimeError,
        "TransformerBridge.boot_transformers fails on Falcon's new decoder architecture with "
        "num_kv_heads=2: it splits the fused query_key_value weight (64 rows) as [32, 8, 8], "
        "one KV head's worth",
        boots=False,
    ),
    "opt_post_ln": BridgeLimit(
        ("bridge_splice",),
        RuntimeError,
        "The bridge's full forward fails on post-LN OPT (do_layer_norm_before=False, no final "
        "layer norm): 'Original component not set for model.decoder.final_layer_norm'; captures "
        "stop before it",
    ),
}
"""Cases the bridge checks are known to fail on, by case key."""

HAS_BRIDGE = importlib.util.find_spec("transformer_lens.model_bridge") is not None


def _bridge_cases(check: str) -> Any:
    """``each_case`` for a bridge check: slow (a bridge boot each), skipped without
    TransformerBridge, known failures as strict xfails."""
    params = []
    for key in CASES:
        limit = BRIDGE_LIMITS.get(key)
        marks = []
        if limit is not None and check in limit.checks:
            marks.append(pytest.mark.xfail(raises=limit.error, reason=limit.reason, strict=True))
        params.append(pytest.param(key, id=key, marks=marks))
    needs_bridge = pytest.mark.skipif(
        not HAS_BRIDGE,
        reason=f"TransformerBridge needs TransformerLens >= 3, not {version('transformer-lens')}",
    )

    def mark(test: Callable[[str], None]) -> Any:
        return pytest.mark.slow(needs_bridge(pytest.mark.parametrize("key", params)(test)))

    return mark


@cache
def bridged(key: str) -> BridgeBackend:
    """The bridge backend over ``TransformerBridge.boot_transformers`` of a fresh build of the
    case (same weights as ``built(key)``: the bridge re-wraps the modules of the model it gets).
    Its ``config.architectures`` names the class, as a checkpoint's ``config.json`` does: the
    bridge picks its adapter by it, and a config built in memory has none. The tokenizer is
    ``make_tokenizer(VOCAB)`` on disk: ``boot_transformers`` re-reads it from its folder."""
    from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
        TransformerBridge,  # TransformerLens >= 3 only: the bridge tests skip otherwise
    )

    from sae_lens_attn.backends.bridge import BridgeBackend

    model = built.__wrapped__(key)
    model.config.architectures = [CASES[key].hf_class]
    with tempfile.TemporaryDirectory() as folder:
        make_tokenizer(VOCAB).save_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(
            f"tiny-{key}", hf_model=model, tokenizer=tokenizer, device="cpu"
        )
    b = backend_for(bridge)
    assert isinstance(b, BridgeBackend)
    return b


@_bridge_cases("bridge_z")
def test_bridge_z(key: str) -> None:
    b = bridged(key)
    site = b.site(1)
    assert (site.n_heads, site.n_kv_heads) == (N_HEADS, CASES[key].kv_heads)
    tokens = batch(vocab=VOCAB)
    reference = reference_z(key, tokens)
    caps = b.capture(tokens, [b.site(0), site], convention="included")
    for layer, cap in caps.items():
        torch.testing.assert_close(cap.z.flatten(-2), reference[layer], atol=ATOL, rtol=1e-4)


@_bridge_cases("bridge_patterns")
def test_bridge_patterns(key: str) -> None:
    b = bridged(key)
    tokens = batch(vocab=VOCAB)
    with torch.no_grad():
        attentions = built(key)(tokens, output_attentions=True).attentions
    reference = reference_z(key, tokens)
    caps = b.capture(tokens, [b.site(0), b.site(1)], pattern=True, convention="included")
    for layer, cap in caps.items():
        assert cap.pattern is not None and cap.pattern.shape == (3, N_HEADS, 12, 12)
        torch.testing.assert_close(cap.pattern, attentions[layer], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(cap.z.flatten(-2), reference[layer], atol=ATOL, rtol=1e-4)


@_bridge_cases("bridge_splice")
def test_bridge_splice(key: str) -> None:
    b = bridged(key)
    site = b.site(1)
    tokens = batch(vocab=VOCAB)
    with torch.no_grad():
        clean = built(key)(tokens).logits
        with pre_hooks(key, _splice_hook(site, torch.zeros(()))):
            want = built(key)(tokens).logits
        with b.splicing({site: _replace}, convention="included"):
            got = b.forward(tokens)
    assert got is not None
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert (want - clean).abs().max() > 1e-3
