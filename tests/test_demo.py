"""The demo: the main job, end to end and offline, on the embedded default model."""

from __future__ import annotations

import csv
from typing import Any

import pytest

from sae_lens_attn.cli.main import build_parser, main
from sae_lens_attn.default_model.demo import DemoOptions, run_demo
from sae_lens_attn.outputs import read_marker


@pytest.mark.slow
def test_demo_writes_everything_and_can_run_again(tmp_path) -> None:
    out = tmp_path / "demo"
    options = DemoOptions(
        out=out, train_tokens=20_000, eval_contexts=16, features=4, progress=False
    )
    result = run_demo(options)
    assert result.out == out and read_marker(out)["kind"] == "demo"  # type: ignore[index]
    for relative in (
        "summary.html",
        "summary.md",
        "evaluation.csv",
        "evaluation_per_layer.csv",
        "plots/head_attribution.png",
        "plots/layers.png",
        "dashboard/index.html",
        "analysis/dfa_by_src.csv",
        "analysis/induction_features.csv",
        "analysis/induction_scores.csv",
        "fresh_sae/blocks.1.attn.hook_z/cfg.json",
    ):
        assert (out / relative).exists(), relative
    rows = list(csv.DictReader((out / "evaluation.csv").open()))
    assert [row["sae"] for row in rows] == ["fresh", "shipped"]
    assert set(result.evaluation["shipped"]) >= {"l0", "loss_recovered_zero", "kl"}
    summary = (out / "summary.md").read_text()
    assert "Induction features of the shipped SAE" in summary and "| shipped |" in summary
    assert "<table>" in (out / "summary.html").read_text()
    assert len(list((out / "dashboard").glob("feature_*.html"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    run_demo(options)  # a folder the demo wrote is replaced


def test_demo_refuses_a_folder_it_did_not_write(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files that sae-lens-attn did not write"):
        run_demo(DemoOptions(out=tmp_path, progress=False))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    subparsers: Any = build_parser()._subparsers
    demo = subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[-1] in text
