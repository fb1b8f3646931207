"""Every analyzer of the paper's analyses, from ``sae-lens-attn analyze`` (in-process), on the
embedded default model (TransformerLens backend) and on a tiny Hugging Face GPT-2 (nnsight
backend), with the tables checked against what the inputs fix independently."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from sae_lens_attn import AttnSite
from sae_lens_attn.cli.main import main

from .factories import random_sae
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

ANALYZERS = (
    "feature_logits",
    "feature_families",
    "polysemanticity",
    "prefix_induction",
    "rdfa",
    "proxy_histogram",
)
TABLES = {
    "feature_logits": ["feature_logits"],
    "feature_families": ["feature_families", "family_counts"],
    "polysemanticity": ["head_features", "head_verdicts", "polysemanticity"],
    "prefix_induction": ["prefix_scores", "prefix_events", "prefix_corruption"],
    "rdfa": ["rdfa", "rdfa_summary"],
    "proxy_histogram": ["proxy_histogram", "proxy_summary"],
}
PLOTS = ["feature_logits.png", "family_counts.png", "head_families.png", "prefix_scores.png"]
PLOTS += ["rdfa.html", "proxy_histogram.png"]
SMALL = ["n_samples=4", "prefix_lengths=[1,2]", "max_corrupted=3", "head_k=2", "n_contexts=4"]
SMALL += ["bins=8"]
N_FEATURES, K, N_HEADS, N_LAYERS = 2, 20, 4, 2


def repeated_rows(n_rows: int, span: int, low: int, high: int, bos: int) -> torch.Tensor:
    """``[BOS, r, r]`` rows of random tokens r (induction everywhere in the second copy)."""
    r = torch.randint(low, high, (n_rows, span), generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.full((n_rows, 1), bos), r, r], dim=1)


def brute_force_induction_count(tokens: torch.Tensor) -> int:
    """Positions i with an earlier j < i − 1, tokens[j] == tokens[i], tokens[j+1] == tokens[i+1]."""
    count = 0
    for row in tokens.tolist():
        for i in range(len(row) - 1):
            count += any(row[j] == row[i] and row[j + 1] == row[i + 1] for j in range(i - 1))
    return count


def read(out: Path, name: str) -> list[dict[str, str]]:
    with (out / f"{name}.csv").open() as f:
        return list(csv.DictReader(f))


def run_all(model: str, sae: Path | str, upstream: Path | str, tokens: torch.Tensor, out: Path):
    tokens_file = out.parent / "tokens.pt"
    torch.save(tokens, tokens_file)
    options = [part for option in SMALL for part in ("--option", option)]
    args = [
        "analyze", "--model", model, "--sae", str(sae), "--upstream-sae", str(upstream),
        "--tokens", str(tokens_file), "--analyzers", ",".join(ANALYZERS),
        "--top", str(N_FEATURES), *options, "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0


def check_tables(out: Path, tokens: torch.Tensor) -> None:
    written = {p.name for p in out.iterdir()}
    assert {f"{t}.csv" for tables in TABLES.values() for t in tables} <= written
    assert set(PLOTS) <= written
    assert (out / "proxy_histogram.png").read_bytes()[:4] == b"\x89PNG"

    logits = read(out, "feature_logits")
    assert len(logits) == N_FEATURES * 2 * K
    features = sorted({int(r["feature"]) for r in logits})
    for feature in features:  # top values descend, bottom values ascend, top ≥ bottom
        top = [
            float(r["value"])
            for r in logits
            if int(r["feature"]) == feature and r["direction"] == "top"
        ]
        bottom = [float(r["value"]) for r in logits if int(r["feature"]) == feature and r["direction"] == "bottom"]  # fmt: skip
        assert top == sorted(top, reverse=True) and bottom == sorted(bottom)
        assert min(top) >= max(bottom)

    families = read(out, "feature_families")
    assert sorted(int(r["feature"]) for r in families) == features
    assert sum(int(r["features"]) for r in read(out, "family_counts")) == N_FEATURES

    verdicts = read(out, "head_verdicts")
    assert len(verdicts) == N_HEADS
    (summary,) = read(out, "polysemanticity")
    polysemantic = sum(r["verdict"] == "polysemantic" for r in verdicts)
    assert float(summary["fraction_polysemantic"]) == pytest.approx(polysemantic / N_HEADS)
    assert len(read(out, "head_features")) == N_HEADS * 2  # head_k = 2

    scores = read(out, "prefix_scores")
    assert len(scores) == N_LAYERS * N_HEADS * 2  # layers × heads × prefix lengths [1, 2]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in scores)

    (rdfa,) = read(out, "rdfa_summary")
    assert int(rdfa["feature"]) in features
    assert float(rdfa["sum"]) == pytest.approx(float(rdfa["pre_act"]), abs=1e-4)
    assert int(rdfa["layer"]) == 1 and not rdfa["notes"]  # the upstream SAE is used
    kinds = {r["kind"] for r in read(out, "rdfa")}
    assert "feature" in kinds  # layer-0 SAE features feed the layer-1 feature

    bins = read(out, "proxy_histogram")
    summaries = {int(r["feature"]): r for r in read(out, "proxy_summary")}
    assert sorted(summaries) == features
    induction = brute_force_induction_count(tokens)
    for feature, row in summaries.items():
        mine = [r for r in bins if int(r["feature"]) == feature]
        assert len(mine) == 8
        active = sum(int(r["proxy_true"]) + int(r["proxy_false"]) for r in mine)
        assert int(row["active"]) == active
        assert int(row["proxy_tokens"]) == induction
        assert float(row["base_rate"]) == pytest.approx(induction / tokens.numel())
        if active:
            share = sum(int(r["proxy_true"]) for r in mine) / active
            assert float(row["specificity"]) == pytest.approx(share)


@pytest.mark.slow  # about 25 s on 2 cores
def test_every_analyzer_on_the_embedded_model(tmp_path: Path) -> None:
    tokens = repeated_rows(3, 20, 30, 500, bos=0)  # vocabulary: 512
    tokens[0, 5:9] = torch.tensor([20, 21, 22, 23])  # ordinary text-like tokens too
    out = tmp_path / "out"
    release = "stdlib-2l-attn-z"
    run_all("default", f"{release}:blocks.1", f"{release}:blocks.0", tokens, out)
    check_tables(out, tokens)


@pytest.mark.slow  # about 15 s on 2 cores
def test_every_analyzer_on_a_hugging_face_model(tmp_path: Path) -> None:
    model_dir, sae_dir, upstream_dir = tmp_path / "model", tmp_path / "sae1", tmp_path / "sae0"
    build_hf("gpt2").save_pretrained(model_dir)
    make_tokenizer(VOCAB_SIZE).save_pretrained(model_dir)
    for layer, folder in ((1, sae_dir), (0, upstream_dir)):
        site = AttnSite(layer, N_HEADS, N_HEADS, 8)
        random_sae(site, seed=layer, value_bias_convention="included").save_model(folder)
    tokens = repeated_rows(3, 10, 2, VOCAB_SIZE, bos=0)
    out = tmp_path / "out"
    run_all(f"hf:{model_dir}", sae_dir, upstream_dir, tokens, out)
    check_tables(out, tokens)
