"""DFA's pre-activation is SAELens's own ``hook_sae_acts_pre``, for every SAE flag SAELens has.

The reference is always SAELens itself: the SAE's ``encode`` run on z captured independently of
this package (TransformerLens ``run_with_cache``, or a forward pre-hook on the Hugging Face output
projection), with a hook on ``hook_sae_acts_pre``. SAEs are random with non-zero ``b_dec`` and
``b_enc``, so every term of the pre-activation matters.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import pytest
import torch
from sae_lens import StandardSAEConfig
from torch import Tensor

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.analysis.attribution import NORMALISATIONS
from sae_lens_attn.sae_adapter import check_device

from .factories import batch, build_model, independent_z, random_sae, sae_lens_encode
from .hf_twins import build_hf

LAYER = 1
SAELENS_NORMALISATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
"""Every ``normalize_activations`` value SAELens 6.54 accepts (pinned below)."""
ARCHITECTURES = (
    "standard",
    "topk",
    "topk_rescaled",
    "jumprelu",
    "batchtopk_saved",
    "batchtopk_training",
)
MODELS = ("tl", "tl-gqa", "hf-gpt2", "hf-llama", "hf-neox")


@pytest.fixture(scope="module", params=MODELS)
def named_model(request: pytest.FixtureRequest) -> tuple[str, Any]:
    name = request.param
    if name.startswith("tl"):
        return name, build_model(
            n_kv_heads=2, attn_only=False, seed=1
        ) if name == "tl-gqa" else build_model()
    return name, build_hf(name[3:])


make_sae = partial(random_sae, d_sae=48, k=6, value_bias_convention="included")
"""A random SAE of an architecture with every bias non-zero, in the included convention (a
``folder`` for ``"batchtopk_saved"``)."""


def close(actual: Tensor, expected: Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol)


def test_saelens_normalisations_are_the_ones_dfa_handles() -> None:
    """Pins the host: SAELens accepts exactly these values, and DFA handles each."""
    for value in SAELENS_NORMALISATIONS:
        StandardSAEConfig(d_in=4, d_sae=4, normalize_activations=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize_activations must be"):
        StandardSAEConfig(d_in=4, d_sae=4, normalize_activations="rms")  # type: ignore[arg-type]
    assert set(NORMALISATIONS) == set(SAELENS_NORMALISATIONS)


def _flag_cases() -> list[Any]:
    """Model × architecture × normalisation × apply_b_dec_to_input. Cases that leave the
    architecture or the normalisation at its default run always; the rest are marked slow."""
    cases = []
    for case in itertools.product(MODELS, ARCHITECTURES, SAELENS_NORMALISATIONS, (True, False)):
        one_flag = case[1] == "standard" or case[2] == "none"
        cases.append(pytest.param(*case, marks=() if one_flag else pytest.mark.slow))
    return cases


@pytest.mark.parametrize(
    "named_model, architecture, normalize_activations, apply_b_dec_to_input",
    _flag_cases(),
    indirect=["named_model"],
)
def test_pre_act_is_saelens_hook_sae_acts_pre(
    named_model, architecture, normalize_activations, apply_b_dec_to_input, tmp_path
) -> None:
    _, model = named_model
    site = AttnSite.from_model(model, LAYER)
    sae = make_sae(
        site,
        architecture,
        tmp_path,
        normalize_activations=normalize_activations,
        apply_b_dec_to_input=apply_b_dec_to_input,
    )
    toks = batch()
    pre, acts = sae_lens_encode(sae, independent_z(model, toks, LAYER))

    result = sla.analysis.dfa(model, sae, toks, feature_chunk=20)
    close(result.pre_act, pre)
    close(result.acts, acts)
    close(result.by_src.sum(2) + result.bias, result.pre_act)
    close(result.by_head.sum(2), result.by_src.sum(2))
    if normalize_activations != "constant_norm_rescale":  # z = 0 has no norm to rescale by
        bias, _ = sae_lens_encode(sae, torch.zeros(1, site.n_heads, site.d_head))
        close(result.bias, bias[0])  # c_f: what the SAE makes of z = 0

    peaks = sla.analysis.dfa_at_peaks(model, sae, toks, feature_chunk=7)
    fired = peaks.fired  # (B, F): every feature with a peak fires there
    assert torch.equal(fired, acts.amax(1) > 0) and torch.equal(fired, peaks.mask)
    at_peaks = peaks.positions.clamp(min=0)[:, None]  # (B, 1, F)
    close(peaks.pre_act[fired], pre.gather(1, at_peaks)[:, 0][fired])
    close(peaks.acts[fired], acts.gather(1, at_peaks)[:, 0][fired])
    close((peaks.by_src.sum(1) + peaks.bias)[fired], peaks.pre_act[fired])
    assert peaks.pre_act[~fired].isnan().all()  # no peak: nothing attributed


@pytest.mark.parametrize("architecture", ["topk_rescaled", "batchtopk_training"])
def test_rescaled_topk_reports_the_activation_scale(model, architecture, tmp_path) -> None:
    """``rescale_acts_by_decoder_norm``: hook_sae_acts_pre is the unscaled pre-activation and a
    selected feature's activation is ``‖W_dec[f]‖ · pre_act``; ``activation_scale`` says so."""
    sae = make_sae(AttnSite.from_model(model, LAYER), architecture, tmp_path)
    assert getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
    result = sla.analysis.dfa(model, sae, batch())
    close(result.activation_scale, sae.W_dec.norm(dim=-1))
    active = result.acts > 0
    assert active.any()
    scaled = result.activation_scale * result.pre_act
    close(result.acts[active], scaled[active])
    plain = make_sae(AttnSite.from_model(model, LAYER), "topk", tmp_path)
    assert torch.equal(sla.analysis.dfa(model, plain, batch()).activation_scale, torch.ones(48))


@pytest.mark.parametrize("reshape_activations", ["hook_z", "none"])
def test_sae_saved_by_the_saelens_runner_is_read_flattened(
    named_model, reshape_activations, tmp_path
) -> None:
    """SAELens's runner saves hook_z SAEs with ``reshape_activations="none"``: same DFA."""
    _, model = named_model
    site = AttnSite.from_model(model, LAYER)
    sae = make_sae(site, "standard", tmp_path, reshape_activations=reshape_activations)
    toks = batch()
    pre, _ = sae_lens_encode(sae, independent_z(model, toks, LAYER))
    result = sla.analysis.dfa(model, sae, toks)
    close(result.pre_act, pre)
    close(result.by_src.sum(2) + result.bias, result.pre_act)
    peaks = sla.analysis.dfa_at_peaks(model, sae, toks)
    fired = peaks.fired
    assert fired.any()
    at_peaks = result.pre_act.gather(1, peaks.positions.clamp(min=0)[:, None])[:, 0]
    close(peaks.pre_act[fired], at_peaks[fired])


def test_unknown_normalisation_is_refused(model, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path)
    sae.cfg.normalize_activations = "rms"  # type: ignore[assignment]  (a future SAELens value)
    expected = (
        r"normalize_activations='rms' \(supported: \['none', 'expected_average_only_in', "
        r"'covariance_whitening', 'constant_norm_rescale', 'layer_norm'\]\)"
    )
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa(model, sae, batch())
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa_at_peaks(model, sae, batch())


def test_unknown_reshape_activations_is_refused(model, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path)
    sae.cfg.reshape_activations = "hook_q"  # type: ignore[assignment]
    expected = r"reshape_activations='hook_q' is not supported \(valid: \['hook_z', 'none'\]\)"
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa(model, sae, batch())
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa_at_peaks(model, sae, batch())


def test_sae_on_another_device_is_refused(model, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path).to("meta")
    expected = (
        r"the SAE's parameters are on meta but the model's activations are on cpu: "
        r"move the SAE there with sae.to\('cpu'\)"
    )
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa(model, sae, batch())
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa_at_peaks(model, sae, batch())
    check_device(make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path), torch.zeros(1))


@pytest.mark.parametrize("sae_dtype", [torch.float64, torch.bfloat16])
def test_sae_of_another_dtype_gives_an_exact_result(model, sae_dtype, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path).to(sae_dtype)
    toks = batch()
    result = sla.analysis.dfa(model, sae, toks)
    close(result.by_src.sum(2) + result.bias, result.pre_act, 1e-5)
    pre, _ = sae_lens_encode(sae, independent_z(model, toks, LAYER))
    close(result.pre_act, pre, 1e-4 if sae_dtype == torch.float64 else 5e-2)


HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
"""Tolerances for z rounded to the model's dtype (about 2⁻¹¹ and 2⁻⁸ relative)."""


@pytest.mark.parametrize("sae_in_model_dtype", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype, sae_in_model_dtype, tmp_path) -> None:
    model = build_model(dtype=dtype)
    sae = make_sae(AttnSite.from_model(model, LAYER), "jumprelu", tmp_path)
    if sae_in_model_dtype:
        sae = sae.to(dtype)
    toks = batch()
    result = sla.analysis.dfa(model, sae, toks)
    assert result.pre_act.dtype == torch.float32
    close(result.by_src.sum(2) + result.bias, result.pre_act, HALF_TOLERANCE[dtype])
    pre, acts = sae_lens_encode(sae, independent_z(model, toks, LAYER))
    close(result.pre_act, pre, 1e-4 if not sae_in_model_dtype else HALF_TOLERANCE[dtype])
    close(result.acts, acts, 1e-4 if not sae_in_model_dtype else HALF_TOLERANCE[dtype])
    peaks = sla.analysis.dfa_at_peaks(model, sae, toks)
    fired = peaks.fired
    assert fired.any()
    close((peaks.by_src.sum(1) + peaks.bias)[fired], peaks.pre_act[fired], HALF_TOLERANCE[dtype])
