"""The demo's plots: loss recovered per layer as bars, L0 only where it varies (never for TopK
SAEs, whose L0 is k), and feature density per layer; each PNG names its panels."""

from __future__ import annotations

import torch

from sae_lens_attn.viz import plots

ROWS = [
    {"layer": 0, "l0": 16.0, "loss_recovered_zero": 0.98, "loss_recovered_mean": 0.9},
    {"layer": 1, "l0": 16.0, "loss_recovered_zero": 0.93, "loss_recovered_mean": 0.7},
]


def test_layer_metrics_draw_l0_only_when_asked(tmp_path) -> None:
    without = plots.png_text(
        plots.layer_metrics_png(ROWS, tmp_path / "a.png", title="topk", show_l0=False)
    )
    assert without["Title"] == "topk" and without["Description"] == "loss recovered"
    with_l0 = plots.png_text(plots.layer_metrics_png(ROWS, tmp_path / "b.png"))
    assert with_l0["Description"] == "L0; loss recovered"


def test_feature_density_has_a_panel_per_sae_with_its_dead_features(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    live = torch.rand(64, generator=generator) * 0.5 + 1e-4
    densities = {"layer 0": live, "layer 1": torch.cat([torch.zeros(5), live[5:]])}
    text = plots.png_text(plots.feature_density_png(densities, tmp_path / "density.png"))
    assert text["Description"] == "layer 0: 0 of 64 dead; layer 1: 5 of 64 dead"
