"""Attention variants in the nnsight backend, each on a tiny model built from its config.

Every row is checked against computations that do not go through the backend: z against a
forward pre-hook on the HF output projection, patterns against the eager model's
``output_attentions=True`` attentions, values through the DFA invariant, splices against a
pre-hook doing the same replacement. Then what is special about each variant: Gemma-2's logit
softcap, which transformers 4.57's SDPA path drops (patterns and z must come from one
computation); GPT-OSS's attention sinks (pattern rows sum to < 1: no folded convention); OPT,
StableLM and Qwen2-MoE, which return weights only with ``output_attentions=True``; post-LN OPT;
BLOOM, whose forward rejects unknown keywords; DeepSeek's multi-head latent attention (no
``v_proj``, ``v_head_dim`` != the query/key width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import nnsight
import pytest
import torch
import transformers
from torch import Tensor

import sae_lens_attn as sla
from sae_lens_attn import NNsightBackend, backend_for
from sae_lens_attn.backends import architectures as arch_table

from .factories import batch, independent_z, out_proj, out_proj_hooks, out_proj_inputs, random_sae
from .hf_twins import build_hf, supports_sdpa

VARIANTS = (
    "gemma2_softcap",
    "gpt_oss",
    "opt",
    "opt_post_ln",
    "stablelm",
    "qwen2_moe",
    "bloom",
    "deepseek_v3",
    "deepseek_v2",
)
"""Configs in ``hf_twins`` beyond ``ALL_ARCHITECTURES`` (whose tests key tables by arch name)."""
NO_SDPA = {"gpt_oss", "bloom"}  # transformers 4.57 refuses attn_implementation="sdpa" for them
NO_FOLDED = {"gpt_oss", "deepseek_v3", "deepseek_v2"}
"""Attention sinks (GPT-OSS) and latent values (DeepSeek MLA): the folded convention is refused."""
MODELS = [(arch, "eager") for arch in VARIANTS] + [
    (arch, "sdpa") for arch in VARIANTS if arch not in NO_SDPA
]
WITH_CONVENTIONS = [
    (arch, implementation, convention)
    for arch, implementation in MODELS
    for convention in ("included", "folded")
    if convention == "included" or arch not in NO_FOLDED
]
ATOL = 1e-5
NO_SDPA_HERE = f"transformers {transformers.__version__} refuses SDPA for this architecture"
"""Why an SDPA case is skipped: transformers 5 refuses it for Gemma-2, which 4.57 runs."""


def _params(cases: Sequence[tuple[str, ...]]) -> list[Any]:
    """``cases`` as pytest params, an SDPA case skipped where this transformers refuses it."""
    return [
        pytest.param(
            *case,
            marks=pytest.mark.skipif(
                case[1] == "sdpa" and not supports_sdpa(case[0]), reason=NO_SDPA_HERE
            ),
        )
        for case in cases
    ]


def backend(model: Any) -> NNsightBackend:
    b = backend_for(model)
    assert isinstance(b, NNsightBackend)
    return b


@cache
def built(arch: str, implementation: str = "eager") -> Any:
    """One model per (arch, implementation) for the tests that only read it."""
    return build_hf(arch, attn_implementation=implementation)


each_model = pytest.mark.parametrize(("arch", "implementation"), _params(MODELS))
each_model_and_convention = pytest.mark.parametrize(
    ("arch", "implementation", "convention"), _params(WITH_CONVENTIONS)
)


@each_model
def test_z_is_the_output_projection_input(arch, implementation) -> None:
    model = built(arch, implementation)
    b = backend(model)
    tokens = batch()
    sites = [b.site(0), b.site(1)]
    reference = out_proj_inputs(model, tokens)
    included = b.capture(tokens, sites, convention="included")
    for site in sites:
        torch.testing.assert_close(included[site.layer].z.flatten(-2), reference[site.layer])
    if arch not in NO_FOLDED:
        folded = b.capture(tokens, sites, convention="folded")
        for site in sites:
            want = reference[site.layer].unflatten(-1, (site.n_heads, site.d_head))
            torch.testing.assert_close(folded[site.layer].z, want - b.value_bias(site))


@each_model
def test_patterns_are_the_eager_models_attentions(arch, implementation) -> None:
    """With patterns, the whole pass runs eagerly: patterns and z are the eager model's."""
    model = built(arch, implementation)
    eager = built(arch)  # same seed, same weights
    tokens = batch()
    with torch.no_grad():
        attentions = eager(tokens, output_attentions=True).attentions
    want_z = out_proj_inputs(eager, tokens)
    b = backend(model)
    caps = b.capture(tokens, [b.site(0), b.site(1)], pattern=True, convention="included")
    for layer, cap in caps.items():
        assert cap.pattern is not None
        torch.testing.assert_close(cap.pattern, attentions[layer], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(cap.z.flatten(-2), want_z[layer], atol=ATOL, rtol=1e-4)
    assert model.config._attn_implementation == implementation  # restored after the run


@each_model_and_convention
def test_dfa_sums_to_the_pre_activation(arch, implementation, convention) -> None:
    model = built(arch, implementation)
    site = backend(model).site(1)
    sae = random_sae(site, value_bias_convention=convention)
    tokens = batch()
    result = sla.analysis.dfa(model, sae, tokens)
    torch.testing.assert_close(
        result.by_src.sum(2) + result.bias, result.pre_act, atol=1e-4, rtol=1e-4
    )
    # and pre_act is the SAE's pre-activation on the eager model's z (the pass DFA ran)
    z = independent_z(built(arch), tokens, 1, convention=convention)
    hidden_pre = (z.flatten(-2) - sae.b_dec) @ sae.W_enc + getattr(sae, "b_enc", 0)
    torch.testing.assert_close(result.pre_act, hidden_pre, atol=1e-4, rtol=1e-4)


@each_model_and_convention
def test_splice_changes_logits_as_a_pre_hook_would(arch, implementation, convention) -> None:
    model = built(arch, implementation)
    b = backend(model)
    site = b.site(1)
    bias = b.value_bias(site) if convention == "folded" else torch.zeros(site.n_heads, site.d_head)

    def replace(z: Tensor) -> Tensor:  # z in `convention`
        return 0.5 * z.flip(-2) + 0.1

    def hook(layer: int, z_flat: Tensor) -> Tensor | None:
        if layer != site.layer:
            return None
        z = z_flat.unflatten(-1, (site.n_heads, site.d_head))
        return (replace(z - bias) + bias).flatten(-2)

    tokens = batch()
    with torch.no_grad():
        clean = model(tokens).logits
        with out_proj_hooks(model, hook):
            want = model(tokens).logits
        with b.splicing({site: replace}, convention=convention):
            got = b.forward(tokens)
    assert got is not None
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert (want - clean).abs().max() > 1e-2


@pytest.mark.skipif(not supports_sdpa("gemma2_softcap"), reason=NO_SDPA_HERE)
def test_gemma2_sdpa_softcap_patterns_and_z_come_from_one_eager_pass() -> None:
    """transformers 4.57's SDPA drops attn_logit_softcapping. z without patterns is what the
    SDPA model computes; with patterns (and values, for DFA) the pass runs eagerly, z included."""
    sdpa, eager = (build_hf("gemma2_softcap", attn_implementation=i) for i in ("sdpa", "eager"))
    assert sdpa.config.attn_logit_softcapping == 1.0
    tokens = batch()
    sdpa_z, eager_z = out_proj_inputs(sdpa, tokens), out_proj_inputs(eager, tokens)
    assert (sdpa_z[1] - eager_z[1]).abs().max() > 1.0  # measured 1.9: the softcap matters
    b = backend(sdpa)
    sites = [b.site(0), b.site(1)]
    alone = b.capture(tokens, sites, convention="included")
    with_patterns = b.capture(tokens, sites, pattern=True, values=True, convention="included")
    for layer in (0, 1):
        torch.testing.assert_close(alone[layer].z.flatten(-2), sdpa_z[layer])
        cap = with_patterns[layer]
        assert cap.pattern is not None and cap.values is not None
        torch.testing.assert_close(cap.z.flatten(-2), eager_z[layer], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(
            torch.einsum("bhqs,bshd->bqhd", cap.pattern, cap.values), cap.z, atol=ATOL, rtol=1e-4
        )
    sae = random_sae(sites[1], value_bias_convention="included")
    result = sla.analysis.dfa(sdpa, sae, tokens)
    torch.testing.assert_close(
        result.by_src.sum(2) + result.bias, result.pre_act, atol=1e-4, rtol=1e-4
    )


def test_attention_sinks_leave_rows_summing_to_less_than_one() -> None:
    model = build_hf("gpt_oss")
    assert arch_table.hf_architecture("GptOssForCausalLM").attention_sinks
    b = backend(model)
    caps = b.capture(
        batch(), [b.site(0), b.site(1)], pattern=True, values=True, convention="included"
    )
    for cap in caps.values():
        assert cap.pattern is not None and cap.values is not None
        assert cap.pattern.sum(-1).max() < 0.99  # the sinks take a share of every row
        torch.testing.assert_close(  # and still z = A·v exactly: the sinks have no value
            torch.einsum("bhqs,bshd->bqhd", cap.pattern, cap.values), cap.z, atol=ATOL, rtol=1e-4
        )
    assert b.native_convention == "included"


@pytest.mark.parametrize("arch", sorted(NO_FOLDED))
def test_folded_convention_is_refused(arch) -> None:
    model = build_hf(arch)
    b = backend(model)
    site = b.site(0)
    name = type(model).__name__
    why = r"Σ_s A ≠ 1" if arch == "gpt_oss" else r"multi-head latent attention.*not affine"
    match = (
        rf"'folded' value-bias convention is undefined for {name}: .*{why}.*convention='included'"
    )
    with pytest.raises(ValueError, match=match):
        b.value_bias(site)
    with pytest.raises(ValueError, match=match):
        b.capture(batch(), [site], convention="folded")
    with pytest.raises(ValueError, match=match), b.splicing({site: lambda z: z}):
        pass
    with pytest.raises(ValueError, match=match):
        sla.analysis.dfa(model, random_sae(site, value_bias_convention="folded"), batch())


def test_post_ln_opt_folds_the_value_projection_bias_alone() -> None:
    """Post-LN OPT computes its values from the un-normed residual: b_V' = b_V."""
    model = build_hf("opt_post_ln")
    assert not model.config.do_layer_norm_before
    b = backend(model)
    for site in (b.site(0), b.site(1)):
        v_proj = model.model.decoder.layers[site.layer].self_attn.v_proj
        torch.testing.assert_close(b.value_bias(site), v_proj.bias.detach().view(4, -1))
    pre_ln = build_hf("opt")
    attention = pre_ln.model.decoder.layers[0]
    norm, v_proj = attention.self_attn_layer_norm, attention.self_attn.v_proj
    assert norm.bias.abs().max() > 0  # pre-LN OPT folds β·W_V too: the two differ
    with torch.no_grad():
        want = v_proj(norm.bias).view(4, -1)  # b_V + β·W_V
    torch.testing.assert_close(backend(pre_ln).value_bias(backend(pre_ln).site(0)), want)


def test_bloom_runs_on_a_plain_nnsight_wrapper_without_remote_keywords() -> None:
    """nnsight.NNsight passes trace keywords to the HF forward, and BLOOM rejects unknown ones."""
    model = build_hf("bloom")
    tokens = batch()
    wrapped = NNsightBackend(nnsight.NNsight(model))
    z = wrapped.capture(tokens, [wrapped.site(1)], pattern=True, convention="included")[1].z
    torch.testing.assert_close(z.flatten(-2), out_proj_inputs(model, tokens)[1])
    with pytest.raises(ValueError, match="remote=True needs an nnsight model .*Remotable"):
        NNsightBackend(model, remote=True)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_latent_attention_heads_are_value_wide_and_not_grouped(arch) -> None:
    model = build_hf(arch)
    config = model.config
    site = backend(model).site(1)
    assert site.d_head == config.v_head_dim != config.qk_nope_head_dim + config.qk_rope_head_dim
    assert site.n_kv_heads == site.n_heads == config.num_attention_heads
    assert site.d_in == out_proj(model, 1).in_features


def test_a_row_without_values_captures_splices_and_evaluates(monkeypatch) -> None:
    """Values matter only when requested: z, patterns, splices and sla.evaluate work without."""
    name = "DeepseekV3ForCausalLM"
    row = arch_table.HF_ARCHITECTURES[name]
    monkeypatch.setitem(
        arch_table.HF_ARCHITECTURES,
        name,
        arch_table.HFArchitecture(**{**row.__dict__, "values": None}),
    )
    model = build_hf("deepseek_v3")
    b = NNsightBackend(model)
    site = b.site(1)
    tokens = batch()
    cap = b.capture(tokens, [site], pattern=True, convention="included")[1]
    torch.testing.assert_close(cap.z.flatten(-2), out_proj_inputs(model, tokens)[1])
    assert cap.pattern is not None
    with torch.no_grad(), b.splicing({site: torch.zeros_like}, convention="included"):
        zeroed = b.forward(tokens)
    with (
        torch.no_grad(),
        out_proj_hooks(model, lambda layer, z: torch.zeros_like(z) if layer else None),
    ):
        torch.testing.assert_close(zeroed, model(tokens).logits)
    sae = random_sae(site)
    metrics = sla.evaluate(b, sae, tokens, batch_size=3)
    assert metrics["l0"] > 0
    assert all(math.isfinite(metrics[k]) for k in ("ce_clean", "ce_sae", "ce_zero_ablation", "kl"))
    assert metrics["ce_zero_ablation"] != metrics["ce_clean"]
    with pytest.raises(ValueError, match=rf"values were requested from {name}.*values=None"):
        b.capture(tokens, [site], values=True, convention="included")
    with pytest.raises(ValueError, match=r"values were requested"):
        sla.analysis.dfa(b, sae, tokens)
    with pytest.raises(ValueError, match=rf"undefined for {name}: no module of it outputs its"):
        b.capture(tokens, [site], convention="folded")


@pytest.mark.parametrize("arch", ["gemma2_softcap", "gpt_oss", "opt", "deepseek_v3"])
def test_early_stopped_pattern_runs_leave_module_forwards_alone(arch) -> None:
    """transformers' check_model_inputs (Gemma-2, GPT-OSS, DeepSeek) records attentions by
    swapping module forwards back only when the forward returns, so output_attentions=True goes
    only to rows that need it (OPT), whose forwards are not swapped."""
    model = build_hf(arch)
    b = backend(model)
    tokens = batch()
    b.capture(tokens, [b.site(0)], pattern=True, convention="included")  # stops after layer 0
    slots = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    for _ in range(2):
        b.capture(tokens, [b.site(0)], pattern=True, convention="included")
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == slots


@pytest.mark.parametrize("arch", VARIANTS)
def test_build_is_deterministic_per_seed(arch) -> None:
    model = build_hf(arch)
    original, rebuilt = model.state_dict(), build_hf(arch).state_dict()
    reseeded = build_hf(arch, seed=1).state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in original.items():
        torch.testing.assert_close(rebuilt[name], tensor, atol=0, rtol=0)
        if name in parameters:
            assert not torch.equal(reseeded[name], tensor), name
