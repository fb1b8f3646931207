"""The causal analyzers (``feature_ablation``, ``activation_patching``, ``induction_ablation``),
their plots and ``sae-lens-attn analyze`` with them.

The IOI prompts come from a byte-level BPE tokenizer trained here, offline, on IOI-like text whose
names are words of it; the model is a tiny 2-layer attention-only GPT-2-shaped
``HookedTransformer``. References go around the analyzers: the library functions they wrap, and
TransformerLens hooks with SAELens's own encode and decode. A 2-layer attention-only model gives
an exact invariant: layer 1's z at one position reaches only that position's logits, so ablating
or patching it at S2 leaves the metric read at the end unchanged.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from sae_lens import SAE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn.analysis import AnalysisInput, get
from sae_lens_attn.analysis import ioi as ioi_module
from sae_lens_attn.analysis.analyzers.causal import ALL, next_token_logit, repeat_positions
from sae_lens_attn.analysis.analyzers.repeats import induction_ablation
from sae_lens_attn.analysis.induction import random_tokens
from sae_lens_attn.cli.main import main
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.viz.causal_plots import causal_table_plots
from sae_lens_attn.viz.plots import png_text

from .factories import random_sae, sae_lens_encode

NAMES = ("Mary", "John", "Alice", "Bob", "Sarah", "David")
"""The names the tokenizer learns as words (each one token with its leading space)."""
N_PROMPTS = 12


def ioi_tokenizer() -> Any:
    """A GPT-2-like byte-level BPE (BOS known, never added) trained on IOI-like sentences over
    ``NAMES``, with every template, the corruptions' fillers and " alongside"."""
    lines = []
    for k, (a, b) in enumerate(itertools.permutations(NAMES, 2)):
        for template in ioi_module.TEMPLATES:
            text = (
                template.replace("[A]", a)
                .replace("[B]", b)
                .replace("[S]", b)
                .replace("[PLACE]", ioi_module.PLACES[k % len(ioi_module.PLACES)])
                .replace("[OBJECT]", ioi_module.OBJECTS[k % len(ioi_module.OBJECTS)])
            )
            lines.append(text.replace("|", "") + f" {a}.")
            filled = text.replace("|", ioi_module.MID_FILLER)
            lines.append(f"{ioi_module.PREFIX_FILLER} {filled} {a}.")
            lines.append(text.replace("|", "").replace(" and ", " alongside ", 1))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return ioi_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=len(tokenizer),
        act_fn="gelu", attn_only=True, normalization_type="LN",
        original_architecture="GPT2LMHeadModel", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            attn: Any = model.blocks[layer].attn
            attn.b_V.normal_(0, 0.3)  # a value bias: z conventions differ
            attn.b_O.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def sae0(tiny) -> SAE[Any]:
    return random_sae(sla.AttnSite.from_model(tiny, 0), d_sae=48, std=0.4)


@pytest.fixture(scope="module")
def sae1(tiny) -> SAE[Any]:
    return random_sae(sla.AttnSite.from_model(tiny, 1), d_sae=48, std=0.4, seed=1)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> Any:
    return sla.analysis.ioi_prompts(tokenizer, n=N_PROMPTS)


def inputs_for(model: Any, sae: Any, tokenizer: Any, **options: Any) -> AnalysisInput:
    tokens = torch.randint(1, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    return AnalysisInput(
        model, sae, tokens, tokenizer=tokenizer, options={"n_prompts": N_PROMPTS} | options
    )


def test_the_causal_analyzers_register_through_entry_points() -> None:
    from importlib.metadata import entry_points

    declared = {point.name for point in entry_points(group=sla.analysis.ENTRY_POINT_GROUP)}
    wanted = {"feature_ablation", "activation_patching", "induction_ablation"}
    assert wanted <= declared and wanted <= set(sla.analysis.names())
    assert all(get(name).description for name in wanted)


# --- feature_ablation ---------------------------------------------------------------------------


def test_feature_ablation_tables_are_the_function_per_template(
    tiny, sae0, tokenizer, prompts
) -> None:
    tables = get("feature_ablation")(inputs_for(tiny, sae0, tokenizer, top_effects=5))
    s2 = prompts.word_idx["S2"]
    result = sla.analysis.feature_ablation(
        tiny, sae0, prompts.tokens, prompts.logit_diff(), s2,
        attention_mask=prompts.attention_mask,
    )  # fmt: skip
    row_of = {int(f): i for i, f in enumerate(result.features)}
    templates = torch.tensor([t == "ABBA" for t in prompts.template])
    members = {"ABBA": templates, "BABA": ~templates, ALL: torch.ones_like(templates)}
    effects = tables["ablation_effects"]
    assert {row["group"] for row in effects} == set(members)
    for group, keep in members.items():
        rows = [r for r in effects if r["group"] == group]
        features = [r for r in rows if r["component"] == "feature"]
        assert [r["rank"] for r in features] == [1, 2, 3, 4, 5]
        assert all(r["n_prompts"] == int(keep.sum()) for r in rows)
        means = result.delta[:, keep].double().mean(1)
        expected = means.abs().sort(descending=True).values[:5]
        got = torch.tensor([abs(r["mean_delta"]) for r in features], dtype=torch.double)
        torch.testing.assert_close(got, expected)
        for r in features:
            assert r["mean_delta"] == pytest.approx(float(means[row_of[r["feature"]]]), abs=1e-9)
        (error,) = [r for r in rows if r["component"] == "error"]
        assert error["mean_delta"] == pytest.approx(float(result.error_delta[keep].mean()))
        assert error["clean"] == pytest.approx(float(result.clean[keep].mean()))
    assert any(abs(r["mean_delta"]) > 1e-4 for r in effects)  # layer 0 reaches the end

    # per prompt: the tabled features and the error term, grouped by template
    _, cache = tiny.run_with_cache(prompts.tokens)
    z = cache["blocks.0.attn.hook_z"]
    rows = torch.arange(N_PROMPTS)
    _, acts = sae_lens_encode(sae0, z[rows, s2])  # (prompts, d_sae), SAELens's own encode
    for r in tables["ablation_prompts"]:
        assert r["group"] == prompts.template[r["prompt"]]
        expected = (
            result.error_delta[r["prompt"]]
            if r["component"] == "error"
            else result.delta[row_of[r["feature"]], r["prompt"]]
        )
        assert r["delta"] == pytest.approx(float(expected))
    for r in (r for r in effects if r["component"] == "feature"):
        keep = members[r["group"]]
        share = float((acts[keep, r["feature"]] > 0).float().mean())
        assert r["active_share"] == pytest.approx(share)
    summary = {r["group"]: r for r in tables["ablation_summary"]}
    assert summary[ALL]["features"] == result.features.numel()
    assert "IOI prompts at S2" in summary[ALL]["prompts"]


def test_ablating_the_last_layer_at_s2_leaves_the_end_unchanged(tiny, sae1, tokenizer) -> None:
    tables = get("feature_ablation")(inputs_for(tiny, sae1, tokenizer))
    assert tables["ablation_effects"] and all(
        r["mean_delta"] == 0 for r in tables["ablation_effects"]
    )
    patching = get("activation_patching")(inputs_for(tiny, sae1, tokenizer, patch_layers=[0, 1]))[
        "patching"
    ]
    assert {r["corruption"] for r in patching} == set(ioi_module.CORRUPTIONS)
    last = [r for r in patching if r["layer"] == 1]
    assert last and all(r["patched"] == r["clean"] == r["zero_ablated"] for r in last)
    assert any(r["patched"] != r["clean"] for r in patching if r["layer"] == 0)


def test_attribution_method_and_chosen_features(tiny, sae0, tokenizer) -> None:
    tables = get("feature_ablation")(
        inputs_for(tiny, sae0, tokenizer, features=[3, 5, 7], method="attribution")
    )
    summary = tables["ablation_summary"][-1]
    assert (summary["method"], summary["features"], summary["group"]) == ("attribution", 3, ALL)
    assert {r["feature"] for r in tables["ablation_effects"]} == {3, 5, 7, None}


# --- activation_patching ------------------------------------------------------------------------


def test_patching_rows_are_the_function_and_zero_ablation_zeroes_z_at_s2(
    tiny, sae0, tokenizer, prompts
) -> None:
    rows = get("activation_patching")(
        inputs_for(tiny, sae0, tokenizer, corruptions=["flip_names"])
    )["patching"]
    corrupt = prompts.corrupt("flip_names")
    on_corrupt = sla.analysis.logit_diff(corrupt.word_idx["end"], prompts.io_ids, prompts.s_ids)
    result = sla.analysis.activation_patching(
        tiny, prompts.tokens, corrupt.tokens, (prompts.logit_diff(), on_corrupt), [0],
        positions=prompts.word_idx["S2"], source_positions=corrupt.word_idx["S2"],
        clean_attention_mask=prompts.attention_mask, corrupt_attention_mask=corrupt.attention_mask,
    )  # fmt: skip
    s2 = prompts.word_idx["S2"]

    def zero_at_s2(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[torch.arange(N_PROMPTS), s2] = 0
        return z

    with torch.no_grad():
        logits = tiny.run_with_hooks(
            prompts.tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_at_s2)]
        )
    zeroed = prompts.logit_diff()(logits)
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"ABBA", "BABA", ALL}
    assert by_group[ALL]["n_prompts"] == N_PROMPTS
    for group, keep in (("ABBA", [t == "ABBA" for t in prompts.template]), (ALL, None)):
        index = torch.tensor(keep) if keep is not None else torch.ones(N_PROMPTS, dtype=torch.bool)
        r = by_group[group]
        assert (r["corruption"], r["layer"], r["head"]) == ("flip_names", 0, None)
        assert r["clean"] == pytest.approx(float(result.clean[index].mean()))
        assert r["corrupt"] == pytest.approx(float(result.corrupt[index].mean()))
        assert r["patched"] == pytest.approx(float(result.patched[0, index].mean()))
        assert r["zero_ablated"] == pytest.approx(float(zeroed[index].mean()), abs=1e-5)
    assert by_group[ALL]["zero_ablated"] != pytest.approx(by_group[ALL]["clean"])


def test_patching_per_head_and_denoising(tiny, sae0, tokenizer) -> None:
    rows = get("activation_patching")(
        inputs_for(
            tiny, sae0, tokenizer, target="z", corruptions="and_to_alongside",
            direction="denoising",
        )
    )["patching"]  # fmt: skip
    assert sorted({r["head"] for r in rows}) == [0, 1, 2, 3]
    assert len(rows) == 4 * 3  # heads × groups
    assert all(r["direction"] == "denoising" and r["target"] == "z" for r in rows)


def test_repeated_prompts_patch_the_second_copy(tiny, sae0, tokenizer) -> None:
    options = {"prompts": "repeated", "n_prompts": 6, "repeat_len": 10, "bos_token_id": 0}
    rows = get("activation_patching")(inputs_for(tiny, sae0, tokenizer, **options))["patching"]
    (row,) = rows
    assert (row["corruption"], row["group"], row["n_prompts"]) == ("fresh_first_copy", ALL, 6)
    assert "repeated random tokens" in row["prompts"]
    # the clean metric: the logit of the next token over the second copy, by hand
    vocab = torch.arange(1, len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    rows_ = random_tokens(vocab, bos_token_id=0, n_samples=6, length=10, generator=generator)
    tokens = torch.cat([rows_, rows_[:, 1:]], 1)
    with torch.no_grad():
        logits = tiny(tokens)
    picked = logits[:, 11:20].gather(-1, tokens[:, 12:21, None])[..., 0]
    assert row["clean"] == pytest.approx(float(picked.mean(1).mean()), abs=1e-5)


# --- the command's own tokens -------------------------------------------------------------------


def test_tokens_mode_reads_the_next_token_where_spans_repeat(tiny, sae0, tokenizer) -> None:
    span = [5, 9, 17, 33, 41]
    tokens = torch.tensor(
        [
            [0, *span, 60, 61, *span, 62],  # repeats A B: positions 8..11 (the second 5, 9, 17, 33)
            [0, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82],  # no repeat: not counted
        ]
    )
    inputs = AnalysisInput(tiny, sae0, tokens, tokenizer=tokenizer, options={"prompts": "tokens"})
    tables = get("feature_ablation")(inputs)
    (summary,) = tables["ablation_summary"]
    assert summary["n_prompts"] == 1 and "4 positions" in summary["prompts"]
    mask = repeat_positions(inputs.corpus)
    assert mask[0].nonzero().flatten().tolist() == [8, 9, 10, 11] and not mask[1].any()
    with torch.no_grad():
        logits = tiny(tokens)
    expected = logits[0, 8:12].gather(-1, tokens[0, 9:13, None]).mean()
    assert summary["clean"] == pytest.approx(float(expected), abs=1e-5)
    assert {r["prompt"] for r in tables["ablation_prompts"]} == {0}

    at = get("feature_ablation")(
        AnalysisInput(
            tiny, sae0, tokens, tokenizer=tokenizer, options={"prompts": "tokens", "at": 3}
        )
    )["ablation_summary"][0]
    with torch.no_grad():
        expected = logits[:, 3].gather(-1, tokens[:, 4:5]).mean()
    assert at["n_prompts"] == 2 and at["clean"] == pytest.approx(float(expected), abs=1e-5)


def test_next_token_logit_is_a_metric() -> None:
    tokens = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    logits = torch.randn(2, 4, 6, requires_grad=True)
    values = next_token_logit(tokens, mask)(logits)
    assert values[0] == (logits[0, 0, 2] + logits[0, 2, 4]) / 2 and values[1] == 0
    values.sum().backward()  # differentiable: attribution patching can use it
    assert logits.grad is not None and logits.grad[0, 0, 2] == 0.5
    with pytest.raises(ValueError, match="last position"):
        next_token_logit(tokens, torch.ones_like(mask))


# --- refusals -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> tuple[Any, Any]:
    return sla.load_default_model()


def test_ioi_on_the_embedded_tokenizer_says_why_and_what_to_use(default) -> None:
    model, tokenizer = default
    sae = SAE.from_pretrained("stdlib-2l-attn-z", "blocks.1")
    inputs = AnalysisInput(model, sae, torch.zeros(1, 4, dtype=torch.long), tokenizer=tokenizer)
    for name in ("feature_ablation", "activation_patching"):
        with pytest.raises(ValueError, match="cannot make IOI prompts") as err:
            get(name)(inputs)
        message = str(err.value)
        assert "one token" in message and "prompts=repeated" in message
        assert name == "activation_patching" or "prompts=tokens" in message


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("feature_ablation", {"prompts": "mine"}, "unknown prompts 'mine'; valid"),
        ("feature_ablation", {"at": "S3"}, "at must be a word of the prompts"),
        ("feature_ablation", {"prompts": "tokens", "at": 99}, "valid: 0..6"),
        ("feature_ablation", {"prompts": "tokens", "at": "S2"}, "'induction' or a position"),
        ("feature_ablation", {"prompts": "tokens"}, "no context of the command's tokens"),
        ("activation_patching", {"prompts": "tokens"}, "needs a corrupted run"),
        ("activation_patching", {"corruptions": ["swap"]}, "unknown corruptions ['swap']"),
        ("feature_ablation", {"names": ["Mary", "Bartholomew"]}, "not one token"),
    ],
)
def test_bad_options_are_refused_with_the_choices(
    tiny, sae0, tokenizer, name, options, words
) -> None:
    with pytest.raises(ValueError) as err:
        get(name)(inputs_for(tiny, sae0, tokenizer, **options))
    assert words in str(err.value)


# --- induction_ablation on the embedded default model --------------------------------------------


@pytest.mark.slow
def test_induction_ablation_lowers_the_induced_logit_on_the_default_model(
    default, tmp_path
) -> None:
    model, tokenizer = default
    sae = SAE.from_pretrained("stdlib-2l-attn-z", "blocks.1")
    text = Path(random.__file__).read_text()
    tokens = TokenBatches.from_texts(tokenizer, [text], context_size=128, batch_size=8).tokens[:8]
    inputs = AnalysisInput(model, sae, tokens, tokenizer=tokenizer)
    tables = get("induction_ablation")(inputs)
    by_set = {r["set"]: r for r in tables["induction_ablation"]}
    assert list(by_set) == ["induction", "control", "matched", "error term"]
    induction, control, matched = by_set["induction"], by_set["control"], by_set["matched"]
    assert induction["features"] > 20 and control["features"] > 0
    assert matched["activation"] >= induction["activation"]  # matched by summed activation
    assert induction["delta_logit"] < -0.3 and induction["contexts_lower"] == 1
    assert induction["delta_logit"] < matched["delta_logit"]
    assert abs(control["delta_logit"]) < abs(induction["delta_logit"]) / 4

    # one set by hand: z' = z + decode(a') − decode(a) at the positions, SAELens's own code
    members = [r["feature"] for r in tables["induction_ablation_sets"] if r["set"] == "induction"]
    mask = repeat_positions(inputs.corpus)

    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
        _, acts = sae_lens_encode(sae, z[mask])
        edited = acts.clone()
        edited[:, members] = 0
        z = z.clone()
        z[mask] += (sae.decode(edited) - sae.decode(acts)).reshape(-1, *z.shape[2:])
        return z

    metric = next_token_logit(tokens, mask)
    with torch.no_grad():
        clean = metric(model(tokens))
        ablated = metric(model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate)]))
    assert induction["delta_logit"] == pytest.approx(float((ablated - clean).mean()), abs=1e-4)

    verdicts = {r["feature"]: "induction" for r in tables["induction_ablation_sets"]}
    rows, _ = induction_ablation(model, sae, inputs.corpus, verdicts, mask)
    assert rows[0]["features"] == len(verdicts)  # a control feature may be matched too

    written = causal_table_plots(tables, tmp_path)
    assert [p.name for p in written] == ["induction_ablation.png"]
    assert "repeated spans" in png_text(written[0])["Description"]


# --- plots and the command ----------------------------------------------------------------------


def test_plots_are_drawn_from_the_tables(tiny, sae0, tokenizer, tmp_path) -> None:
    inputs = inputs_for(tiny, sae0, tokenizer, corruptions=["flip_names", "shift_positions"])
    tables = get("feature_ablation")(inputs) | get("activation_patching")(inputs)
    written = causal_table_plots(tables, tmp_path)
    assert [p.name for p in written] == ["ablation_effects.png", "patching.png"]
    assert "error term kept" in png_text(tmp_path / "ablation_effects.png")["Description"]
    patching = png_text(tmp_path / "patching.png")
    assert patching["Title"] == "activation patching (all)"
    assert patching["Description"] == "layer 0: noising of attn_out"
    heads = get("activation_patching")(inputs_for(tiny, sae0, tokenizer, target="z"))
    (tmp_path / "heads").mkdir()
    (drawn,) = causal_table_plots(heads, tmp_path / "heads")
    assert drawn.name == "patching.png"
    assert causal_table_plots({}, tmp_path) == []


@pytest.mark.slow
def test_analyze_writes_causal_tables_and_plots(tmp_path, capsys) -> None:
    text = Path(random.__file__)
    out = tmp_path / "out"
    code = main(
        [
            "analyze", "--model", "default", "--sae", "stdlib-2l-attn-z:blocks.1",
            "--text", str(text), "--max-prompts", "4", "--analyzers",
            "activation_patching,feature_ablation", "--option", "prompts=repeated",
            "--option", "n_prompts=8", "--option", "method=attribution", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for name in ("patching.csv", "patching.png", "ablation_effects.csv", "ablation_effects.png"):
        assert (out / name).exists(), name
    code = main(
        [
            "analyze", "--model", "default", "--sae", "stdlib-2l-attn-z:blocks.1",
            "--text", str(text), "--max-prompts", "2", "--analyzers", "feature_ablation",
            "--out", str(tmp_path / "ioi"),
        ]
    )  # fmt: skip
    assert code == 1
    assert "prompts=tokens" in capsys.readouterr().err
