"""Feature families: the pure classifier on synthetic DFA and logit tables, a hand-set
previous-token model with planted features, parity across backends, and the embedded model."""

from __future__ import annotations

import math
import sysconfig
from typing import Any

import pytest
import torch
import transformers
from sae_lens import SAE
from tokenizers import Tokenizer, models, pre_tokenizers

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.analysis.families import (
    FAMILIES,
    NEVER_FIRES,
    UNCLASSIFIED,
    FamilyThresholds,
    context_fits,
)
from sae_lens_attn.analysis.logits import logit_effects
from sae_lens_attn.analysis.sequences import successor_ids, successor_text

from .factories import PLANTED_N_CTX as N_CTX
from .factories import POOL, Planted, planted, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, build_twin, make_tokenizer

# --- the pure classifier on synthetic DFA results and logit tables ----------------------------

V = 30
"""Vocabulary of the synthetic contexts."""
ROW = [0, 3, 4, 9, 8, 7, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 3]
"""BOS, then 3 4 ... and 3 again at the query (position 23): 4 (position 2) follows the earlier 3
(position 1); position 13 is the farthest source inside the 10-token clause, 12 the nearest
beyond it."""
Q = 23
REPEAT = [*ROW[:22], 3, 3]
"""ROW with the query token (3) also just before the query (position 22)."""


def fits_of(
    contributions: dict[int, float],
    *,
    row: list[int] = ROW,
    query: int = Q,
    table: dict[int, float] | None = None,
    successors: dict[int, int] | None = None,
    sources: list[bool] | None = None,
    **thresholds: Any,
) -> set[str]:
    """The families one context fits, from DFA contributions by source and a logit table."""
    by_src = torch.zeros(1, len(row), 1)
    for s, value in contributions.items():
        by_src[0, s, 0] = value
    logit_z = torch.zeros(1, V)
    for token, value in (table or {}).items():
        logit_z[0, token] = value
    following = torch.full((V,), -1)
    for token, nxt in (successors or {}).items():
        following[token] = nxt
    fits = context_fits(
        torch.tensor([row]),
        torch.tensor([[query]]),
        by_src,
        logit_z,
        successors=following,
        sources=None if sources is None else torch.tensor([sources]),
        thresholds=FamilyThresholds(**thresholds),
    )[0, 0]
    return {name for name, fit in zip(FAMILIES, fits.tolist(), strict=True) if fit}


def test_each_source_family_has_its_own_test() -> None:
    assert fits_of({2: 1.0, 5: 0.1}) == {"induction"}  # token after the earlier 3, 21 back
    assert fits_of({1: 1.0}) == {"duplicate_token"}  # the earlier 3 itself, 22 back
    assert fits_of({22: 1.0}) == {"local_context"}  # previous token
    assert fits_of({23: 1.0}) == {"local_context"}  # the query itself
    # induction wins over its duplicate-token neighbour only through the top source
    assert fits_of({2: 0.5, 1: 0.6}) == {"duplicate_token"}


def test_families_that_move_a_token_need_a_source_before_the_query() -> None:
    # the query reads itself, and the token before it is the same: once induction, and copying
    # or suppression of the query token; now only local context
    assert fits_of({23: 1.0}, row=REPEAT, table={3: 5.0}) == {"local_context"}
    assert fits_of({23: 1.0}, row=REPEAT, table={3: -5.0}) == {"local_context"}
    assert fits_of({23: 1.0}, row=REPEAT, table={11: 5.0}, successors={3: 11}) == {"local_context"}
    # the same token one position earlier is a source before the query: every test applies
    assert fits_of({22: 1.0}, row=REPEAT, table={3: 5.0}) == {
        "duplicate_token",
        "copying",
        "local_context",
    }
    assert fits_of({22: 1.0}, row=REPEAT, table={3: -5.0}) == {
        "duplicate_token",
        "suppression",
        "local_context",
    }
    assert fits_of({22: 1.0}, row=REPEAT, table={11: 5.0}, successors={3: 11}) == {
        "duplicate_token",
        "successor",
        "local_context",
    }
    assert fits_of({2: 1.0}, row=REPEAT) == {"induction"}  # after the earlier 3 at 1


def test_local_context_is_a_clause() -> None:
    assert FamilyThresholds().local_window == 10
    assert fits_of({18: 1.0}) == {"local_context"}  # 5 back: beyond a 3-token window
    assert fits_of({13: 1.0}) == {"local_context"}  # 10 back: the edge of the clause
    assert fits_of({12: 1.0}) == {"long_range_context"}  # 11 back: beyond it
    assert fits_of({13: 1.0}, local_window=9) == {"long_range_context"}
    assert fits_of({12: 1.0}, local_window=11) == {"local_context"}
    assert fits_of({20: 1.0}, local_window=2) == {"long_range_context"}


def test_one_far_source_is_long_range_unless_induction_or_duplicate() -> None:
    assert fits_of({7: 1.0}) == {"long_range_context"}  # token 10, 16 back
    assert fits_of({7: 1.0, 22: 0.9}) == {"long_range_context"}  # the top source decides
    assert fits_of({7: 1.0}, table={10: 5.0}) == {"copying", "long_range_context"}
    assert fits_of({2: 1.0}) == {"induction"}  # far, but induction
    assert fits_of({1: 1.0}) == {"duplicate_token"}  # far, but an earlier copy
    # spread: a local top source holds 0.26 < 0.3, sources beyond the clause 0.74 >= 0.5
    spread = {20: 0.26, 5: 0.25, 6: 0.25, 7: 0.24}
    assert fits_of(spread) == {"local_context", "long_range_context"}
    assert fits_of(spread, spread_top_share=0.2) == {"local_context"}
    assert fits_of(spread, far_share=0.8) == {"local_context"}
    assert fits_of({20: 0.6, 5: 0.3, 6: 0.3}) == {"local_context"}  # the top one holds 0.5


def test_each_logit_family_reads_the_top_source_token() -> None:
    source = ROW[20]  # 24, at distance 3: also local
    assert fits_of({20: 1.0}, table={source: 3.5}) == {"copying", "local_context"}
    assert fits_of({20: 1.0}, table={source: 2.9}) == {"local_context"}
    assert fits_of({20: 1.0}, table={source: 2.5}, logit_z=2.0) == {"copying", "local_context"}
    assert fits_of({20: 1.0}, table={source: -3.5}) == {"suppression", "local_context"}
    assert fits_of({20: 1.0}, table={11: 4.0}, successors={source: 11}) == {
        "successor",
        "local_context",
    }
    assert fits_of({20: 1.0}, table={11: 4.0}) == {"local_context"}  # no successor table
    assert fits_of({20: 1.0}, table={12: 4.0}, successors={source: 11}) == {"local_context"}
    assert fits_of({22: -1.0, 20: 0.0}, table={source: 9.0}) == set()  # no positive source


def test_ignored_future_and_negative_sources_are_never_the_top_source() -> None:
    # BOS (position 0) drives the feature most, but is not a source: the next best one counts
    no_bos = [False] + [True] * (len(ROW) - 1)
    assert fits_of({0: 5.0, 2: 1.0}, sources=no_bos) == {"induction"}
    assert fits_of({0: 5.0, 2: 1.0}) == {"long_range_context"}  # BOS allowed: 23 back, not 3
    assert fits_of({0: 5.0}, sources=no_bos) == set()  # only BOS drives it
    not_a_query = [True] * (len(ROW) - 1) + [False]
    assert fits_of({22: 1.0}, sources=not_a_query) == set()
    assert fits_of({2: -1.0, 6: -0.5}) == set()  # nothing drives it positively
    # position 6 lies after the query (5): never a source
    row = [*ROW[:5], 3, *ROW[6:]]
    assert fits_of({2: 1.0, 6: 9.0}, row=row, query=5) == {"induction", "local_context"}


def synthetic_families(
    per_feature: list[list[dict[int, float]]], **thresholds: Any
) -> sla.analysis.FeatureFamilies:
    """``classify_families`` on features given as lists of contexts (contributions by source)."""
    n_rows = max(len(contexts) for contexts in per_feature)
    by_src = torch.zeros(n_rows, len(ROW), len(per_feature))
    valid = torch.zeros(n_rows, len(per_feature), dtype=torch.bool)
    for f, contexts in enumerate(per_feature):
        for c, contributions in enumerate(contexts):
            valid[c, f] = True
            for s, value in contributions.items():
                by_src[c, s, f] = value
    logit_z = torch.zeros(len(per_feature), V)
    logit_z[:, ROW[2]] = 5.0  # every feature copies token 4
    return sla.analysis.classify_families(
        torch.tensor([ROW] * n_rows),
        torch.full((n_rows, len(per_feature)), Q),
        by_src,
        logit_z,
        valid=valid,
        features=torch.tensor([10 + f for f in range(len(per_feature))]),
        thresholds=FamilyThresholds(**thresholds),
    )


def test_labels_follow_shares_priority_and_thresholds() -> None:
    induction, local, duplicate = {2: 1.0}, {22: 1.0}, {1: 1.0}
    result = synthetic_families(
        [
            [induction, induction, induction, local],  # induction 3/4, copying 3/4, local 1/4
            [local, local, duplicate, duplicate],  # local 1/2, duplicate 1/2: priority
            [local, duplicate, induction, {}],  # nothing reaches 1/2
            [local, local],  # too few contexts
            [],  # never fires
        ]
    )
    assert result.labels == {
        10: "induction",
        11: "duplicate_token",
        12: UNCLASSIFIED,
        13: UNCLASSIFIED,
        14: NEVER_FIRES,
    }
    assert result.contexts.tolist() == [4, 4, 4, 2, 0]
    assert result.shares["induction"][0] == 0.75 and result.shares["copying"][0] == 0.75
    assert result.shares["local_context"][1] == 0.5
    assert result.confidence(10) == 0.75 and math.isnan(result.confidence(12))
    assert all(math.isnan(float(result.shares[name][4])) for name in FAMILIES)
    assert result.counts()["unclassified"] == 2 and sum(result.counts().values()) == 5
    stricter = synthetic_families([[induction] * 3 + [local]], min_share=0.8)
    assert stricter.labels == {10: UNCLASSIFIED}
    fewer = synthetic_families([[local, local]], min_contexts=2)
    assert fewer.labels == {10: "local_context"}


def test_thresholds_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"FamilyThresholds.min_share must lie in \[0, 1\], got 1.5"
    ):
        FamilyThresholds(min_share=1.5)
    with pytest.raises(ValueError, match="logit_z must be > 0"):
        FamilyThresholds(logit_z=0)
    with pytest.raises(ValueError, match="local_window must be an integer >= 0"):
        FamilyThresholds(local_window=-1)


# --- successors ---------------------------------------------------------------------------


def test_successor_text_follows_numbers_letters_weekdays_and_months() -> None:
    cases = {
        "7": "8", " 9": " 10", "09": "10", "b": "c", " Y": " Z", "Monday": "Tuesday",
        " sunday": " monday", "Dec": "Jan", " DECEMBER": " JANUARY", "Fri": "Sat",
    }  # fmt: skip
    for text, expected in cases.items():
        assert successor_text(text) == expected, text
    for text in ("z", "Z", "dec", "sun", "self", "", "  ", "1.5", "ab"):
        assert successor_text(text) is None, text


def test_successor_ids_are_single_tokens_of_the_vocabulary() -> None:
    words = ["<bos>", "1", "2", "3", "a", "b", "Monday", "Tuesday", "Sunday", "z", "9"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<bos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>")
    table = successor_ids(tokenizer, len(words)).tolist()
    by_word = {words[i]: (words[j] if j >= 0 else None) for i, j in enumerate(table)}
    assert by_word == {
        "<bos>": None, "1": "2", "2": "3", "3": None, "a": "b", "b": None, "Monday": "Tuesday",
        "Tuesday": None, "Sunday": "Monday", "z": None, "9": None,
    }  # fmt: skip
    assert successor_ids(None, 5).tolist() == [-1] * 5


# --- planted ground truth: a hand-set previous-token model (factories.planted) --------------


@pytest.fixture(scope="module")
def plant() -> Planted:
    return planted()


def test_the_planted_heads_attend_to_the_previous_token(plant: Planted) -> None:
    _, cache = plant.model.run_with_cache(plant.tokens)
    pattern = cache["pattern", 0]  # (B, H, Q, K)
    previous = pattern[:, :, torch.arange(1, N_CTX), torch.arange(N_CTX - 1)]
    assert previous.min() > 0.99
    effects = logit_effects(plant.model, plant.sae, torch.tensor([1, 2]), standardise=True)
    assert effects[0, POOL[1]] > 4 and effects[1, POOL[2]] < -4  # the construction holds


@pytest.mark.slow
def test_planted_features_get_their_families(plant: Planted) -> None:
    result = sla.analysis.feature_families(
        plant.model, plant.sae, plant.tokens, ignore_tokens=[0], batch_size=24
    )
    assert result.labels == plant.labels
    assert result.contexts[:6].tolist() == [20] * 6 and result.contexts[6] == 0
    assert result.shares["local_context"][:6].tolist() == [1.0] * 6
    assert result.shares["copying"][1] == 1.0 and result.shares["suppression"][2] == 1.0
    assert result.shares["long_range_context"][:6].max() == 0
    # thresholds move the labels as documented: with a window of 0 the previous token lies
    # beyond the clause (and no logit effect reaches 1e3 standard deviations)
    tight = sla.analysis.feature_families(
        plant.model, plant.sae, plant.tokens, [0, 1],
        thresholds=FamilyThresholds(local_window=0, logit_z=1e3), ignore_tokens=[0],
    )  # fmt: skip
    assert tight.labels == {0: "long_range_context", 1: "long_range_context"}
    strict = sla.analysis.feature_families(
        plant.model, plant.sae, plant.tokens, [0, 1],
        thresholds=FamilyThresholds(min_contexts=21), ignore_tokens=[0],
    )  # fmt: skip
    assert strict.labels == {0: UNCLASSIFIED, 1: UNCLASSIFIED}
    few = sla.analysis.feature_families(
        plant.model, plant.sae, plant.tokens, [0], n_contexts=5, ignore_tokens=[0]
    )
    assert few.contexts.tolist() == [5]


def test_features_that_never_fire_are_reported_as_such(plant: Planted) -> None:
    # the previous token is never a planted token: no planted feature fires anywhere
    quiet = torch.full((4, N_CTX), POOL[8])
    result = sla.analysis.feature_families(plant.model, plant.sae, quiet, ignore_tokens=[0])
    assert set(result.labels.values()) == {NEVER_FIRES}
    assert result.contexts.tolist() == [0] * 7
    assert all(torch.isnan(share).all() for share in result.shares.values())
    assert result.counts()[NEVER_FIRES] == 7


def test_families_agree_across_backends() -> None:
    hf = build_hf("gpt2")
    twin = build_twin(hf, fold_value_biases=False)
    sae = random_sae(AttnSite.from_model(hf, 1), d_sae=24, value_bias_convention="included")
    tokens = torch.randint(2, VOCAB_SIZE, (12, 16), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    tokenizer = make_tokenizer(VOCAB_SIZE)
    results = [
        sla.analysis.feature_families(m, sae, tokens, tokenizer=tokenizer, n_contexts=6)
        for m in (hf, twin)
    ]
    assert results[0].labels == results[1].labels
    for name in FAMILIES:
        torch.testing.assert_close(results[0].shares[name], results[1].shares[name], equal_nan=True)
    assert results[0].contexts.sum() > 0


def test_families_on_the_bridge_equal_hf(tmp_path) -> None:
    pytest.importorskip(
        "transformer_lens.model_bridge",
        reason="TransformerBridge exists only in TransformerLens >= 3 (the new stack)",
    )
    from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
        TransformerBridge,
    )

    make_tokenizer(VOCAB_SIZE).save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=build_hf("llama"), tokenizer=tokenizer, device="cpu"
    )
    hf = build_hf("llama")
    sae = random_sae(AttnSite.from_model(hf, 1), d_sae=24, value_bias_convention="included")
    tokens = torch.randint(2, VOCAB_SIZE, (12, 16), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = 0
    results = [
        sla.analysis.feature_families(m, sae, tokens, tokenizer=tokenizer, n_contexts=6)
        for m in (hf, bridge)
    ]
    assert results[0].labels == results[1].labels
    for name in FAMILIES:
        torch.testing.assert_close(results[0].shares[name], results[1].shares[name], equal_nan=True)


def test_bad_inputs_are_refused(plant: Planted) -> None:
    with pytest.raises(TypeError, match="integer token ids"):
        sla.analysis.feature_families(plant.model, plant.sae, plant.tokens.float())
    with pytest.raises(ValueError, match="n_contexts must be an integer >= 1, got 0"):
        sla.analysis.feature_families(plant.model, plant.sae, plant.tokens, n_contexts=0)
    with pytest.raises(ValueError, match=r"feature indices \[7\] are out of range"):
        sla.analysis.feature_families(plant.model, plant.sae, plant.tokens, [7])
    with pytest.raises(ValueError, match=r"token ids \[40\] are out of range"):
        sla.analysis.feature_families(plant.model, plant.sae, torch.full((1, 4), 40))


# --- the embedded model --------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_induction_features_are_labelled_induction() -> None:
    """Layer 1's induction heads are known (induction scores 0.66–0.87): the features Kissane et
    al.'s heuristics call induction are labelled induction; layer 0, whose keys cannot see the
    token before their own, labels (almost) none."""
    from sae_lens_attn.default_model import RELEASE_NAME, corpus

    model, tokenizer = sla.load_default_model()
    split = corpus.split_corpus(sysconfig.get_paths()["stdlib"])
    rows = sla.TokenBatches.from_texts(
        tokenizer, corpus.read_texts(split.held_out), context_size=128, batch_size=48
    ).tokens[:48]
    by_layer = {
        layer: sla.analysis.feature_families(
            model, SAE.from_pretrained(RELEASE_NAME, f"blocks.{layer}"), rows
        )
        for layer in (0, 1)
    }
    # chance only (text where t[q − 2] == t[q] under a previous-token feature): a handful at most
    assert by_layer[0].counts()["induction"] <= 5
    assert float(by_layer[0].shares["induction"].nanmean()) < 0.05
    sae = SAE.from_pretrained(RELEASE_NAME, "blocks.1")
    report = sla.analysis.induction_features(model, sae, rows, head_score=0.75)
    found = [row.feature for row in report.induction_features]
    assert len(found) >= 20
    labelled = [by_layer[1].labels[f] for f in found]
    assert labelled.count("induction") >= 0.9 * len(found)
