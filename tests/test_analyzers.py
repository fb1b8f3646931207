"""Analyzer registry, built-in analyzers and the induction heuristics' arithmetic."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.analysis import AnalysisInput, registry
from sae_lens_attn.outputs import OUTPUT_MARKER

from .factories import batch, random_sae
from .hf_twins import VOCAB_SIZE as VOCAB


def test_builtins_register_through_entry_points() -> None:
    from importlib.metadata import entry_points

    declared = {point.name for point in entry_points(group=sla.analysis.ENTRY_POINT_GROUP)}
    assert {"dfa", "head_attribution", "induction_scores", "induction_features"} <= declared
    assert declared <= set(sla.analysis.names())


def test_third_party_analyzer_registers_and_runs(model, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    class CountTokens:
        description = "number of tokens"

        def __call__(self, inputs: AnalysisInput) -> dict[str, Any]:
            return {"count": [{"tokens": int(inputs.tokens.numel())}]}

    analyzer = CountTokens()
    sla.analysis.register("count_tokens", analyzer)
    sla.analysis.register("count_tokens", analyzer)  # the same object again: fine
    assert "count_tokens" in sla.analysis.names()
    sae = random_sae(AttnSite.from_model(model, 0))
    assert sla.analysis.get("count_tokens")(AnalysisInput(model, sae, batch())) == {
        "count": [{"tokens": 36}]
    }
    with pytest.raises(ValueError, match="'count_tokens' is already registered"):
        sla.analysis.register("count_tokens", CountTokens())
    with pytest.raises(TypeError, match="callable with a str description"):
        sla.analysis.register("broken", object())  # type: ignore[arg-type]


def test_unknown_analyzer_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown analyzer 'nope'; registered: \[.*'dfa'.*\]"):
        sla.analysis.get("nope")


def test_builtin_analyzers_produce_tables(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 1))
    inputs = AnalysisInput(
        model, sae, batch(), options={"features": [3, 5], "bos_token_id": 0, "induction_seq_len": 7}
    )
    heads = sla.analysis.get("head_attribution")(inputs)["head_attribution"]
    assert [row["feature"] for row in heads] == [3, 5]
    assert math.isclose(sum(heads[0][f"head_{h}"] for h in range(4)), 1.0, rel_tol=1e-5)
    with torch.no_grad():  # feature 3 never fires: its rows say so and attribute nothing
        dict(sae.named_parameters())["b_enc"][3] = -100.0
    tables = sla.analysis.get("dfa")(inputs)
    full = sla.analysis.dfa(model, sae, batch(), features=[3, 5])
    fires = full.acts.amax(1) > 0  # (prompt, feature)
    assert fires[:, 1].any() and not fires[:, 0].any()
    for column, feature in enumerate([3, 5]):
        for prompt in range(3):
            srcs = [
                r for r in tables["dfa_by_src"] if (r["feature"], r["prompt"]) == (feature, prompt)
            ]
            heads = [
                r for r in tables["dfa_by_head"] if (r["feature"], r["prompt"]) == (feature, prompt)
            ]
            if not fires[prompt, column]:
                for rows in (srcs, heads):
                    assert len(rows) == 1 and rows[0]["fired"] is False
                    assert rows[0]["query_pos"] is None and rows[0]["contribution"] is None
                continue
            peak = int(full.acts[prompt, :, column].argmax())
            assert len(srcs) == 5 and len(heads) == 4
            assert all(r["fired"] and r["query_pos"] == peak for r in srcs + heads)
            bias = float(full.bias[column])
            total = sum(r["contribution"] for r in heads) + bias
            assert math.isclose(total, srcs[0]["pre_act"], abs_tol=1e-4)
            assert math.isclose(
                srcs[0]["pre_act"], float(full.pre_act[prompt, peak, column]), abs_tol=1e-4
            )
            top = full.by_src[prompt, peak, :, column].abs().argsort(descending=True)[:5]
            assert [r["source_pos"] for r in srcs] == top.tolist()
    scores = sla.analysis.get("induction_scores")(inputs)["induction_scores"]
    assert len(scores) == 2 * 4 and all(0 <= row["score"] <= 1 for row in scores)


@pytest.mark.parametrize("normalize_activations", ["none", "layer_norm"])
def test_induction_behaviour_matches_dfa_context_by_context(
    model, normalize_activations, tmp_path
) -> None:
    """The pass rate equals a brute-force count over the contexts with sla.analysis.dfa, also
    for an SAE that normalises its input (the behaviour test runs on the one DFA kernel)."""
    site = AttnSite.from_model(model, 1)
    sae = random_sae(
        site, "standard", tmp_path, normalize_activations=normalize_activations, d_sae=32
    )
    tokens = torch.randint(
        1, 12, (6, 16), generator=torch.Generator().manual_seed(3)
    )  # many repeats
    report = sla.analysis.induction_features(
        model,
        sae,
        tokens,
        induction_heads=[0, 1],
        max_contexts=10_000,
        bos_token_id=0,
        induction_seq_len=7,
    )
    shares = sla.analysis.head_attribution(sae)[:, [0, 1]].sum(-1)
    full = sla.analysis.dfa(model, sae, tokens)
    acts = full.acts  # the SAE's own activations
    checked = 0
    for row in report.rows:
        assert math.isclose(row.share, float(shares[row.feature]), rel_tol=1e-5)
        fired = (acts[..., row.feature] > 0).nonzero().tolist()
        assert row.contexts == len(fired)
        if not fired:
            continue
        passed = 0
        for b, q in fired:
            s = int(full.by_src[b, q, : q + 1, row.feature].argmax())
            drives = float(full.by_src[b, q, s, row.feature]) > 0
            passed += drives and 1 <= s < q and bool(tokens[b, s - 1] == tokens[b, q])
        assert math.isclose(row.pass_rate, passed / len(fired))
        expected = (
            "control"
            if row.share < 0.2
            else "neither"
            if row.share < 0.5
            else ("induction" if row.pass_rate >= 0.6 else "selected, fails behaviour")
        )
        assert row.verdict == expected
        checked += 1
    assert checked >= 5


def test_induction_heads_out_of_range_are_refused(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 1))
    with pytest.raises(ValueError, match=r"induction_heads \[7\] out of range for 4 heads"):
        sla.analysis.induction_features(
            model, sae, batch(), induction_heads=[1, 7], bos_token_id=0, induction_seq_len=7
        )


def test_cli_analyze_writes_tables_and_plots(tmp_path, capsys) -> None:
    from sae_lens_attn.cli.main import main

    from .hf_twins import build_hf, make_tokenizer

    model_dir, sae_dir, out = tmp_path / "model", tmp_path / "sae", tmp_path / "out"
    build_hf("gpt2").save_pretrained(model_dir)
    make_tokenizer(VOCAB).save_pretrained(model_dir)
    site = AttnSite(1, 4, 4, 8)
    random_sae(site, value_bias_convention="included").save_model(sae_dir)
    text = tmp_path / "text.txt"
    words = torch.randint(2, VOCAB, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    text.write_text(" ".join(f"w{w}" for w in words))
    args = [
        "analyze",
        "--model",
        f"hf:{model_dir}",
        "--sae",
        str(sae_dir),
        "--text",
        str(text),
        "--analyzers",
        "head_attribution,dfa,induction_scores",
        "--context-size",
        "16",
        "--top",
        "3",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [
            OUTPUT_MARKER,
            "head_attribution.csv",
            "dfa_by_src.csv",
            "dfa_by_head.csv",
            "induction_scores.csv",
            "head_attribution.png",
            "dfa.html",
        ]
    )
    assert (out / "head_attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "feature" in (out / "dfa.html").read_text() and "<span" in (out / "dfa.html").read_text()
    rows = (out / "dfa_by_head.csv").read_text().splitlines()
    assert (
        rows[0] == "feature,prompt,fired,query_pos,query_token,activation,pre_act,head,contribution"
    )
    assert main(args) == 1
    assert "earlier analysis output of sae-lens-attn; pass" in capsys.readouterr().err
    assert main([*args[:8], "nope", *args[9:], "--overwrite"]) == 1
    assert "unknown analyzer 'nope'; registered" in capsys.readouterr().err
