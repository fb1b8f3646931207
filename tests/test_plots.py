"""Plots: PNG files that matplotlib wrote, HTML fragments that carry the numbers they show."""

from __future__ import annotations

import re

import torch

from sae_lens_attn.viz import plots


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_head_attribution_per_feature_and_per_head(tmp_path) -> None:
    shares = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.4]])
    assert plots.features_per_head(shares).tolist() == [1.0, 1.0, 0.0, 1.0]  # ties: first head
    width, height = png_size(plots.head_attribution_bars(shares[0], tmp_path / "bars.png"))
    assert width > 100 and height > 100
    png_size(plots.head_attribution_per_head(shares, tmp_path / "per_head.png"))
    png_size(plots.head_attribution_heatmap(shares, [3, 9, 27], tmp_path / "heat.png"))
    table = plots.head_attribution_html(shares, [3, 9, 27])
    assert table.count("<tr>") == 4 and "<th>27</th>" in table and ">0.70</td>" in table


def test_dfa_over_tokens(tmp_path) -> None:
    contributions = torch.tensor([0.5, -1.0, 0.25])
    png_size(plots.dfa_tokens_png(["a", "b", "c"], contributions, 2, tmp_path / "dfa.png"))
    fragment = plots.dfa_tokens_html(["a", "<b>", "c"], contributions, 2)
    assert "&lt;b&gt;" in fragment and "pos 1: -1.0000" in fragment
    assert fragment.count("outline") == 1  # only the query position is boxed


def test_layer_metrics(tmp_path) -> None:
    rows = [
        {"layer": 0, "l0": 12.0, "loss_recovered_zero": 0.9, "loss_recovered_mean": 0.8},
        {"layer": 1, "l0": 30.0, "loss_recovered_zero": 0.7, "loss_recovered_mean": 0.5},
    ]
    png_size(plots.layer_metrics_png(rows, tmp_path / "layers.png"))
    fragment = plots.layer_metrics_html(rows)
    assert fragment.count("<svg") == 3
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="\d+" width="([\d.]+)"', fragment)]
    assert widths[:2] == [220 * 12 / 30, 220.0]  # L0 bars scale to the largest
    assert "layer 1: 0.7</title>" in fragment


def test_svg_bars_draw_negative_values_red_and_escape_labels() -> None:
    svg = plots.svg_bars(["<x>", "y"], [-2.0, 1.0], element_id="c")
    assert svg.startswith('<svg id="c"') and "&lt;x&gt;" in svg
    assert 'fill="#dc2626"' in svg and 'fill="#2563eb"' in svg
