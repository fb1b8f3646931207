"""Dead-feature resampling: invariants on alive and dead features, optimizer state, sampling law,
the new directions (x − b_dec), the cutoff, the schedule and the learning-rate warm-up."""

from __future__ import annotations

import itertools
import math
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
from sae_lens_attn.training.resampling import (
    ResampleSchedule,
    ResampleWarmupLR,
    cosine_warmup_factor,
    select_dead_features,
)

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
    # every new decoder row is one of the normalised inputs minus b_dec
    assert sae.b_dec.norm() > 0.1  # so that x − b_dec and x point differently
    unit = (x - sae.b_dec) / (x - sae.b_dec).norm(dim=1, keepdim=True)
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


@pytest.mark.slow
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


def planted_sae(d_in: int = 4, d_sae: int = 6) -> StandardTrainingSAE:
    """Feature 0 reads and writes e_0 (so x = c·e_0, c > 0, is reconstructed exactly); the other
    features have zero weights, so they never fire; b_dec is 0."""
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.W_dec[0, 0] = 1.0
    return sae


def test_inputs_reconstructed_exactly_are_never_drawn() -> None:
    sae = planted_sae()
    x = torch.eye(4)  # e_0 reconstructed exactly; e_1..e_3 reconstructed as 0 (loss 1 each)
    dead = torch.tensor([False, True, True, True, True, True])
    for seed in range(20):
        sla.resample_dead_features(sae, x, dead, generator=torch.Generator().manual_seed(seed))
        assert int(torch.count_nonzero(sae.W_dec[dead, 0])) == 0  # e_0 was never drawn
        assert int(torch.count_nonzero(sae.W_dec[dead])) == 5  # one unit e_i per dead row
        with torch.no_grad():  # back to the planted SAE
            sae.W_enc[:, dead] = 0
            sae.W_dec[dead] = 0


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_new_directions_are_the_normalised_input_minus_b_dec(architecture) -> None:
    """Kissane et al.'s anthropic_resample: W_dec[f] = (x − b_dec)/‖x − b_dec‖, W_enc[:, f] = that
    × 0.2 × mean alive encoder norm, b_enc[f] = 0, for the drawn input x. Planted so that only
    one input can be drawn: the other one equals b_dec, which has no direction to give."""
    sae = make_sae(architecture)
    b_dec = torch.tensor([2.0, -1.0, 0.5] + [0.3] * (D_IN - 3))
    with torch.no_grad():
        sae.b_dec.copy_(b_dec)
    x_drawn = torch.arange(1.0, D_IN + 1.0)
    x = torch.stack([b_dec, x_drawn])
    alive_norm = float(sae.W_enc[:, ~DEAD].detach().norm(dim=0).mean())

    sla.resample_dead_features(sae, x, DEAD, generator=torch.Generator().manual_seed(0))

    expected = (x_drawn - b_dec) / (x_drawn - b_dec).norm()  # independent of the module
    naive = x_drawn / x_drawn.norm()
    assert not torch.allclose(expected, naive, atol=1e-2)  # the test tells the two apart
    for row in sae.W_dec[DEAD]:
        torch.testing.assert_close(row, expected)
    torch.testing.assert_close(
        sae.W_enc[:, DEAD], (0.2 * alive_norm * expected)[:, None].expand(D_IN, 8)
    )
    assert torch.equal(dict(sae.named_parameters())["b_enc"][DEAD], torch.zeros(8))


def test_select_dead_features_is_at_or_below_the_cutoff() -> None:
    cutoff = 1e-6
    above = math.nextafter(cutoff, 1.0)
    frequency = torch.tensor([0.0, cutoff, above, 1e-5, 0.5, cutoff / 2], dtype=torch.float64)
    assert select_dead_features(frequency, cutoff).tolist() == [
        True, True, False, False, False, True,
    ]  # fmt: skip
    # counts over a window: 51 firings in 51.2M tokens is at 1e-6 only if 51.2 >= 51
    fired, tokens = torch.tensor([0.0, 51.0, 52.0]), 12_500 * 4096
    assert select_dead_features(fired / tokens, cutoff).tolist() == [True, True, False]
    assert select_dead_features(frequency, 0.0).tolist() == [True] + [False] * 5
    with pytest.raises(ValueError, match=r"cutoff must be a frequency in \[0, 1\), got -1"):
        select_dead_features(frequency, -1)
    with pytest.raises(ValueError, match=r"1-d floating-point tensor \[d_sae\], got torch.int64"):
        select_dead_features(torch.zeros(3, dtype=torch.long), cutoff)
    with pytest.raises(ValueError, match=r"shares of tokens in \[0, 1\]"):
        select_dead_features(torch.tensor([0.0, 3.0]), cutoff)


def test_cosine_warmup_factor_closed_form() -> None:
    values = [cosine_warmup_factor(t, 1000, 0.1) for t in range(-1, 1002)]
    assert values[0] == 1.0  # before any warm-up
    assert values[1] == pytest.approx(0.1)  # t = 0
    assert values[1 + 500] == pytest.approx(0.55)  # half-way: mean of 0.1 and 1
    assert values[1 + 250] == pytest.approx(0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2)
    assert values[1 + 1000] == 1.0 and values[-1] == 1.0
    assert all(a < b for a, b in itertools.pairwise(values[1:1002]))
    assert cosine_warmup_factor(0, 0) == 1.0  # no warm-up at all
    with pytest.raises(ValueError, match=r"fraction of lr in \(0, 1\].*got 0"):
        cosine_warmup_factor(3, 10, 0)


def kissane_lr_replay(lr: float, n_steps: int, resample_at: set[int], warmup: int) -> list[float]:
    """The lr of every step as Kissane et al.'s train.py drives torch's CosineAnnealingLR:
    stepped to its minimum first, then once per step until back at lr (and always during the
    first `warmup` steps), and stepped down to its minimum again at each resampling."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=warmup, eta_min=0.1 * lr)
    for _ in range(warmup):
        sched.step()
    lrs = []
    for i in range(n_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if i < warmup or sched.get_last_lr()[0] + 1e-9 < lr:
            sched.step()
        if i + 1 in resample_at:
            while sched.get_last_lr()[0] > 0.1 * lr + 1e-9:
                sched.step()
    return lrs


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_warmup_scheduler_replays_kissane_et_al_cosine_schedule() -> None:
    lr, warmup, resample_at = 1.2e-3, 20, {50, 100}
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=lr)
    scheduler = ResampleWarmupLR(optimizer, warmup_steps=warmup, start=0.1)
    ours = []
    for step in range(1, 141):
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if step in resample_at:
            scheduler.restart()
    theirs = kissane_lr_replay(lr, 140, resample_at, warmup)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-9, atol=0)
    # the step after a resampling starts at 0.1·lr and rises as a cosine to lr over `warmup`
    for start in (50, 100):
        segment = ours[start : start + warmup + 1]
        expected = [lr * cosine_warmup_factor(j, warmup, 0.1) for j in range(warmup + 1)]
        assert segment == pytest.approx(expected, rel=1e-12)
        assert segment[0] == pytest.approx(0.1 * lr) and segment[-1] == lr
    assert ours[0] == pytest.approx(0.1 * lr) and ours[49] == lr
    assert scheduler.get_last_lr() == [lr]


def test_warmup_scheduler_without_a_warmup_at_start_is_constant() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = ResampleWarmupLR(optimizer, warmup_steps=4, warmup_at_start=False)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    scheduler.restart()
    seen.append(optimizer.param_groups[0]["lr"])
    assert seen == [0.5, 0.5, 0.5, pytest.approx(0.05)]


def test_resample_schedule_matches_the_published_configs() -> None:
    schedule = ResampleSchedule()  # re_init_every 25000, num_resamples 4, last 12500
    assert schedule.resample_steps == (25_000, 50_000, 75_000, 100_000)
    assert schedule.is_resample_step(50_000) and not schedule.is_resample_step(125_000)
    # the frequency window before each resampling is exactly its last 12,500 steps
    window_start, windows = 1, {}
    for step in range(1, 130_001):
        if schedule.is_resample_step(step):
            windows[step] = (window_start, step)
        if schedule.starts_window(step):
            window_start = step + 1
    assert windows == {s: (s - 12_499, s) for s in schedule.resample_steps}
    whole = ResampleSchedule(every=10, count=2, window=10)  # window = every: since the last one
    assert [s for s in range(1, 30) if whole.starts_window(s)] == [10, 20]
    with pytest.raises(ValueError, match="1 <= window <= every, got every=10, window=11"):
        ResampleSchedule(every=10, window=11)
    with pytest.raises(ValueError, match="count must be a non-negative integer, got -1"):
        ResampleSchedule(count=-1)


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
    with pytest.raises(ValueError, match="every one is reconstructed exactly or equals b_dec"):
        sla.resample_dead_features(sae, torch.zeros(4, 4), torch.tensor([True, False]))
    with pytest.raises(TypeError, match="takes a SAELens TrainingSAE"):
        sla.resample_dead_features(torch.nn.Linear(2, 2), inputs(), DEAD)  # type: ignore[arg-type]
