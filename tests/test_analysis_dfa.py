"""DFA: exact decomposition of the pre-activation, on both backends and every linear-encoder SAE."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.sae_adapter import encode_z

from .factories import batch, independent_z, random_sae, sae_lens_encode
from .hf_twins import PAD_ID, build_hf

SAE_ARCHITECTURES = ("standard", "topk", "jumprelu")  # jumprelu: also what BatchTopK saves as
MODELS = ["tl-mha", "tl-gqa", "hf-gpt2", "hf-llama", "hf-neox"]


@pytest.fixture(scope="module", params=MODELS)
def any_backend_model(request, model, gqa_model) -> Any:
    return {"tl-mha": model, "tl-gqa": gqa_model}.get(request.param) or build_hf(request.param[3:])


@pytest.mark.parametrize("architecture", SAE_ARCHITECTURES)
@pytest.mark.parametrize("convention", ["folded", "included"])
def test_dfa_sums_to_the_pre_activation(any_backend_model, architecture, convention) -> None:
    site = AttnSite.from_model(any_backend_model, 1)
    sae = random_sae(site, architecture, value_bias_convention=convention)
    tokens = batch()
    result = sla.analysis.dfa(any_backend_model, sae, tokens, feature_chunk=40)
    torch.testing.assert_close(
        result.by_src.sum(2) + result.bias, result.pre_act, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(result.by_head.sum(2), result.by_src.sum(2), atol=1e-4, rtol=1e-4)
    # pre_act is the SAE's own pre-activation (hook_sae_acts_pre) on z in its convention
    z = independent_z(any_backend_model, tokens, 1, convention=convention)
    hidden_pre, acts = sae_lens_encode(sae, z)
    torch.testing.assert_close(result.pre_act, hidden_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.acts, acts, atol=1e-4, rtol=1e-4)
    assert result.by_src.shape == (3, 12, 12, 96) and result.by_head.shape == (
        3,
        12,
        site.n_heads,
        96,
    )
    assert (result.by_src[:, torch.arange(12)[:, None] < torch.arange(12)] == 0).all()  # causal


def test_positions_and_features_select_from_the_full_result(model) -> None:
    site = AttnSite.from_model(model, 1)
    sae = random_sae(site)
    tokens = batch()
    full = sla.analysis.dfa(model, sae, tokens)
    peaks = full.pre_act[..., 7].argmax(-1)  # each context's max-activating position of feature 7
    picked = sla.analysis.dfa(model, sae, tokens, features=[7, 3], positions=peaks)
    assert picked.pre_act.shape == (3, 1, 2) and picked.by_src.shape == (3, 1, 12, 2)
    rows = torch.arange(3)
    torch.testing.assert_close(picked.by_src[:, 0], full.by_src[rows, peaks][..., [7, 3]])
    torch.testing.assert_close(picked.by_head[:, 0], full.by_head[rows, peaks][..., [7, 3]])
    assert picked.positions.shape == (3, 1, 2)
    assert (picked.positions == peaks[:, None, None]).all()  # one position shared by features
    # `fired` is the SAE's own activation at each entry's position being positive
    assert torch.equal(picked.fired, picked.acts > 0)
    torch.testing.assert_close(picked.acts[:, 0], full.acts[rows, peaks][..., [7, 3]])


def test_padding_is_never_attributed() -> None:
    hf = build_hf("llama")
    site = AttnSite.from_model(hf, 1)
    sae = random_sae(site)
    rows = [batch(1, n, seed=n)[0] for n in (5, 9)]
    tokens = torch.full((2, 9), PAD_ID)
    mask = torch.zeros(2, 9, dtype=torch.long)
    tokens[0, 4:], mask[0, 4:] = rows[0], 1  # left padding
    tokens[1], mask[1] = rows[1], 1
    padded = sla.analysis.dfa(hf, sae, tokens, attention_mask=mask)
    assert (padded.by_src[0, :, :4] == 0).all() and (padded.by_src[0, :4] == 0).all()
    assert not padded.mask[0, :4].any() and (padded.pre_act[0, :4] == 0).all()
    alone = sla.analysis.dfa(hf, sae, rows[0][None])
    torch.testing.assert_close(padded.by_src[0, 4:, 4:], alone.by_src[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.pre_act[0, 4:], alone.pre_act[0], atol=1e-5, rtol=1e-5)


def test_head_attribution_rows_sum_to_one_and_follow_the_decoder(model) -> None:
    site = AttnSite.from_model(model, 0)
    sae = random_sae(site)
    with torch.no_grad():
        sae.W_dec[0] = 0
        sae.W_dec[0, site.head_slice(2)] = 1.0  # feature 0 writes only through head 2
        sae.W_dec[1] = 0
    shares = sla.analysis.head_attribution(sae)
    assert shares.shape == (96, 4)
    torch.testing.assert_close(shares.sum(-1), torch.ones(96))
    assert shares[0].tolist() == [0, 0, 1, 0]
    assert shares[1].tolist() == [0.25] * 4
    block_norms = torch.stack([sae.W_dec[5, site.head_slice(h)].norm() for h in range(4)])
    torch.testing.assert_close(shares[5], block_norms / block_norms.sum())


def test_non_hook_z_sae_is_refused(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 0))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="expected a hook_z hook name"):
        sla.analysis.dfa(model, sae, batch())


def test_sae_of_another_shape_is_refused(model, gqa_model) -> None:
    gqa_sae = random_sae(AttnSite.from_model(gqa_model, 1))
    with pytest.raises(ValueError, match="trained for another model's site"):
        sla.analysis.dfa(model, gqa_sae, batch())
    wide = random_sae(AttnSite(1, 4, 4, 16))
    with pytest.raises(ValueError, match="another model's site: d_head=16 in the SAE but 8"):
        sla.analysis.dfa(model, wide, batch())


def test_unsupported_architecture_is_refused(model) -> None:
    with pytest.raises(
        ValueError,
        match=r"architecture 'gated' is not supported "
        r"\(supported: \['standard', 'topk', 'jumprelu', 'batchtopk'\]\)",
    ):
        sla.analysis.dfa(model, random_sae(AttnSite.from_model(model, 0), "gated"), batch())


def test_bad_features_positions_and_tokens_are_refused(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 0))
    with pytest.raises(
        ValueError, match=r"feature indices \[96, -1\] are out of range: the SAE has d_sae=96"
    ):
        sla.analysis.dfa(model, sae, batch(), features=[3, 96, -1])
    with pytest.raises(
        ValueError, match=r"positions \[12\] are out of range for 12 tokens \(valid: 0..11\)"
    ):
        sla.analysis.dfa(model, sae, batch(), positions=torch.tensor([0, 12, 3]))
    with pytest.raises(
        ValueError, match=r"positions must be \[batch\] or \[batch, q\] with batch=3"
    ):
        sla.analysis.dfa(model, sae, batch(), positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="tokens must be a non-empty"):
        sla.analysis.dfa(model, sae, torch.zeros(0, 12, dtype=torch.long))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_dfa_at_peaks_equals_the_full_dfa_at_each_features_peak(
    any_backend_model, architecture
) -> None:
    site = AttnSite.from_model(any_backend_model, 1)
    sae = random_sae(site, architecture, value_bias_convention="folded")
    tokens = batch()
    full = sla.analysis.dfa(any_backend_model, sae, tokens)
    peaks = sla.analysis.dfa_at_peaks(any_backend_model, sae, tokens, feature_chunk=17)
    assert peaks.by_src.shape == (3, 12, 96) and peaks.by_head.shape == (3, site.n_heads, 96)
    z = independent_z(any_backend_model, tokens, 1, convention="folded")
    acts = encode_z(sae, z)  # the SAE's own activations
    fired = acts.max(1).values > 0  # (B, F)
    assert torch.equal(peaks.fired, fired) and not fired.all()  # some never fire in a prompt
    # the max-activating position where the feature fires; none (-1) where it never does
    expected = torch.where(fired, acts.argmax(1), -1)
    assert torch.equal(peaks.positions, expected)
    rows, feats = torch.arange(3)[:, None], torch.arange(96)[None, :]
    at = expected.clamp(min=0)
    for name in ("by_src", "by_head"):
        ours = getattr(peaks, name).permute(0, 2, 1)  # (B, F, S or H)
        reference = getattr(full, name)[rows, at, :, feats]  # (B, F, S or H)
        torch.testing.assert_close(ours[fired], reference[fired], atol=1e-5, rtol=1e-4)
        assert ours[~fired].isnan().all()
    torch.testing.assert_close(peaks.pre_act[fired], full.pre_act[rows, at, feats][fired])
    torch.testing.assert_close(
        (peaks.by_src.sum(1) + peaks.bias)[fired],
        peaks.pre_act[fired],
        atol=1e-4,
        rtol=1e-4,
    )


def test_dfa_at_peaks_refuses_bad_peaks(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 0))
    with pytest.raises(ValueError, match=r"peaks must be a \[batch, F\] = \[3, 2\] tensor"):
        sla.analysis.dfa_at_peaks(
            model, sae, batch(), features=[0, 1], peaks=torch.zeros(3, 5, dtype=torch.long)
        )
    for bad in (12, -2):
        with pytest.raises(
            ValueError, match=rf"peaks \[{bad}\] are out of range: peaks must lie in 0..11"
        ):
            sla.analysis.dfa_at_peaks(
                model, sae, batch(), features=[0, 1], peaks=torch.full((3, 2), bad)
            )
    with pytest.raises(
        TypeError, match="peaks must hold integer positions, got dtype torch.float32"
    ):
        sla.analysis.dfa_at_peaks(model, sae, batch(), features=[0, 1], peaks=torch.zeros(3, 2))


def test_dfa_at_peaks_reports_features_that_never_fire(model) -> None:
    """A feature that fires nowhere in a prompt has no peak: position -1, ``fired`` and ``mask``
    False and NaN values, never an attribution at some position (0 or any other)."""
    sae: Any = random_sae(AttnSite.from_model(model, 1))
    with torch.no_grad():
        sae.b_enc[2] = -100.0  # feature 2 never fires
        sae.b_enc[1] = 100.0  # feature 1 fires everywhere
    tokens = batch()
    full = sla.analysis.dfa(model, sae, tokens, features=[2, 1])
    assert not full.fired[..., 0].any() and full.fired[..., 1].all()
    peaks = sla.analysis.dfa_at_peaks(model, sae, tokens, features=[2, 1])
    never = (slice(None), 0)
    assert not peaks.fired[never].any() and not peaks.mask[never].any()
    assert (peaks.positions[never] == -1).all()
    for values in (peaks.pre_act, peaks.acts, peaks.by_src, peaks.by_head, peaks.input_scale):
        assert values[..., 0].isnan().all()  # nothing attributed anywhere
    assert peaks.fired[:, 1].all() and not peaks.by_src[:, :, 1].isnan().any()
    rows = torch.arange(3)
    at = peaks.positions[:, 1]
    assert torch.equal(at, full.acts[..., 1].argmax(1))
    torch.testing.assert_close(peaks.pre_act[:, 1], full.pre_act[rows, at, 1])
    # explicit peaks: the DFA there, with `fired` saying whether the feature fires at it
    given = sla.analysis.dfa_at_peaks(
        model, sae, tokens, features=[2, 1], peaks=torch.zeros(3, 2, dtype=torch.long)
    )
    assert given.fired.tolist() == [[False, True]] * 3 and given.mask.all()
    torch.testing.assert_close(given.acts, full.acts[:, 0])
    torch.testing.assert_close(given.by_src, full.by_src[:, 0], atol=1e-5, rtol=1e-4)


def test_dfa_at_peaks_never_attributes_padding(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 1))
    tokens = batch()
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0  # left padding in the first prompt
    peaks = sla.analysis.dfa_at_peaks(model, sae, tokens, attention_mask=mask)
    first = peaks.positions[0]
    assert ((first >= 5) | (first == -1)).all() and (first >= 5).any()
    assert torch.equal(peaks.mask, peaks.positions >= 0)
    assert (peaks.by_src[0, :5][:, first >= 0] == 0).all()
    # a peak given at a padded position is not attributed: zero, with mask False
    at_padding = sla.analysis.dfa_at_peaks(
        model, sae, tokens, features=[0], peaks=torch.full((3, 1), 2), attention_mask=mask
    )
    assert at_padding.mask[:, 0].tolist() == [False, True, True]
    assert (at_padding.by_src[0] == 0).all() and at_padding.pre_act[0, 0] == 0


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_kernel_with_own_queries_is_the_definition_on_any_pattern(chunk) -> None:
    """The kernel against the definition DFA_f[q, h, s] = A_h[q, s] · (v_h[s] · W[h-block, f]),
    on a non-causal pattern, several queries per feature, and entries without a query."""
    from sae_lens_attn.analysis.attribution import attribute

    site = AttnSite(0, 3, 3, 4)
    sae = random_sae(site, d_sae=10)
    generator = torch.Generator().manual_seed(0)
    pattern = torch.rand(2, 3, 7, 7, generator=generator).softmax(-1)  # attends everywhere
    values = torch.randn(2, 7, 3, 4, generator=generator)
    z = torch.einsum("bhqs,bshd->bqhd", pattern, values).flatten(-2)
    features = torch.tensor([4, 0, 9])
    query = torch.randint(0, 7, (2, 2, 3), generator=generator)
    query[1, 0, 2] = -1  # no query for this entry
    result = attribute(pattern, values, z, sae, site, features, query, feature_chunk=chunk)
    W = sae.W_enc.detach()[:, features].unflatten(0, (3, 4))  # (H, D, F)
    for b, j, f in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(3)):
        q = int(query[b, j, f])
        if q < 0:
            assert result.by_src[b, j, :, f].isnan().all() and not result.mask[b, j, f]
            continue
        per_head_src = pattern[b, :, q, :] * torch.einsum("shd,hd->hs", values[b], W[..., f])
        torch.testing.assert_close(result.by_src[b, j, :, f], per_head_src.sum(0))
        torch.testing.assert_close(result.by_head[b, j, :, f], per_head_src.sum(1))
        pre = z[b, q] @ sae.W_enc[:, features[f]] + result.bias[f]
        torch.testing.assert_close(result.pre_act[b, j, f], pre.detach())
        assert int(result.positions[b, j, f]) == q


def test_kernel_with_a_prompt_where_no_feature_has_a_query() -> None:
    from sae_lens_attn.analysis.attribution import attribute

    site = AttnSite(0, 2, 2, 3)
    sae = random_sae(site, d_sae=4)
    pattern = torch.full((2, 2, 5, 5), 0.2)
    values = torch.randn(2, 5, 2, 3, generator=torch.Generator().manual_seed(0))
    z = torch.einsum("bhqs,bshd->bqhd", pattern, values).flatten(-2)
    query = torch.tensor([[[-1, -1]], [[2, -1]]])
    result = attribute(pattern, values, z, sae, site, torch.tensor([1, 3]), query)
    assert result.by_src[0].isnan().all() and result.mask.tolist() == [
        [[False, False]],
        [[True, False]],
    ]
    torch.testing.assert_close(
        result.by_src[1, 0, :, 0].sum() + result.bias[0], result.pre_act[1, 0, 0]
    )
