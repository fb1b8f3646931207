"""Head features and polysemanticity: top features per head, verdicts on planted heads, a release of
two layers, the analyzers through the CLI, the plots and the dashboard panels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.analysis.families import FAMILIES
from sae_lens_attn.analysis.polysemantic_heads import UNLABELLED, head_verdict
from sae_lens_attn.viz import analysis_plots
from sae_lens_attn.viz.dashboard import panels

from .factories import POOL, Planted, planted, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer


@pytest.fixture(scope="module")
def plant() -> Planted:
    return planted()


def test_head_verdict_counts_confident_families() -> None:
    assert head_verdict(["induction", "copying"], [0.9, 0.6]) == (
        "polysemantic",
        ("induction", "copying"),
    )
    assert head_verdict(["induction", "copying"], [0.9, 0.4]) == ("monosemantic", ("induction",))
    assert head_verdict(["local_context", "local_context"], [0.5, 1.0]) == (
        "monosemantic",
        ("local_context",),
    )
    assert head_verdict(["unclassified", "never_fires", UNLABELLED], [math.nan] * 3) == (
        "undetermined",
        (),
    )
    assert head_verdict(["induction", "copying"], [0.9, 0.6], confidence=0.95) == (
        "undetermined",
        (),
    )


def test_head_features_are_the_largest_shares(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 1), d_sae=40)
    shares = sla.analysis.head_attribution(sae)
    top = sla.analysis.head_features(sae, k=5)
    for head in range(4):
        ranked = sorted(range(40), key=lambda f: -float(shares[f, head]))[:5]
        assert top.features[head].tolist() == ranked
        torch.testing.assert_close(top.shares[head], shares[ranked, head])
    assert top.layer == 1 and top.labels is None
    pool = [1, 4, 9]
    few = sla.analysis.head_features(sae, k=5, candidates=pool)
    assert few.features.shape == (4, 3) and set(few.features.flatten().tolist()) == set(pool)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        sla.analysis.head_features(sae, k=0)


def test_planted_heads_get_their_verdicts(plant: Planted) -> None:
    result = sla.analysis.polysemanticity(
        plant.model, plant.sae, plant.tokens, k=3, ignore_tokens=[0]
    )
    by_head = {v.head: v for v in result.verdicts}
    assert by_head[0].verdict == "polysemantic"
    assert by_head[0].families == ("copying", "suppression", "local_context")
    assert by_head[1].verdict == "monosemantic" and by_head[1].families == ("local_context",)
    assert result.fraction_polysemantic == 0.5 and result.fraction_determined == 1.0
    top = result.head_features[0]
    expected = {f for f, h in plant.heads.items() if h == 0}
    assert set(top.features[0].tolist()) == expected  # feature 6 (share 1 to head 0) never fires
    assert top.labels is not None
    assert {plant.labels[f] for f in top.features[0].tolist()} == set(top.labels[0])


def test_a_release_of_two_layers_counts_every_head() -> None:
    hf = build_hf("gpt2")
    saes = [
        random_sae(
            AttnSite.from_model(hf, layer), d_sae=24, seed=layer, value_bias_convention="included"
        )
        for layer in (1, 0)
    ]
    tokens = torch.randint(2, VOCAB_SIZE, (10, 16), generator=torch.Generator().manual_seed(0))
    result = sla.analysis.polysemanticity(
        hf, saes, tokens, k=4, confidence=0.4, tokenizer=make_tokenizer(VOCAB_SIZE)
    )
    assert [(v.layer, v.head) for v in result.verdicts] == [
        (layer, head) for layer in (0, 1) for head in range(4)
    ]
    recount = 0
    for top in result.head_features:
        assert top.labels is not None and top.confidences is not None
        for labels, confidences in zip(top.labels, top.confidences, strict=True):
            named = {
                name
                for name, c in zip(labels, confidences, strict=True)
                if name in FAMILIES and c >= 0.4
            }
            recount += len(named) >= 2
    assert result.count("polysemantic") == recount
    assert result.fraction_polysemantic == recount / 8
    with pytest.raises(
        ValueError, match=r"at most one SAE per layer; the SAEs' layers are \[1, 1\]"
    ):
        sla.analysis.polysemanticity(hf, [saes[0], saes[0]], tokens)
    with pytest.raises(ValueError, match="confidence must lie in"):
        sla.analysis.polysemanticity(hf, saes, tokens, confidence=2.0)
    with pytest.raises(ValueError, match="at least one SAE"):
        sla.analysis.polysemanticity(hf, [], tokens)


def test_no_firing_feature_is_refused(plant: Planted) -> None:
    quiet = torch.full((3, 16), 24)
    with pytest.raises(ValueError, match="no feature of the SAE at blocks.0.attn.hook_z fires"):
        sla.analysis.polysemanticity(plant.model, plant.sae, quiet, ignore_tokens=[0])


@pytest.mark.slow
def test_plots_and_panels_show_the_results(plant: Planted, tmp_path: Path) -> None:
    logits = sla.analysis.feature_logits(plant.model, plant.sae, [1, 2], k=5)
    families = sla.analysis.feature_families(
        plant.model, plant.sae, plant.tokens, ignore_tokens=[0]
    )
    result = sla.analysis.polysemanticity(
        plant.model, plant.sae, plant.tokens, k=3, ignore_tokens=[0]
    )
    paths = [
        analysis_plots.feature_logits_png(logits, tmp_path / "logits.png"),
        analysis_plots.family_counts_png({"layer 0": families}, tmp_path / "families.png"),
        analysis_plots.head_families_png(result, tmp_path / "heads.png"),
    ]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in paths)
    panel = panels.feature_logits_panel(logits, 1)
    assert 'id="feature-logits-panel"' in panel and f"&lt;{int(logits.top_ids[0, 0])}&gt;" in panel
    assert logits.top_ids[0, 0] == POOL[1]  # feature 1 copies it
    family = panels.family_panel(families, 2)
    assert 'id="family-panel"' in family and "suppression (100% of its contexts)" in family
    assert "never fires" in panels.family_panel(families, 6)


@pytest.mark.slow
def test_cli_runs_the_three_analyzers(tmp_path: Path) -> None:
    from sae_lens_attn.cli.main import main

    model_dir, sae_dir, out = tmp_path / "model", tmp_path / "sae", tmp_path / "out"
    build_hf("gpt2").save_pretrained(model_dir)
    make_tokenizer(VOCAB_SIZE).save_pretrained(model_dir)
    random_sae(AttnSite(1, 4, 4, 8), value_bias_convention="included").save_model(sae_dir)
    text = tmp_path / "text.txt"
    words = torch.randint(2, VOCAB_SIZE, (400,), generator=torch.Generator().manual_seed(0))
    text.write_text(" ".join(f"w{w}" for w in words.tolist()))
    args = [
        "analyze", "--model", f"hf:{model_dir}", "--sae", str(sae_dir), "--text", str(text),
        "--analyzers", "feature_logits,feature_families,polysemanticity",
        "--context-size", "16", "--top", "3", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    written = {p.name for p in out.iterdir()}
    tables = {"feature_logits", "feature_families", "family_counts", "head_features"}
    tables |= {"head_verdicts", "polysemanticity"}
    assert {f"{name}.csv" for name in tables} <= written
    assert {"feature_logits.png", "family_counts.png", "head_families.png"} <= written

    def rows(name: str) -> list[dict[str, str]]:
        with (out / f"{name}.csv").open() as f:
            return list(csv.DictReader(f))

    assert len(rows("feature_logits")) == 3 * 2 * 20  # 3 features, top and bottom, k = 20
    assert sum(int(r["features"]) for r in rows("family_counts")) == 3
    assert {r["label"] for r in rows("feature_families")} <= {
        r["label"] for r in rows("family_counts")
    }
    verdicts = rows("head_verdicts")
    assert len(verdicts) == 4
    summary = rows("polysemanticity")[0]
    polysemantic = sum(r["verdict"] == "polysemantic" for r in verdicts)
    assert float(summary["fraction_polysemantic"]) == polysemantic / 4
    assert len(rows("head_features")) == 4 * 10
