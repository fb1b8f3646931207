"""Recursive DFA: exact splits on the embedded model, TransformerLens and Hugging Face models,
checked against SAELens's own pre-activation, the DFA kernel, and ablations with frozen attention."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import torch
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn import AttnSite, backend_for
from sae_lens_attn.analysis.recursive_dfa import Contribution, RDFAResult, rdfa
from sae_lens_attn.analysis.residual_parts import read_residual_parts
from sae_lens_attn.sae_adapter import encode_z

from .factories import batch, independent_z, random_sae
from .hf_twins import build_hf, build_twin

RELEASE = "stdlib-2l-attn-z"
TEXT = (
    "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
    "    parser.add_argument('--name')\n    args = parser.parse_args(argv)\n"
    "    parser.add_argument('--name')\n"
)


@pytest.fixture(scope="module")
def default() -> tuple[Any, Any, list[SAE[Any]]]:
    model, tokenizer = sla.load_default_model()
    saes = [SAE.from_pretrained(RELEASE, f"blocks.{layer}.hook_z") for layer in (0, 1)]
    return model, tokenizer, saes


def sae_pre_act(model: Any, sae: SAE[Any], tokens: torch.Tensor) -> torch.Tensor:
    """SAELens's own ``hook_sae_acts_pre`` on z as the model computes it, ``[batch, pos, d_sae]``,
    z taken without this package (``factories.independent_z``)."""
    site = AttnSite.from_sae(sae, model)
    convention = sae.cfg.metadata.get("value_bias_convention", None) or "included"
    z = independent_z(model, tokens, site.layer, convention=convention)
    _, cache = sae.run_with_cache(z if sae.cfg.reshape_activations == "hook_z" else z.flatten(-2))
    return cache["hook_sae_acts_pre"]


def top_sum(result: RDFAResult) -> float:
    return sum(row.value for row in result.contributions) + result.bias


def walk(rows: tuple[Contribution, ...]) -> list[Contribution]:
    out = []
    for row in rows:
        out.append(row)
        out.extend(walk(row.children))
    return out


def assert_consistent(model: Any, saes: list[SAE[Any]], tokens: torch.Tensor, result: RDFAResult):
    """The invariant, each expanded row's children, and the per-source split against DFA."""
    target = next(s for s in saes if AttnSite.from_sae(s, model).layer == result.layer)
    pre = float(sae_pre_act(model, target, tokens)[result.prompt, result.position, result.feature])
    assert result.pre_act == pytest.approx(pre, abs=1e-4, rel=1e-4)
    assert top_sum(result) == pytest.approx(pre, abs=1e-4, rel=1e-4)
    for row in walk(result.contributions):
        if row.children:
            total = sum(c.value for c in row.children) + row.children_bias
            assert total == pytest.approx(row.value, abs=1e-5, rel=1e-3)
    by_src = sla.analysis.dfa(
        model,
        target,
        tokens[result.prompt : result.prompt + 1],
        features=[result.feature],
        positions=torch.tensor([[result.position]]),
    ).by_src[0, 0, :, 0]
    per_source: dict[int, float] = defaultdict(float)
    for row in result.contributions:
        per_source[row.position] += row.value
    mine = torch.tensor([per_source[s] for s in range(result.position + 1)], dtype=torch.float64)
    torch.testing.assert_close(mine, by_src[: result.position + 1].double(), atol=1e-4, rtol=1e-4)


def firing_feature(model: Any, sae: SAE[Any], tokens: torch.Tensor) -> tuple[int, int]:
    """(feature, position) of the largest activation in the first prompt."""
    site = AttnSite.from_sae(sae, model)
    z = backend_for(model).capture(tokens[:1], [site])[site.layer].z
    acts = encode_z(sae, z)[0]
    position, feature = divmod(int(acts.argmax()), acts.shape[-1])
    return feature, position


def test_embedded_model_split_is_exact_with_both_saes(default) -> None:
    model, _, saes = default
    tokens = model.to_tokens(TEXT)
    feature, position = firing_feature(model, saes[1], tokens)
    result = rdfa(model, saes, tokens, layer=1, feature=feature, position=position)
    assert result.activation > 0 and not result.notes
    kinds = {row.kind for row in result.contributions}
    assert {"feature", "sae_error", "token_embedding", "attention_bias", "value_bias"} <= kinds
    assert "mlp" not in kinds and "position_embedding" not in kinds  # attention-only, shortformer
    assert any(row.children for row in result.contributions)
    assert_consistent(model, saes, tokens, result)


def test_embedded_model_children_are_the_upstream_features_own_split(default) -> None:
    model, _, saes = default
    tokens = model.to_tokens(TEXT)
    feature, position = firing_feature(model, saes[1], tokens)
    result = rdfa(model, saes, tokens, layer=1, feature=feature, position=position, expand=2)
    expanded = [row for row in result.contributions if row.children]
    assert len(expanded) == 2
    for row in expanded:
        assert row.layer == 0 and row.feature is not None
        own = rdfa(model, saes, tokens, layer=0, feature=row.feature, position=row.position)
        factor = row.value / own.pre_act  # the row is the upstream pre-activation times m
        assert [c.kind for c in row.children] == [c.kind for c in own.contributions]
        torch.testing.assert_close(
            torch.tensor([c.value for c in row.children]),
            torch.tensor([c.value * factor for c in own.contributions]),
            atol=1e-6,
            rtol=1e-4,
        )
        assert row.children_bias == pytest.approx(own.bias * factor, rel=1e-4)


def frozen_pre_act(model: Any, sae: SAE[Any], tokens: torch.Tensor, layer: int, edit: Any) -> Any:
    """The SAE's pre-activations with ``edit`` applied to layer ``layer``'s residual input while its
    attention pattern and norm scale stay as on the clean tokens (TransformerLens hooks)."""
    _, clean = model.run_with_cache(tokens)
    hooks = [
        (f"blocks.{layer}.hook_resid_pre", lambda x, hook: edit(x.clone())),
        (f"blocks.{layer}.ln1.hook_scale", lambda x, hook: clean[hook.name]),
        (f"blocks.{layer}.attn.hook_pattern", lambda x, hook: clean[hook.name]),
    ]
    z = {}

    def keep(x: torch.Tensor, hook: Any) -> None:
        z["z"] = x

    hooks.append((f"blocks.{layer}.attn.hook_z", keep))
    model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None, stop_at_layer=layer + 1)
    _, cache = sae.run_with_cache(z["z"])
    return cache["hook_sae_acts_pre"]


@pytest.mark.slow
def test_removing_one_part_moves_the_pre_activation_by_its_value(default) -> None:
    """Independent of the split's arithmetic: with attention and norm scale frozen, taking a part
    out of the residual stream lowers the feature's pre-activation by exactly that row's value."""
    model, _, saes = default
    tokens = model.to_tokens(TEXT)
    feature, position = firing_feature(model, saes[1], tokens)
    result = rdfa(model, saes, tokens, layer=1, feature=feature, position=position)
    clean = float(sae_pre_act(model, saes[1], tokens)[0, position, feature])
    _, cache = model.run_with_cache(tokens)
    z0 = cache["blocks.0.attn.hook_z"][0]
    sae0 = saes[0]
    acts0 = encode_z(sae0, z0)
    decoder = sae0.W_dec / sae0.W_dec.norm(dim=-1, keepdim=True)  # TopK, rescaled by the norm
    W_O = model.blocks[0].attn.W_O.flatten(0, 1)
    checked = set()
    for row in result.contributions:
        if row.kind in checked or row.kind not in ("feature", "token_embedding", "sae_error"):
            continue
        s = row.position
        if row.kind == "token_embedding":
            part = cache["hook_embed"][0, s]
        elif row.kind == "feature":
            part = acts0[s, row.feature] * decoder[row.feature] @ W_O
        else:
            part = (z0[s].flatten() - sae0.decode(acts0[s : s + 1]).flatten()) @ W_O

        def remove(x: torch.Tensor, s: int = s, part: torch.Tensor = part) -> torch.Tensor:
            x[0, s] -= part
            return x

        edited = float(frozen_pre_act(model, saes[1], tokens, 1, remove)[0, position, feature])
        assert clean - edited == pytest.approx(row.value, abs=2e-5, rel=1e-3)
        checked.add(row.kind)
    assert checked == {"feature", "token_embedding", "sae_error"}


@pytest.mark.parametrize("fixture", ["model", "gqa_model"])
@pytest.mark.parametrize("convention", ["included", "folded"])
def test_transformer_lens_models_with_norm_gains_mlps_and_gqa(request, fixture, convention) -> None:
    model = request.getfixturevalue(fixture)  # LayerNorm with gain and bias, b_V ≠ 0
    saes = [
        random_sae(AttnSite.from_model(model, layer), seed=layer, value_bias_convention=convention)
        for layer in (0, 1)
    ]
    tokens = batch(2, 12)
    result = rdfa(model, saes, tokens, layer=1, feature=5, position=9, prompt=1)
    kinds = {row.kind for row in result.contributions}
    assert ("mlp" in kinds) == (fixture == "gqa_model")
    assert ("position_embedding" in kinds) == (fixture == "model")  # standard vs rotary
    assert ("value_bias" in kinds) == (convention == "included")
    assert_consistent(model, saes, tokens, result)


@pytest.mark.parametrize("normalisation", ["constant_norm_rescale", "layer_norm"])
def test_upstream_and_target_input_normalisations(model, normalisation) -> None:
    saes = [random_sae(AttnSite.from_model(model, layer), seed=layer) for layer in (0, 1)]
    for sae in saes:
        sae.cfg.normalize_activations = normalisation
        sae._setup_activation_normalization()
    tokens = batch(1, 12)
    result = rdfa(model, saes, tokens, layer=1, feature=3, position=11)
    assert_consistent(model, saes, tokens, result)
    # the upstream error term is what SAELens itself does not reconstruct
    from sae_lens_attn.analysis.recursive_dfa import _decomposition

    parts = read_residual_parts(backend_for(model), tokens, 1)
    split = _decomposition(parts.layers[0], saes[0], backend_for(model))
    z = parts.layers[0].z.float()  # [pos, n_heads, d_head]: the SAEs reshape hook_z
    expected = (z - saes[0].decode(saes[0].encode(z))).flatten(-2)
    torch.testing.assert_close(split.error.float(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_models(arch) -> None:
    hf = build_hf(arch)  # GPT-2: LayerNorm, learned positions; Llama: RMSNorm, rotary, GQA
    saes = [
        random_sae(AttnSite.from_model(hf, layer), seed=layer, value_bias_convention="included")
        for layer in (0, 1)
    ]
    tokens = batch(1, 12)
    result = rdfa(hf, saes, tokens, layer=1, feature=7, position=11)
    kinds = {row.kind for row in result.contributions}
    assert "mlp" in kinds and ("position_embedding" in kinds) == (arch == "gpt2")
    assert_consistent(hf, saes, tokens, result)


@pytest.mark.parametrize("convention", ["included", "folded"])
@pytest.mark.slow
def test_hugging_face_and_its_transformer_lens_twin_split_alike(convention) -> None:
    hf = build_hf("gpt2")
    twin = build_twin(hf)
    tokens = batch(1, 12)
    results = []
    for model in (hf, twin):
        saes = [
            random_sae(
                AttnSite.from_model(model, layer), seed=layer, value_bias_convention=convention
            )
            for layer in (0, 1)
        ]
        results.append(rdfa(model, saes, tokens, layer=1, feature=2, position=10, expand=1))
    rows = [
        [(r["kind"], r["layer"], r["position"], r["feature"]) for r in x.rows()] for x in results
    ]
    assert rows[0] == rows[1]
    torch.testing.assert_close(
        torch.tensor([r["value"] for r in results[0].rows()]),
        torch.tensor([r["value"] for r in results[1].rows()]),
        atol=1e-5,
        rtol=1e-4,
    )


def test_an_upstream_layer_without_an_sae_counts_as_error_and_says_so(default) -> None:
    model, _, saes = default
    tokens = model.to_tokens(TEXT)
    feature, position = firing_feature(model, saes[1], tokens)
    with pytest.warns(UserWarning, match=r"no SAE for layer\(s\) \[0\]"):
        result = rdfa(model, [saes[1]], tokens, layer=1, feature=feature, position=position)
    assert result.notes and "sae_error" in result.notes[0]
    layer0 = {row.kind for row in result.contributions if row.layer == 0}
    assert layer0 == {"sae_error"}
    assert not any(row.children for row in result.contributions)
    assert_consistent(model, saes, tokens, result)


def test_bad_input(default) -> None:
    model, _, saes = default
    tokens = model.to_tokens(TEXT)
    n = tokens.shape[1]
    with pytest.raises(ValueError, match=r"needs the SAE of layer 1.*layers \[0\]"):
        rdfa(model, [saes[0]], tokens, layer=1, feature=0, position=3)
    with pytest.raises(ValueError, match=r"two SAEs read layer 1"):
        rdfa(model, [saes[1], saes[1]], tokens, layer=1, feature=0, position=3)
    with pytest.raises(ValueError, match=r"given for layer 0 reads layer 1"):
        rdfa(model, {0: saes[1]}, tokens, layer=1, feature=0, position=3)
    with pytest.raises(ValueError, match=rf"position must be .* 0\.\.{n - 1}.* got {n}"):
        rdfa(model, saes, tokens, layer=1, feature=0, position=n)
    with pytest.raises(ValueError, match=r"out of range.*d_sae=512"):
        rdfa(model, saes, tokens, layer=1, feature=512, position=3)
    with pytest.raises(ValueError, match=r"prompt must be a row of tokens in 0\.\.0"):
        rdfa(model, saes, tokens, layer=1, feature=0, position=3, prompt=1)
    with pytest.raises(ValueError, match=r"layer"):
        rdfa(model, saes, tokens, layer=2, feature=0, position=3)
    with pytest.raises(TypeError, match=r"SAELens SAEs"):
        rdfa(model, ["sae"], tokens, layer=1, feature=0, position=3)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("gemma2", "norm of its own before joining the residual"),
        ("gemma", "not a LayerNorm or RMSNorm with gain"),  # RMSNorm scaling by 1 + w
    ],
)
def test_models_whose_stream_is_not_a_sum_of_parts_are_refused(arch, message) -> None:
    hf = build_hf(arch)
    saes = [random_sae(AttnSite.from_model(hf, layer), seed=layer) for layer in (0, 1)]
    with pytest.raises(ValueError, match=message):
        rdfa(hf, saes, batch(1, 8), layer=1, feature=0, position=7)


@pytest.mark.slow
def test_analyzer_tables_and_tree_html(default, tmp_path) -> None:
    from sae_lens_attn.analysis import AnalysisInput
    from sae_lens_attn.viz.induction_plots import induction_table_plots, rdfa_tree_html

    model, tokenizer, saes = default
    tokens = model.to_tokens(TEXT)
    feature, position = firing_feature(model, saes[1], tokens)
    inputs = AnalysisInput(
        model,
        saes[1],
        tokens,
        tokenizer=tokenizer,
        options={"features": [feature], "upstream_saes": [saes[0]], "expand": 1},
    )
    tables = sla.analysis.get("rdfa")(inputs)
    (summary,) = tables["rdfa_summary"]
    assert (summary["feature"], summary["position"], summary["prompt"]) == (feature, position, 0)
    direct = rdfa(model, saes, tokens, 1, feature, position, expand=1)
    assert summary["pre_act"] == pytest.approx(direct.pre_act)
    assert summary["sum"] == pytest.approx(direct.pre_act, abs=1e-4)
    assert tables["rdfa"] == direct.rows(tokenizer)
    top = [row for row in tables["rdfa"] if row["parent"] == ""]
    assert sum(row["value"] for row in top) + summary["bias"] == pytest.approx(summary["pre_act"])
    written = induction_table_plots(tables, tmp_path)
    assert [p.name for p in written] == ["rdfa.html"]
    page = (tmp_path / "rdfa.html").read_text()
    assert f"feature {feature}" in page and "<details>" in page and "encoder bias" in page
    html = rdfa_tree_html(direct, tokenizer=tokenizer, top=3)
    assert html.count("more parts") >= 1 and "token embedding" in html


@pytest.mark.slow
def test_cli_runs_both_analyzers_on_the_embedded_model(default, tmp_path) -> None:
    from sae_lens_attn.cli.main import main

    model, _, _ = default
    tokens_file = tmp_path / "tokens.pt"
    torch.save(model.to_tokens([TEXT, TEXT[40:]], padding_side="right")[:, :60], tokens_file)
    out = tmp_path / "out"
    args = [
        "analyze", "--model", "default", "--sae", f"{RELEASE}:blocks.1",
        "--upstream-sae", f"{RELEASE}:blocks.0", "--tokens", str(tokens_file),
        "--analyzers", "prefix_induction,rdfa", "--features", "253",
        "--option", "n_samples=4", "--option", "prefix_lengths=[1,2]",
        "--option", "max_corrupted=3", "--option", "prompt=0", "--option", "position=50",
        "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "prefix_scores.csv", "prefix_events.csv", "prefix_corruption.csv", "prefix_scores.png",
        "prefix_events.png", "rdfa.csv", "rdfa_summary.csv", "rdfa.html",
    } <= names  # fmt: skip
    import csv

    (summary,) = csv.DictReader((out / "rdfa_summary.csv").open())
    assert (summary["feature"], summary["prompt"], summary["position"]) == ("253", "0", "50")
    assert float(summary["sum"]) == pytest.approx(float(summary["pre_act"]), abs=1e-4)
    scores = list(csv.DictReader((out / "prefix_scores.csv").open()))
    assert len(scores) == 2 * 4 * 2  # layers × heads × prefix lengths
