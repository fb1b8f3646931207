"""The demo: the main job, end to end and offline, on the embedded default model; a summary that
states the SAEs' configuration and defines its figures, plots that carry information, and a
dashboard index that says why each feature is shown."""

from __future__ import annotations

import csv
import importlib.util
import re
from typing import Any

import pytest
from sae_lens import SAE

from sae_lens_attn.cli.main import build_parser, main
from sae_lens_attn.default_model import RELEASE_NAME
from sae_lens_attn.default_model.metrics import read_metrics
from sae_lens_attn.demo import DemoOptions, DemoResult, _shown, run_demo
from sae_lens_attn.outputs import read_marker
from sae_lens_attn.viz.plots import png_text

VERDICTS = {"induction", "selected, fails behaviour", "control", "neither"}
"""The induction analyzer's verdict labels (``sla.analysis.induction_features``)."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DemoOptions, DemoResult]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    options = DemoOptions(
        out=out, train_tokens=20_000, eval_contexts=16, features=4, progress=False
    )
    return options, run_demo(options)


@pytest.mark.slow
def test_demo_writes_everything_and_can_run_again(demo) -> None:
    options, result = demo
    out = options.out
    assert result.out == out and read_marker(out)["kind"] == "demo"  # type: ignore[index]
    for relative in (
        "summary.html",
        "summary.md",
        "evaluation.csv",
        "evaluation_per_layer.csv",
        "plots/head_attribution.png",
        "plots/layers.png",
        "plots/feature_density.png",
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
    assert "Induction features of the shipped SAE" in summary
    assert "<table>" in (out / "summary.html").read_text()
    assert len(list((out / "dashboard").glob("feature_*.html"))) == 4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    run_demo(options)  # a folder the demo wrote is replaced


@pytest.mark.slow
def test_summary_states_the_sae_configuration_and_defines_every_figure(demo) -> None:
    options, result = demo
    summary = result.summary_md.read_text()
    sae_tokens = read_metrics()["training"]["sae_tokens"]
    for layer in (0, 1):
        cfg = SAE.from_pretrained(RELEASE_NAME, f"blocks.{layer}").cfg
        row = next(
            line for line in summary.splitlines() if f"| shipped {cfg.metadata.hook_name} |" in line
        )
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1].startswith(cfg.architecture())
        assert cells[3].startswith(str(cfg.d_sae)) and cells[4] == str(cfg.k)  # type: ignore[attr-defined]
        assert cells[5] == f"{sae_tokens:,}"
    fresh = next(line for line in summary.splitlines() if line.startswith("| fresh "))
    assert fresh.rstrip(" |").endswith(f"{options.train_tokens:,}")
    table = summary.split("## Evaluation")[1].split("##")[0]
    metrics = [
        line.split("|")[1].strip()
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| metric ")
    ]
    assert {"l0", "kl", "loss_recovered_zero"} <= set(metrics)
    better = {
        name: direction
        for name, direction in re.findall(r"^- ([^:]+): .+; ([^;]+)\.$", summary, re.M)
    }
    for name in [*metrics, "induction score", "pass rate", "negative-control pass rate"]:
        assert name in better, f"{name} is printed but not defined"
        assert re.search(r"\b(higher|lower|low)\b", better[name]), (name, better[name])


@pytest.mark.slow
def test_a_topk_run_gets_no_l0_chart_and_loss_recovered_per_layer(demo) -> None:
    options, _ = demo
    assert {
        SAE.from_pretrained(RELEASE_NAME, f"blocks.{i}").cfg.architecture() for i in (0, 1)
    } == {"topk"}
    layers = png_text(options.out / "plots" / "layers.png")["Description"]
    assert layers == "loss recovered"
    density = png_text(options.out / "plots" / "feature_density.png")["Description"]
    assert re.fullmatch(r"layer 0: \d+ of 512 dead; layer 1: \d+ of 512 dead", density), density


@pytest.mark.slow
def test_the_index_gives_each_feature_its_reason_and_verdict(demo) -> None:
    options, result = demo
    verdicts = {
        int(row["feature"]): row["verdict"]
        for row in csv.DictReader((options.out / "analysis" / "induction_features.csv").open())
    }
    index = (options.out / "dashboard" / "index.html").read_text()
    rows = re.findall(r'<tr><td><a href="feature_(\d+)\.html">.*?</tr>', index)
    assert len(rows) == options.features
    reasons = []
    for feature in map(int, rows):
        row = re.search(rf'<tr><td><a href="feature_{feature}\.html">.*?</tr>', index)
        assert row
        reason, verdict = re.findall(r"<td>([^<]*)</td>", row.group(0))[-2:]
        assert verdict == verdicts.get(feature, "control") and verdict in VERDICTS
        if reason.startswith("induction feature #"):
            assert feature in result.induction_features and verdict == "induction"
        else:
            assert reason.startswith("top by max activation (#"), reason
        reasons.append(reason.split(" #")[0])
    assert reasons.count("induction feature") == (options.features + 1) // 2  # half of them


def test_shown_features_are_half_induction_then_by_max_activation() -> None:
    shown = _shown([5, 6, 7], [1, 5, 2, 3], 4)
    assert list(shown) == [5, 6, 1, 2]
    assert shown[6] == "induction feature #2 of 3 by pass rate"
    assert shown[2] == "top by max activation (#3)"
    assert list(_shown([5, 6, 7], [5], 4)) == [5, 6, 7]  # too few others: more induction ones
    assert list(_shown([], [4, 2], 3)) == [4, 2]


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


def test_the_pipeline_lives_beside_the_cli_not_in_the_default_model() -> None:
    """``default_model/`` holds the weights, their loader, corpus, release and metrics; the demo
    pipeline is ``sae_lens_attn.demo``, which ``sae-lens-attn demo`` runs."""
    import sae_lens_attn.cli.demo as cli_demo

    assert importlib.util.find_spec("sae_lens_attn.default_model.demo") is None
    assert cli_demo.run_demo is run_demo and run_demo.__module__ == "sae_lens_attn.demo"
