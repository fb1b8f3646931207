"""The one induction test (``analysis.sources``) on hand-built contexts, and the induction family
and the induction behaviour heuristic agreeing on a hand-set model whose BOS drives a feature
most (a special-token source) and whose query sometimes reads itself (``s* = q``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn.analysis.sources import NO_SOURCE, follows_earlier_copy, top_source

from .hf_twins import BOS_ID, make_tokenizer

# --- the predicate on hand-built contexts -----------------------------------------------------

ROW = [BOS_ID, 7, 4, 9, 7, 7]
"""BOS, 7 4 9, then 7 twice: at the query 5, position 2 (4) follows the earlier 7 at 1."""


def passes(top: int, query: int = 5, row: list[int] = ROW) -> bool:
    return bool(
        follows_earlier_copy(torch.tensor([row]), torch.tensor([[query]]), torch.tensor([[top]]))
    )


def test_the_induction_source_follows_an_earlier_copy_of_the_query_token() -> None:
    assert passes(2)  # t[1] == t[5] == 7
    assert passes(5, query=5) is False  # s* = q: t[4] == t[5], but the query reads itself
    assert passes(5, query=5, row=[BOS_ID, 3, 3, 3, 7, 7]) is False
    assert passes(1) is False  # t[0] is BOS, never the current token
    assert passes(3) is False  # t[2] == 4, not 7
    assert passes(0) is False and passes(NO_SOURCE) is False
    assert passes(5, query=4) is False  # a source after the query


def test_the_predicate_accepts_any_trailing_context_shape() -> None:
    tokens = torch.tensor([ROW, [BOS_ID, 5, 6, 5, 6, 2]])
    query = torch.tensor([[[5, 5], [4, 4]], [[3, 4], [3, 5]]])  # (N, C, F)
    top = torch.tensor([[[2, 5], [2, 1]], [[2, 3], [1, 3]]])
    expected = torch.tensor(
        [
            [[True, False], [True, False]],  # 7 after 7; s* = q; 7 after 7; BOS before s*
            [[True, True], [False, False]],  # 5 after 5; 6 after 6; BOS before s*; 6 is not 2
        ]
    )
    assert torch.equal(follows_earlier_copy(tokens, query, top), expected)


def test_the_top_source_skips_special_tokens_future_sources_and_nothing() -> None:
    by_src = torch.tensor([[5.0, 0.2, 1.0, 0.3, 0.1, 9.0]])[..., None]  # (1, pos, 1)
    usable = torch.tensor([[False, True, True, True, True, True]])  # BOS is not
    query = torch.tensor([[4]])
    found = top_source(by_src, query, usable)
    assert found.position.tolist() == [[2]] and found.value.tolist() == [[1.0]]
    assert top_source(by_src, query).position.tolist() == [[0]]  # BOS allowed: it wins
    assert top_source(by_src, torch.tensor([[NO_SOURCE]]), usable).position.tolist() == [[-1]]
    not_a_query = torch.tensor([[True, True, True, True, False, True]])
    assert top_source(by_src, query, not_a_query).position.tolist() == [[NO_SOURCE]]
    negative = -by_src.abs()
    assert top_source(negative, query, usable).position.tolist() == [[NO_SOURCE]]
    nan = by_src.clone()
    nan[0, 2] = float("nan")
    assert top_source(nan, query, usable).position.tolist() == [[3]]
    tie = torch.tensor([[0.0, 1.0, 1.0, 0.0]])[..., None]
    assert top_source(tie, torch.tensor([[3]])).position.tolist() == [[1]]  # the earliest


# --- the family and the heuristic agree -------------------------------------------------------

V = 12
X = 5
"""The token whose value drives the feature (0.4), as BOS's does (3)."""
PLAIN = [2, 3, 4, 6, 7, 8, 9, 10, 11]
"""Tokens whose value does not drive it."""


class Construction(NamedTuple):
    model: HookedTransformer
    sae: SAE[Any]
    tokens: torch.Tensor
    passing: int
    """Rows whose context passes the induction test, by construction."""


def construction() -> Construction:
    """One head: the query at position 6 attends a third each to BOS (0), position 2 and itself;
    every other query attends only to itself. Its value is the token's value ``W_E[t, 8]`` (BOS
    3, X 0.4, the rest 0), and the one feature reads it with bias −0.5. So the feature fires at
    BOS (3 − 0.5; never a context: BOS is special) and at position 6, where BOS contributes most
    (1 against 0.13), and nowhere else (X alone: 0.4 − 0.5 < 0). Rows:

    - pass: ``[BOS, P, X, ., ., ., P, .]``: the top source other than BOS is X at 2, after the
      earlier P (the BOS-inclusive top source would be BOS: no induction);
    - fail: the same with a different token at 6;
    - self: ``[BOS, ., ., ., ., X, X, .]``: the top source is the query itself (X at 6), and
      ``t[5] == t[6]``: the test once passed it; the query now never reads itself;
    - sink only: BOS at 2 as well: the only sources that contribute are special tokens.
    """
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=8, n_heads=1, d_vocab=V, attn_only=True,
        normalization_type=None, positional_embedding_type="standard", act_fn="relu", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=make_tokenizer(V)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.W_pos[:, :8] = torch.eye(8)
        model.W_E[BOS_ID, 8] = 3.0
        model.W_E[X, 8] = 0.4
        attn: Any = model.blocks[0].attn
        attn.W_Q[0, :8, :8] = 40 * torch.eye(8)
        attn.W_K[0, :8, :8] = torch.eye(8)
        attn.W_K[0, [0, 2], 6] = 1.0  # the query at 6 also sees positions 0 and 2
        attn.W_V[0, 8, 0] = 1.0
        attn.W_O[0, 0, 9] = 1.0
        model.W_U[9] = torch.randn(V, generator=g)
    sae_cfg = StandardSAEConfig(
        d_in=8, d_sae=1, apply_b_dec_to_input=False, reshape_activations="hook_z"
    )
    sae_cfg.metadata["hook_name"] = "blocks.0.attn.hook_z"
    for key, value in {"n_heads": 1, "n_kv_heads": 1, "d_head": 8}.items():
        sae_cfg.metadata[key] = value
    sae = StandardSAE(sae_cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.b_enc[0] = -0.5
        sae.W_dec[0, 0] = 1.0
    p, q, r = PLAIN[:3]
    passing = [[BOS_ID, a, X, r, r, r, a, r] for a in (p, q, r, PLAIN[5])]
    failing = [[BOS_ID, p, X, r, r, r, q, r], [BOS_ID, q, X, p, p, p, r, p]]
    self_read = [[BOS_ID, p, q, r, p, X, X, r], [BOS_ID, q, q, q, q, X, X, q]]
    sink_only = [[BOS_ID, p, BOS_ID, r, r, r, p, r]]
    rows = torch.tensor(passing + failing + self_read + sink_only)
    return Construction(model, sae, rows, len(passing))


def test_the_induction_family_and_the_heuristic_agree() -> None:
    built = construction()
    n_rows = built.tokens.shape[0]
    z = built.model.run_with_cache(built.tokens)[1]["z", 0]  # (B, T, 1, 8)
    fires = (z[:, :, 0, 0] > 0.5).nonzero().tolist()  # the construction: BOS and position 6
    assert sorted(fires) == sorted(
        [[i, 0] for i in range(n_rows)] + [[i, 6] for i in range(n_rows)] + [[n_rows - 1, 2]]
    )

    families = sla.analysis.feature_families(
        built.model, built.sae, built.tokens, n_contexts=n_rows
    )
    report = sla.analysis.induction_features(
        built.model, built.sae, built.tokens, induction_heads=[0], max_contexts=200
    )
    (row,) = report.rows
    expected = built.passing / n_rows
    assert row.contexts == int(families.contexts[0]) == n_rows  # the same contexts: position 6
    assert row.pass_rate == pytest.approx(expected)
    assert float(families.shares["induction"][0]) == pytest.approx(expected)
