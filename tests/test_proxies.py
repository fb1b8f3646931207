"""A feature against a proxy (Kissane et al.'s Figure 2): the induction proxy on hand-built and
brute-forced sequences, the histograms against numpy, the plots and the dashboard panels."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn.analysis import induction_proxy, proxy_histogram
from sae_lens_attn.corpus import Corpus
from sae_lens_attn.viz import analysis_plots
from sae_lens_attn.viz.dashboard import panels
from sae_lens_attn.viz.dashboard.data import collect
from sae_lens_attn.viz.dashboard.feature_analyses import peak_rdfa

RELEASE = "stdlib-2l-attn-z"


def brute_force(row: list[int]) -> list[bool]:
    """The definition, spelled out: an earlier A (j < i − 1) followed by the B that follows i."""
    return [
        i < len(row) - 1
        and any(row[j] == row[i] and row[j + 1] == row[i + 1] for j in range(i - 1))
        for i in range(len(row))
    ]


def test_induction_proxy_marks_the_hand_built_induction_positions() -> None:
    #        0  1  2  3  4  5  6  7  8  9
    row = [0, 5, 6, 7, 8, 5, 6, 9, 5, 6]
    # 5 at 5 repeats "5 6" (j = 1) and 6 follows: True. 6 at 6: earlier "6 7", but 9 follows.
    # 5 at 8: "5 6" again (j = 1 and j = 5). 6 at 9: last position, no next token.
    expected = [False] * 10
    expected[5] = expected[8] = True
    assert induction_proxy(torch.tensor([row])).tolist() == [expected]
    assert induction_proxy(torch.tensor(row)).tolist() == expected  # [pos] works too


def test_the_earlier_b_must_precede_the_current_token() -> None:
    # "1 1 1": at i = 1 the only earlier A is j = 0, whose B is i itself: no induction.
    assert induction_proxy(torch.tensor([1, 1, 1])).tolist() == [False, False, False]
    # "1 1 1 1": at i = 2, j = 0 gives A = 1, B = 1 (at 1 < 2) and 1 follows.
    assert induction_proxy(torch.tensor([1, 1, 1, 1])).tolist() == [False, False, True, False]


def test_induction_proxy_equals_the_definition_on_random_tokens() -> None:
    tokens = torch.randint(0, 4, (6, 30), generator=torch.Generator().manual_seed(0))
    assert induction_proxy(tokens).tolist() == [brute_force(row) for row in tokens.tolist()]


def test_repeated_random_tokens_are_induction_in_the_second_copy() -> None:
    n = 12
    r = torch.randperm(200, generator=torch.Generator().manual_seed(3))[:n] + 10  # distinct
    tokens = torch.cat([torch.tensor([0]), r, r])[None]
    expected = [False] * (n + 1) + [True] * (n - 1) + [False]  # all but the last of copy two
    assert induction_proxy(tokens)[0].tolist() == expected


def test_induction_proxy_refuses_float_or_3d_tokens() -> None:
    with pytest.raises(
        ValueError, match=r"integer ids \[batch, pos\] or \[pos\], got torch.float32"
    ):
        induction_proxy(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 5\)"):
        induction_proxy(torch.zeros(1, 2, 5, dtype=torch.long))


def sample(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(8, 50, generator=g) * 3
    acts[torch.rand(8, 50, generator=g) < 0.6] = 0.0  # mostly inactive, as features are
    proxy = torch.rand(8, 50, generator=g) < 0.3
    counted = torch.rand(8, 50, generator=g) < 0.9
    return acts, proxy, counted


def test_histogram_counts_equal_numpy_split_by_proxy() -> None:
    acts, proxy, counted = sample()
    hist = proxy_histogram(acts, proxy, counted=counted, bins=12, name="induction")
    a, p, c = acts.numpy(), proxy.numpy(), counted.numpy()
    active = (a > 0) & c
    edges = np.linspace(0.0, a[active].max(), 13)
    np.testing.assert_allclose(hist.edges.numpy(), edges, rtol=1e-6)
    on, _ = np.histogram(a[active & p], bins=edges)
    off, _ = np.histogram(a[active & ~p], bins=edges)
    assert hist.counts_true.tolist() == on.tolist()
    assert hist.counts_false.tolist() == off.tolist()
    assert hist.inactive_true == int(((a <= 0) & c & p).sum())
    assert hist.inactive_false == int(((a <= 0) & c & ~p).sum())
    centers = (edges[1:] + edges[:-1]) / 2
    np.testing.assert_allclose(hist.expected_true.numpy(), on * centers, rtol=1e-5)
    np.testing.assert_allclose(hist.expected_false.numpy(), off * centers, rtol=1e-5)
    assert hist.specificity == pytest.approx((active & p).sum() / active.sum())
    assert hist.expected_share == pytest.approx((on * centers).sum() / ((on + off) * centers).sum())
    assert hist.sensitivity == pytest.approx((active & p).sum() / (c & p).sum())
    assert hist.base_rate == pytest.approx((c & p).sum() / c.sum())
    rows = hist.rows()
    assert [r["proxy_true"] for r in rows] == on.tolist() and rows[-1]["high"] == pytest.approx(
        edges[-1]
    )
    assert hist.proxy == "induction"


def test_the_largest_activation_falls_in_the_last_bin() -> None:
    acts = torch.tensor([0.0, 1.0, 2.0, 4.0])
    hist = proxy_histogram(acts, torch.tensor([False, True, False, True]), bins=4)
    assert hist.counts_true.tolist() == [0, 1, 0, 1]  # 1.0 opens bin 1; 4.0 closes bin 3
    assert hist.counts_false.tolist() == [0, 0, 1, 0]
    assert (hist.inactive_true, hist.inactive_false) == (0, 1)


def test_a_feature_that_never_fires_has_empty_bins_and_no_shares() -> None:
    hist = proxy_histogram(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool), bins=5)
    assert hist.counts_true.sum() == hist.counts_false.sum() == 0
    assert math.isnan(hist.specificity) and math.isnan(hist.expected_share)
    assert hist.sensitivity == 0.0 and hist.inactive_true == 12
    assert "never fires" in panels.proxy_panel(hist)


def test_bad_histogram_input_is_refused() -> None:
    acts = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"proxy must have the shape of activations \(2, 3\)"):
        proxy_histogram(acts, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="proxy must be a boolean tensor, got torch.int64"):
        proxy_histogram(acts, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"counted must have the shape"):
        proxy_histogram(acts, acts > 0.5, counted=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bins"):
        proxy_histogram(acts, acts > 0.5, bins=0)
    with pytest.raises(
        ValueError, match=r"unknown proxy 'bigram'; built-in proxies: \['induction'\]"
    ):
        sla.analysis.proxy_mask("bigram", torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown proxy 'bigram'"):
        sla.analysis.get("proxy_histogram")(
            sla.analysis.AnalysisInput(None, None, torch.zeros(1, 4, dtype=torch.long),
                                       options={"proxy": "bigram", "features": [0]})
        )  # fmt: skip


def test_plot_and_table_plot_leave_the_backend_alone(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    acts, proxy, counted = sample(1)
    hists = {3: proxy_histogram(acts, proxy, counted=counted, bins=6, name="induction")}
    hists[7] = proxy_histogram(torch.zeros(8, 50), proxy, bins=6, name="induction")
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    path = analysis_plots.proxy_histogram_png(hists, tmp_path / "proxy.png")
    table = [{"feature": f, "proxy": h.proxy} | row for f, h in hists.items() for row in h.rows()]
    (written,) = analysis_plots.table_plots({"proxy_histogram": table}, tmp_path)
    assert written.name == "proxy_histogram.png"
    assert path.read_bytes()[:4] == written.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures


def test_proxy_panel_draws_both_views_to_scale() -> None:
    acts = torch.tensor([0.5, 0.5, 1.5, 2.0, 0.0])
    hist = proxy_histogram(
        acts, torch.tensor([True, False, True, True, True]), bins=2, name="induction"
    )
    html = panels.proxy_panel(hist)
    assert 'id="proxy-panel"' in html and "proxy-specificity-chart" in html
    assert "proxy-expected-chart" in html
    assert "<b id='proxy-specificity'>75%</b>" in html  # 3 of 4 active tokens fit
    # bin 0 (0–1): 1 + 1 tokens, bin 1 (1–2): 2 + 0; centres 0.5 and 1.5
    assert "0–1: 1 proxy, 1 not" in html and "1–2: 2 proxy, 0 not" in html
    assert "0–1: 0.5 proxy, 0.5 not" in html and "1–2: 3 proxy, 0 not" in html


@pytest.fixture(scope="module")
def default():
    model, tokenizer = sla.load_default_model()
    saes = [SAE.from_pretrained(RELEASE, f"blocks.{layer}.hook_z") for layer in (0, 1)]
    text = "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
    tokens = model.to_tokens([text, text * 2])[:, :48]
    return model, tokenizer, saes, tokens


def test_rdfa_panel_on_the_embedded_model(default) -> None:
    model, tokenizer, (sae0, sae1), tokens = default
    (data1,) = collect(model, sae1, tokens, [253], tokenizer=tokenizer, n_contexts=2)
    peak = peak_rdfa(model, sae1, [sae0], tokens, data1)
    assert peak.result is not None and not peak.note
    context = data1.contexts[0]
    assert (peak.result.position, peak.result.feature) == (context.position, 253)
    assert peak.result.pre_act == pytest.approx(context.pre_act, abs=1e-4)
    top = sum(row.value for row in peak.result.contributions) + peak.result.bias
    assert top == pytest.approx(peak.result.pre_act, abs=1e-4)
    html = panels.rdfa_panel(peak, tokenizer=tokenizer)
    assert 'id="rdfa-panel"' in html and "L0 feature" in html and "<details>" in html

    without = peak_rdfa(model, sae1, [], tokens, data1)
    assert "no SAE for layer(s) [0]" in without.note
    assert "sae error" in panels.rdfa_panel(without, tokenizer=tokenizer)

    (strongest,) = Corpus(model, tokens).top_features(sae0, 1)
    (data0,) = collect(model, sae0, tokens, [strongest], tokenizer=tokenizer)
    layer0 = peak_rdfa(model, sae0, [], tokens, data0)
    assert "Layer 0 has no upstream attention layer" in layer0.note
    assert "Layer 0 has no upstream attention layer" in panels.rdfa_panel(layer0)
    assert layer0.result is not None  # the split over embeddings and biases is still there
    upstream_kinds = {"feature", "sae_error", "sae_decoder_bias", "attention_bias"}
    assert not upstream_kinds & {row.kind for row in layer0.result.contributions}
    silent = peak_rdfa(model, sae0, [], tokens, replace(data0, contexts=()))
    assert silent.result is None and "never fires" in panels.rdfa_panel(silent)
    with pytest.raises(
        ValueError, match=r"distinct layers below the SAE's layer 0, got layers \[1\]"
    ):
        peak_rdfa(model, sae0, [sae1], tokens, data0)


@pytest.mark.slow  # about 7 s on 2 cores
def test_dashboard_pages_carry_the_proxy_and_rdfa_panels(default, tmp_path: Path) -> None:
    from sae_lens_attn.cli.main import main

    tokens = default[3]
    tokens_file = tmp_path / "tokens.pt"
    torch.save(tokens, tokens_file)
    common = ["--model", "default", "--tokens", str(tokens_file), "--engine", "own"]
    common += ["--contexts", "2", "--top", "1"]
    args = ["dashboard", *common, "--sae", f"{RELEASE}:blocks.1", "--out", str(tmp_path / "d1")]
    assert main([*args, "--upstream-sae", f"{RELEASE}:blocks.0"]) == 0
    (page,) = (tmp_path / "d1").glob("feature_*.html")
    text = page.read_text()
    assert 'id="proxy-panel"' in text and "proxy-specificity-chart" in text
    assert 'id="rdfa-panel"' in text and "L0 feature" in text  # recursed into layer 0
    assert "no SAE for layer" not in text

    args = ["dashboard", *common, "--sae", f"{RELEASE}:blocks.0", "--out", str(tmp_path / "d0")]
    assert main(args) == 0
    (page,) = (tmp_path / "d0").glob("feature_*.html")
    assert "Layer 0 has no upstream attention layer" in page.read_text()
