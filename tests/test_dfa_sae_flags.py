"""DFA's pre-activation is SAELens's own ``hook_sae_acts_pre``, for every SAE flag SAELens has.

The reference is always SAELens itself: the SAE's ``encode`` run on z captured independently of
this package (TransformerLens ``run_with_cache``, or a forward pre-hook on the Hugging Face output
projection), with a hook on ``hook_sae_acts_pre``. SAEs are random with non-zero ``b_dec`` and
``b_enc``, so every term of the pre-activation matters.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.analysis.attribution import NORMALISATIONS
from sae_lens_attn.sae_adapter import check_device

from .conftest import build_model
from .hf_twins import VOCAB_SIZE, build_hf

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

_OUT_PROJ: dict[str, Callable[[Any], nn.Module]] = {
    "gpt2": lambda m: m.transformer.h[LAYER].attn.c_proj,
    "llama": lambda m: m.model.layers[LAYER].self_attn.o_proj,
    "neox": lambda m: m.gpt_neox.layers[LAYER].attention.dense,
}
"""The module whose input is z, written out here so the capture is independent of the package."""


@pytest.fixture(scope="module", params=MODELS)
def named_model(request: pytest.FixtureRequest) -> tuple[str, Any]:
    name = request.param
    if name.startswith("tl"):
        return name, build_model(
            n_kv_heads=2, attn_only=False, seed=1
        ) if name == "tl-gqa" else build_model()
    return name, build_hf(name[3:])


def tokens(n: int = 3, pos: int = 12, seed: int = 0) -> Tensor:
    return torch.randint(2, VOCAB_SIZE, (n, pos), generator=torch.Generator().manual_seed(seed))


def independent_z(name: str, model: Any, toks: Tensor) -> Tensor:
    """z ``[batch, pos, n_heads, d_head]`` with b_V included, captured without this package."""
    if name.startswith("tl"):
        hook = f"blocks.{LAYER}.attn.hook_z"
        _, cache = model.run_with_cache(toks, names_filter=[hook])
        return cache[hook]
    seen: list[Tensor] = []
    handle = _OUT_PROJ[name[3:]](model).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            model(toks)
    finally:
        handle.remove()
    site = AttnSite.from_model(model, LAYER)
    return seen[0].unflatten(-1, (site.n_heads, site.d_head))


def make_sae(
    site: AttnSite,
    architecture: str,
    tmp_path: Path,
    *,
    normalize_activations: str = "none",
    apply_b_dec_to_input: bool = True,
    reshape_activations: str = "hook_z",
    d_sae: int = 48,
    seed: int = 0,
) -> SAE[Any]:
    """A random SAE of ``architecture`` with every bias non-zero, in the included convention."""
    kwargs: dict[str, Any] = {
        "d_in": site.d_in,
        "d_sae": d_sae,
        "normalize_activations": normalize_activations,
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "reshape_activations": reshape_activations,
    }
    sae_cls, cfg = {
        "standard": lambda: (StandardSAE, StandardSAEConfig(**kwargs)),
        "topk": lambda: (TopKSAE, TopKSAEConfig(k=6, **kwargs)),
        "topk_rescaled": lambda: (
            TopKSAE,
            TopKSAEConfig(k=6, rescale_acts_by_decoder_norm=True, **kwargs),
        ),
        "jumprelu": lambda: (JumpReLUSAE, JumpReLUSAEConfig(**kwargs)),
        "batchtopk_saved": lambda: (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig(k=6, **kwargs),
        ),
        "batchtopk_training": lambda: (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig(k=6, **kwargs),
        ),
    }[architecture]()
    meta = {"hook_name": site.hook_name, "n_heads": site.n_heads, "n_kv_heads": site.n_kv_heads}
    for key, value in {**meta, "d_head": site.d_head, "value_bias_convention": "included"}.items():
        cfg.metadata[key] = value
    torch.manual_seed(seed)
    sae: Any = sae_cls(cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.2)
    if architecture == "batchtopk_saved":
        sae.save_inference_model(tmp_path / "batchtopk")
        sae = SAE.load_from_disk(tmp_path / "batchtopk")
        assert type(sae) is JumpReLUSAE  # SAELens's inference architecture for BatchTopK
    return sae


def sae_lens_encode(sae: SAE[Any], z: Tensor) -> tuple[Tensor, Tensor]:
    """``(hook_sae_acts_pre, encode(z))`` as SAELens computes them, z ``[..., n_heads, d_head]``."""
    seen: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
        seen.append(out.detach())

    handle = sae.hook_sae_acts_pre.register_forward_hook(keep)
    try:
        with torch.no_grad():
            # SAELens flattens hook_z itself in this mode (off on training SAEs, whatever the cfg)
            acts = sae.encode(z if sae.hook_z_reshaping_mode else z.flatten(-2))
    finally:
        handle.remove()
    return seen[0], acts.detach()


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
    name, model = named_model
    site = AttnSite.from_model(model, LAYER)
    sae = make_sae(
        site,
        architecture,
        tmp_path,
        normalize_activations=normalize_activations,
        apply_b_dec_to_input=apply_b_dec_to_input,
    )
    toks = tokens()
    pre, acts = sae_lens_encode(sae, independent_z(name, model, toks))

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
    result = sla.analysis.dfa(model, sae, tokens())
    close(result.activation_scale, sae.W_dec.norm(dim=-1))
    active = result.acts > 0
    assert active.any()
    scaled = result.activation_scale * result.pre_act
    close(result.acts[active], scaled[active])
    plain = make_sae(AttnSite.from_model(model, LAYER), "topk", tmp_path)
    assert torch.equal(sla.analysis.dfa(model, plain, tokens()).activation_scale, torch.ones(48))


@pytest.mark.parametrize("reshape_activations", ["hook_z", "none"])
def test_sae_saved_by_the_saelens_runner_is_read_flattened(
    named_model, reshape_activations, tmp_path
) -> None:
    """SAELens's runner saves hook_z SAEs with ``reshape_activations="none"``: same DFA."""
    name, model = named_model
    site = AttnSite.from_model(model, LAYER)
    sae = make_sae(site, "standard", tmp_path, reshape_activations=reshape_activations)
    toks = tokens()
    pre, _ = sae_lens_encode(sae, independent_z(name, model, toks))
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
        sla.analysis.dfa(model, sae, tokens())
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa_at_peaks(model, sae, tokens())


def test_unknown_reshape_activations_is_refused(model, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path)
    sae.cfg.reshape_activations = "hook_q"  # type: ignore[assignment]
    expected = r"reshape_activations='hook_q' is not supported \(valid: \['hook_z', 'none'\]\)"
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa(model, sae, tokens())
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa_at_peaks(model, sae, tokens())


def test_sae_on_another_device_is_refused(model, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path).to("meta")
    expected = (
        r"the SAE's parameters are on meta but the model's activations are on cpu: "
        r"move the SAE there with sae.to\('cpu'\)"
    )
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa(model, sae, tokens())
    with pytest.raises(ValueError, match=expected):
        sla.analysis.dfa_at_peaks(model, sae, tokens())
    check_device(make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path), torch.zeros(1))


@pytest.mark.parametrize("sae_dtype", [torch.float64, torch.bfloat16])
def test_sae_of_another_dtype_gives_an_exact_result(model, sae_dtype, tmp_path) -> None:
    sae = make_sae(AttnSite.from_model(model, LAYER), "standard", tmp_path).to(sae_dtype)
    toks = tokens()
    result = sla.analysis.dfa(model, sae, toks)
    close(result.by_src.sum(2) + result.bias, result.pre_act, 1e-5)
    pre, _ = sae_lens_encode(sae, independent_z("tl", model, toks))
    close(result.pre_act, pre, 1e-4 if sae_dtype == torch.float64 else 5e-2)


def half_model(dtype: torch.dtype) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_vocab=VOCAB_SIZE,
        attn_only=True,
        act_fn="gelu",
        normalization_type="LN",
        dtype=dtype,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_V.normal_(0, 0.5)  # type: ignore[union-attr]
    return model.eval()


HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
"""Tolerances for z rounded to the model's dtype (about 2⁻¹¹ and 2⁻⁸ relative)."""


@pytest.mark.parametrize("sae_in_model_dtype", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype, sae_in_model_dtype, tmp_path) -> None:
    model = half_model(dtype)
    sae = make_sae(AttnSite.from_model(model, LAYER), "jumprelu", tmp_path)
    if sae_in_model_dtype:
        sae = sae.to(dtype)
    toks = tokens()
    result = sla.analysis.dfa(model, sae, toks)
    assert result.pre_act.dtype == torch.float32
    close(result.by_src.sum(2) + result.bias, result.pre_act, HALF_TOLERANCE[dtype])
    pre, acts = sae_lens_encode(sae, independent_z("tl", model, toks))
    close(result.pre_act, pre, 1e-4 if not sae_in_model_dtype else HALF_TOLERANCE[dtype])
    close(result.acts, acts, 1e-4 if not sae_in_model_dtype else HALF_TOLERANCE[dtype])
    peaks = sla.analysis.dfa_at_peaks(model, sae, toks)
    fired = peaks.fired
    assert fired.any()
    close((peaks.by_src.sum(1) + peaks.bias)[fired], peaks.pre_act[fired], HALF_TOLERANCE[dtype])
