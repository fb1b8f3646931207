"""The offline HF models and their TransformerLens twins agree: logits, z in both b_V conventions."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

import pytest
import torch
import transformers
from torch import Tensor

from .factories import out_proj_hooks
from .hf_twins import (
    ALL_ARCHITECTURES,
    ARCHITECTURES_WITH_TWINS,
    BOS_ID,
    N_CTX,
    PAD_ID,
    VOCAB_SIZE,
    build_hf,
    build_twin,
    make_tokenizer,
    supports_sdpa,
)

ATOL = 1e-5


def _split_heads(flat: Tensor, n_heads: int) -> Tensor:
    return flat.unflatten(-1, (n_heads, -1))  # (B, T, H*D) -> (B, T, H, D)


def _gpt2_b_V(hf: Any, layer: int) -> Tensor:
    d_model = hf.config.n_embd
    return _split_heads(hf.transformer.h[layer].attn.c_attn.bias[2 * d_model :], hf.config.n_head)


def _neox_b_V(hf: Any, layer: int) -> Tensor:
    # query_key_value is laid out (head, qkv, d_head), unlike GPT-2's (qkv, head, d_head).
    bias = hf.gpt_neox.layers[layer].attention.query_key_value.bias
    return bias.view(hf.config.num_attention_heads, 3, -1)[:, 2]


def _v_proj_b_V(hf: Any, layer: int) -> Tensor | None:
    bias = hf.model.layers[layer].self_attn.v_proj.bias
    if bias is None:
        return None
    group = hf.config.num_attention_heads // hf.config.num_key_value_heads
    return _split_heads(bias, hf.config.num_key_value_heads).repeat_interleave(group, dim=0)


B_V: dict[str, Callable[[Any, int], Tensor | None]] = {
    "gpt2": _gpt2_b_V,
    "neox": _neox_b_V,
    "llama": _v_proj_b_V,
    "mistral": _v_proj_b_V,
    "gemma": _v_proj_b_V,
    "gemma2": _v_proj_b_V,
    "qwen2": _v_proj_b_V,
}
"""Value bias per query head, [n_heads, d_head], read straight from the HF weights (None: none)."""

HAS_VALUE_BIAS = {"gpt2", "neox", "qwen2"}


TOKENS = torch.randint(0, VOCAB_SIZE, (3, N_CTX), generator=torch.Generator().manual_seed(0))


class Run(NamedTuple):
    logits: Tensor
    """[batch, pos, d_vocab]"""
    z: list[Tensor]
    """Per layer, [batch, pos, n_heads, d_head]: HF's o_proj input split into heads, or hook_z."""


@cache
def hf_model(arch: str) -> Any:
    return build_hf(arch)


@cache
def hf_run(arch: str) -> Run:
    model = hf_model(arch)
    z_flat: dict[int, Tensor] = {}  # each layer's output projection input (factories' table)
    with torch.no_grad(), out_proj_hooks(model, lambda layer, z: z_flat.__setitem__(layer, z)):
        logits = model(TOKENS).logits
    heads = model.config.num_attention_heads
    return Run(logits, [_split_heads(z_flat[layer], heads) for layer in sorted(z_flat)])


@cache
def twin_run(arch: str, fold_value_biases: bool) -> Run:
    twin = build_twin(hf_model(arch), fold_value_biases=fold_value_biases)
    with torch.no_grad():
        logits, activations = twin.run_with_cache(
            TOKENS, names_filter=lambda name: name.endswith("hook_z")
        )
    assert isinstance(logits, Tensor)
    return Run(logits, [activations["z", layer] for layer in range(twin.cfg.n_layers)])


all_archs = pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
twin_archs = pytest.mark.parametrize("arch", ARCHITECTURES_WITH_TWINS)
both_conventions = pytest.mark.parametrize(
    "fold_value_biases", [False, True], ids=["b_V_in_z", "b_V_folded"]
)


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@twin_archs
@both_conventions
def test_twin_logits_equal_hf(arch: str, fold_value_biases: bool) -> None:
    twin_logits, hf_logits = twin_run(arch, fold_value_biases).logits, hf_run(arch).logits
    assert twin_logits.shape == hf_logits.shape
    assert _max_abs_diff(twin_logits, hf_logits) <= ATOL


@twin_archs
@both_conventions
def test_twin_hook_z_equals_hf_o_proj_input(arch: str, fold_value_biases: bool) -> None:
    """hook_z is HF's z when b_V is kept, and HF's z minus b_V (per head) when it is folded."""
    model = hf_model(arch)
    for layer, (z, hf_z) in enumerate(
        zip(twin_run(arch, fold_value_biases).z, hf_run(arch).z, strict=True)
    ):
        b_V = B_V[arch](model, layer)
        expected = hf_z - b_V if fold_value_biases and b_V is not None else hf_z
        assert z.shape == expected.shape
        assert _max_abs_diff(z, expected) <= ATOL, f"layer {layer}"
        if b_V is not None:  # and the other convention is measurably different
            other = hf_z if fold_value_biases else hf_z - b_V
            assert _max_abs_diff(z, other) > 0.05, f"layer {layer}"


@all_archs
def test_hf_model_is_tiny_float32_eval_and_runs(arch: str) -> None:
    model, run = hf_model(arch), hf_run(arch)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.num_hidden_layers == len(run.z) == 2
    assert run.logits.shape == (*TOKENS.shape, VOCAB_SIZE)
    assert torch.isfinite(run.logits).all()
    assert run.logits.std() > 0.1  # random weights, not a degenerate near-zero init


@all_archs
def test_value_bias_is_non_zero_where_the_architecture_has_one(arch: str) -> None:
    model = hf_model(arch)
    for layer in range(model.config.num_hidden_layers):
        b_V = B_V[arch](model, layer)
        assert (b_V is not None) == (arch in HAS_VALUE_BIAS)
        if b_V is not None:
            assert b_V.shape == hf_run(arch).z[layer].shape[-2:]
            assert b_V.abs().min() > 0 and b_V.std() > 0.1


@all_archs
def test_build_hf_is_deterministic_per_seed(arch: str) -> None:
    original = hf_model(arch).state_dict()
    rebuilt, reseeded = build_hf(arch).state_dict(), build_hf(arch, seed=1).state_dict()
    parameter_names = {name for name, _ in hf_model(arch).named_parameters()}
    for name, tensor in original.items():
        torch.testing.assert_close(rebuilt[name], tensor, atol=0, rtol=0)
        if name in parameter_names:
            assert not torch.equal(reseeded[name], tensor), name


@pytest.mark.parametrize("arch", [arch for arch in ALL_ARCHITECTURES if arch != "gemma2"])
def test_sdpa_matches_eager(arch: str) -> None:
    with torch.no_grad():
        sdpa_logits = build_hf(arch, attn_implementation="sdpa")(TOKENS).logits
    assert _max_abs_diff(sdpa_logits, hf_run(arch).logits) <= ATOL


@pytest.mark.parametrize("arch", [*ALL_ARCHITECTURES, "gemma2_softcap", "gpt_oss", "bloom"])
def test_supports_sdpa_says_whether_sdpa_builds(arch: str) -> None:
    if supports_sdpa(arch):
        assert build_hf(arch, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    else:  # transformers 4.57: GPT-OSS and BLOOM; transformers 5: Gemma-2 too
        with pytest.raises(ValueError, match="scaled_dot_product_attention"):
            build_hf(arch, attn_implementation="sdpa")


@pytest.mark.skipif(
    not supports_sdpa("gemma2"),
    reason=f"transformers {transformers.__version__} refuses SDPA for Gemma-2",
)
def test_gemma2_sdpa_drops_attention_logit_softcapping() -> None:
    """A trap for parity tests: only Gemma-2's eager attention applies attn_logit_softcapping."""
    assert hf_model("gemma2").config.attn_logit_softcapping is not None
    with torch.no_grad():
        sdpa_logits = build_hf("gemma2", attn_implementation="sdpa")(TOKENS).logits
    assert _max_abs_diff(sdpa_logits, hf_run("gemma2").logits) > 1e-3


def test_unknown_architecture_errors_list_the_choices() -> None:
    with pytest.raises(ValueError, match="gemma2"):
        build_hf("gpt3")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        build_twin(build_hf("qwen2"), fold_value_biases=False)


def test_make_tokenizer_is_word_level_with_bos() -> None:
    tokenizer = make_tokenizer(8)
    assert tokenizer("w2 w7 w9").input_ids == [BOS_ID, 2, 7, BOS_ID]  # w9 is out of vocab: unk
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, BOS_ID)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (PAD_ID, BOS_ID)
    assert len(tokenizer) == 8
    assert tokenizer.decode([2, 3]) == "w2 w3"
    assert make_tokenizer(8, prepend_bos=False)("w2 w3").input_ids == [2, 3]
    with pytest.raises(ValueError, match="at least 3"):
        make_tokenizer(2)


def test_twin_tokenizes_like_the_hf_tokenizer() -> None:
    twin = build_twin(build_hf("gpt2"), fold_value_biases=True)
    text = "w5 w2 w63"
    expected = make_tokenizer(VOCAB_SIZE)(text).input_ids
    assert twin.cfg.tokenizer_prepends_bos
    assert twin.to_tokens(text)[0].tolist() == expected
    assert twin.to_tokens(text, prepend_bos=False)[0].tolist() == expected[1:]
