"""Dead-feature resampling: invariants on alive and dead features, optimizer state, sampling law."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import (
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainingSAE

import sae_lens_attn as sla

D_IN, D_SAE = 16, 24
DEAD = torch.tensor([i % 3 == 0 for i in range(D_SAE)])  # 8 dead, 16 alive


def make_sae(architecture: str, seed: int = 0) -> TrainingSAE[Any]:
    torch.manual_seed(seed)
    if architecture == "standard":
        sae: TrainingSAE[Any] = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
        )
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return sae


def inputs(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 3


def adam_after_a_step(sae: TrainingSAE[Any]) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = inputs(64, seed=7)
    loss = (sae.decode(sae.encode(x)) - x).pow(2).sum() + sae.encode(x).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_alive_features_are_untouched_and_dead_ones_get_unit_decoder_rows(architecture) -> None:
    sae = make_sae(architecture)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    alive_enc_norm = before["W_enc"][:, ~DEAD].norm(dim=0).mean()
    x = inputs()

    n = sla.resample_dead_features(
        sae, x, DEAD, encoder_scale=0.2, generator=torch.Generator().manual_seed(0)
    )
    b_enc = dict(sae.named_parameters())["b_enc"]

    assert n == int(DEAD.sum()) == 8
    assert torch.equal(sae.W_enc[:, ~DEAD], before["W_enc"][:, ~DEAD])
    assert torch.equal(sae.W_dec[~DEAD], before["W_dec"][~DEAD])
    assert torch.equal(b_enc[~DEAD], before["b_enc"][~DEAD])
    assert torch.equal(sae.b_dec, before["b_dec"])
    assert not torch.isclose(sae.W_dec[DEAD], before["W_dec"][DEAD]).all(dim=1).any()
    torch.testing.assert_close(sae.W_dec[DEAD].norm(dim=1), torch.ones(8))
    torch.testing.assert_close(
        sae.W_enc[:, DEAD].norm(dim=0), torch.full((8,), 0.2 * float(alive_enc_norm))
    )
    # encoder columns point the same way as the decoder rows
    torch.testing.assert_close(
        sae.W_enc[:, DEAD].T / sae.W_enc[:, DEAD].norm(dim=0)[:, None], sae.W_dec[DEAD]
    )
    assert torch.equal(b_enc[DEAD], torch.zeros(8))
    # every new decoder row is one of the normalised inputs
    unit = x / x.norm(dim=1, keepdim=True)
    matches = (sae.W_dec[DEAD] @ unit.T).max(dim=1).values
    torch.testing.assert_close(matches, torch.ones(8))


def test_optimizer_state_is_zeroed_exactly_at_the_resampled_entries() -> None:
    sae = make_sae("standard")
    optimizer = adam_after_a_step(sae)
    state = {
        name: {k: v.clone() for k, v in optimizer.state[p].items()}
        for name, p in sae.named_parameters()
    }
    for name in ("W_enc", "W_dec", "b_enc"):  # the test would be vacuous on zero moments
        assert (state[name]["exp_avg"] != 0).any()

    sla.resample_dead_features(sae, inputs(), DEAD, optimizer)

    params = dict(sae.named_parameters())
    for key in ("exp_avg", "exp_avg_sq"):
        enc, old_enc = optimizer.state[params["W_enc"]][key], state["W_enc"][key]
        assert torch.equal(enc[:, DEAD], torch.zeros_like(enc[:, DEAD]))
        assert torch.equal(enc[:, ~DEAD], old_enc[:, ~DEAD])
        for name in ("W_dec", "b_enc"):
            now, old = optimizer.state[params[name]][key], state[name][key]
            assert torch.equal(now[DEAD], torch.zeros_like(now[DEAD]))
            assert torch.equal(now[~DEAD], old[~DEAD])
        assert torch.equal(optimizer.state[params["b_dec"]][key], state["b_dec"][key])
    assert torch.equal(optimizer.state[params["W_enc"]]["step"], state["W_enc"]["step"])


def test_sampling_follows_the_squared_reconstruction_loss() -> None:
    """A zero SAE reconstructs 0, so input i's loss is ‖x_i‖² and P(i) ∝ ‖x_i‖⁴."""
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=4, d_sae=3))
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]).sqrt())  # ‖x_i‖² = 1, 2, 3, 4
    expected = torch.tensor([1.0, 4.0, 9.0, 16.0]) / 30  # squared losses, normalised
    dead = torch.tensor([False, True, False])
    generator = torch.Generator().manual_seed(0)
    trials = 3000
    counts = torch.zeros(4)
    for _ in range(trials):
        sla.resample_dead_features(sae, x, dead, generator=generator)
        counts[sae.W_dec[1].abs().argmax()] += 1
        assert (
            int(torch.count_nonzero(sae.W_enc)) == 0
        )  # alive columns are zero, so the SAE stays zero
    frequencies = counts / trials
    torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)
    # proportional to the loss itself would give 0.1, 0.2, 0.3, 0.4
    assert frequencies[3] > 0.47 and frequencies[0] < 0.07


def test_inputs_reconstructed_exactly_are_never_drawn() -> None:
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=4, d_sae=6))
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
        sae.b_dec.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # reconstructs e_0 exactly
    x = torch.eye(4)
    dead = torch.ones(6, dtype=torch.bool)
    for seed in range(20):
        sla.resample_dead_features(sae, x, dead, generator=torch.Generator().manual_seed(seed))
        assert int(torch.count_nonzero(sae.W_dec[:, 0])) == 0
        with torch.no_grad():
            sae.W_enc.zero_()


def test_resampling_is_deterministic_with_a_generator() -> None:
    results = []
    for seed in (3, 3, 4):
        sae = make_sae("standard")
        sla.resample_dead_features(
            sae, inputs(), DEAD, generator=torch.Generator().manual_seed(seed)
        )
        results.append(sae.W_dec.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_no_dead_features_changes_nothing() -> None:
    sae = make_sae("standard")
    before = [p.detach().clone() for p in sae.parameters()]
    assert sla.resample_dead_features(sae, inputs(), torch.zeros(D_SAE, dtype=torch.bool)) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, sae.parameters(), strict=True))


@pytest.mark.parametrize(
    ("x", "mask", "kwargs", "message"),
    [
        (inputs(), torch.zeros(D_SAE + 1, dtype=torch.bool), {}, r"shape \(d_sae,\) = \(24,\)"),
        (inputs(), torch.zeros(D_SAE), {}, "must be a bool tensor of shape"),
        (inputs()[:, :-1], DEAD, {}, r"\[n_inputs >= 1, d_in=16\].*\(256, 15\)"),
        (inputs()[0], DEAD, {}, r"got \(16,\)"),
        (inputs()[:0], DEAD, {}, r"got \(0, 16\)"),
        (inputs().long(), DEAD, {}, "floating-point tensor"),
        (inputs(), DEAD, {"encoder_scale": 0.0}, "positive finite number, got 0.0"),
    ],
)
def test_clear_errors_for_bad_arguments(x, mask, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sla.resample_dead_features(make_sae("standard"), x, mask, **kwargs)


def test_errors_for_an_exact_sae_and_a_non_training_sae() -> None:
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=4, d_sae=2))
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
    with pytest.raises(ValueError, match="reconstructs all 4 non-zero inputs exactly"):
        sla.resample_dead_features(sae, torch.zeros(4, 4), torch.tensor([True, False]))
    with pytest.raises(TypeError, match="takes a SAELens TrainingSAE"):
        sla.resample_dead_features(torch.nn.Linear(2, 2), inputs(), DEAD)  # type: ignore[arg-type]
