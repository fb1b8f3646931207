"""Prefix-length induction on planted ground truth: a hand-built model with a short-prefix
induction head, a long-prefix one and a random one; the real-data variant against brute force."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn.analysis.long_prefix import prefix_events, prefix_induction, token_classes

from .hf_twins import build_hf, build_twin

V, CTX = 40, 24
"""Vocabulary (id 0 is BOS) and context of the planted model."""
SHARP = 20.0
"""Logit of one matching feature: attention is close to all-or-nothing."""


def planted_model() -> HookedTransformer:
    """Two attention-only layers with one-hot residual subspaces:

    layer 0 — head 0 writes the previous token, head 1 the token two back;
    layer 1 — head 0 (short prefix) attends where the previous token equals the current one;
    head 1 (long prefix) needs that and the token before to match as well (a BOS sink at 1.5
    beats a single match); head 2 has small random weights.
    """
    tok, pos, prev, prev2 = 0, V, V + CTX, 2 * V + CTX
    d_model, d_head = 3 * V + CTX, 2 * V + 1
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        n_ctx=CTX,
        d_head=d_head,
        n_heads=3,
        d_vocab=V,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="standard",
        seed=0,
    )
    model = HookedTransformer(cfg)
    q = SHARP * d_head**0.5  # TransformerLens divides scores by sqrt(d_head)
    sink = 2 * V  # the head dimension every query reads as a constant and only BOS keys fill
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.embed.W_E[:, tok:V] = torch.eye(V)
        model.pos_embed.W_pos[:, pos : pos + CTX] = torch.eye(CTX)
        a0: Any = model.blocks[0].attn
        a1: Any = model.blocks[1].attn
        for head, (back, out) in enumerate([(1, prev), (2, prev2)]):
            for i in range(CTX):  # query i reads key i - back
                a0.W_Q[head, pos + i, i] = q
                if i + back < CTX:
                    a0.W_K[head, pos + i, i + back] = 1.0
            a0.W_V[head, tok:V, :V] = torch.eye(V)
            a0.W_O[head, :V, out : out + V] = torch.eye(V)
        for head, threshold in enumerate([0.5, 1.5]):
            a1.W_Q[head, tok:V, :V] = q * torch.eye(V)  # current token ...
            a1.W_K[head, prev : prev + V, :V] = torch.eye(V)  # ... = previous token at s
            a1.W_Q[head, pos : pos + CTX, sink] = q
            a1.W_K[head, pos, sink] = threshold
        a1.W_Q[1, prev : prev + V, V : 2 * V] = q * torch.eye(V)  # and the token before
        a1.W_K[1, prev2 : prev2 + V, V : 2 * V] = torch.eye(V)
        generator = torch.Generator().manual_seed(0)
        for weight in (a1.W_Q, a1.W_K):
            weight[2] = 0.3 * torch.randn(weight[2].shape, generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def planted() -> HookedTransformer:
    return planted_model()


@pytest.mark.slow
def test_planted_heads_show_their_prefix_curves(planted) -> None:
    result = prefix_induction(
        planted, prefix_lengths=range(1, 6), n_samples=32, bos_token_id=0, exclude_token_ids=[0]
    )
    assert result.scores.shape == (2, 3, 5) and result.layers == (0, 1)
    assert result.prefix_lengths == (1, 2, 3, 4, 5) and result.seq_len == CTX
    short, long, random = result.scores[1]
    assert bool((short > 0.95).all())  # fires from one matching token on
    assert float(long[0]) < 0.05 and bool((long[1:] > 0.95).all())  # needs two
    assert bool((random < 0.3).all())
    # layer 0 looks one and two tokens back: it reaches the source only where the copies are
    # adjacent (a2 = a1 + p + 1, for p = 1 and 2), never for longer prefixes
    assert bool((result.scores[0, :2, 2:] < 0.01).all())
    assert bool((result.scores[0] < 0.35).all())
    assert len(result.rows()) == 2 * 3 * 5


def test_same_seed_same_scores_and_layer_selection(planted) -> None:
    kwargs: dict[str, Any] = {"n_samples": 8, "bos_token_id": 0, "prefix_lengths": [1, 3]}
    first = prefix_induction(planted, layers=[1], **kwargs)
    again = prefix_induction(planted, layers=[1], **kwargs)
    torch.testing.assert_close(first.scores, again.scores)
    assert first.scores.shape == (1, 3, 2) and first.layers == (1,)


def brute_force_events(
    model: HookedTransformer, tokens: torch.Tensor, threshold: float, same: Any
) -> dict[tuple[int, int, int, int, int], int]:
    """(layer, head, prompt, dest, src) → prefix length, by loops over the cached patterns."""
    _, cache = model.run_with_cache(tokens)
    found = {}
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]
        for b in range(tokens.shape[0]):
            for h in range(model.cfg.n_heads):
                for d in range(tokens.shape[1]):
                    for s in range(1, d + 1):
                        if pattern[b, h, d, s] <= threshold:
                            continue
                        n = 0
                        while s - 1 - n >= 1 and same(tokens[b, d - n], tokens[b, s - 1 - n]):
                            n += 1
                        found[layer, h, b, d, s] = n
    return found


def repeated_text(n_rows: int, seed: int) -> torch.Tensor:
    """BOS, then tokens from a small vocabulary (accidental matches) with a span repeated."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 12, (n_rows, CTX), generator=generator)
    rows[:, 0] = 0
    for row in rows:
        start, length = int(torch.randint(1, 8, (1,), generator=generator)), 5
        row[start + 11 : start + 11 + length] = row[start : start + length]
    return rows


def test_real_data_events_match_a_brute_force_count(planted) -> None:
    tokens = repeated_text(6, seed=1)
    events = prefix_events(planted, tokens, threshold=0.3, max_corrupted=0)
    expected = brute_force_events(planted, tokens, 0.3, lambda a, b: int(a) == int(b))
    got = {
        tuple(key): int(n)
        for *key, n in zip(
            events.layer.tolist(),
            events.head.tolist(),
            events.prompt.tolist(),
            events.dest.tolist(),
            events.src.tolist(),
            events.prefix_length.tolist(),
            strict=True,
        )
    }
    assert got == expected
    assert max(expected.values()) >= 4  # the planted spans are found
    lengths = [n for (layer, head, *_), n in expected.items() if (layer, head) == (1, 1)]
    counts = events.prefix_counts(1, 1, max_length=5)
    assert counts == [sum(min(n, 5) == k for n in lengths) for k in range(6)]
    assert bool(events.corrupted_attention.isnan().all())


def test_corrupting_the_token_before_the_prefix_separates_long_from_short(planted) -> None:
    tokens = repeated_text(8, seed=2)
    events = prefix_events(planted, tokens, layers=[1], threshold=0.5, max_corrupted=20)
    n_long, clean_long, corrupted_long = events.corruption(1, 1)
    n_short, clean_short, corrupted_short = events.corruption(1, 0)
    assert n_long > 5 and n_short > 5
    assert clean_long > 0.9 and corrupted_long < 0.1  # the long-prefix head needs two tokens
    assert clean_short > 0.9 and corrupted_short > 0.3  # one still suffices for the other
    done = ~events.corrupted_attention.isnan()
    assert bool((events.prefix_length[done] >= 2).all())


class CaseTokenizer:
    """decode: ids to text with case and leading-space variants of a few words."""

    words = ("<bos>", "Foo", " foo", "foo", "bar", " Bar", "baz", "FOO")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids)


def test_fuzzy_matching_ignores_case_and_one_leading_space() -> None:
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    classes = token_classes(tokens, "fuzzy", CaseTokenizer())[0].tolist()
    words = CaseTokenizer.words
    for i in range(8):
        for j in range(8):
            same = words[i].removeprefix(" ").lower() == words[j].removeprefix(" ").lower()
            assert (classes[i] == classes[j]) == same
    assert token_classes(tokens, "exact", None) is tokens


def test_hugging_face_and_transformer_lens_twin_agree() -> None:
    hf = build_hf("gpt2")  # eager attention
    twin = build_twin(hf)
    kwargs: dict[str, Any] = {
        "prefix_lengths": [1, 2, 4],
        "n_samples": 6,
        "bos_token_id": 0,
        "exclude_token_ids": [0, 1],  # the twin carries a tokenizer, the HF model none
    }
    hf_result = prefix_induction(hf, **kwargs)
    tl_result = prefix_induction(twin, **kwargs)
    assert hf_result.seq_len == 32  # the context of the tiny models
    torch.testing.assert_close(hf_result.scores, tl_result.scores, atol=1e-5, rtol=1e-4)


def test_bad_input(planted) -> None:
    kwargs: dict[str, Any] = {"bos_token_id": 0, "n_samples": 2}
    with pytest.raises(
        ValueError, match=r"prefix length 12 does not fit.*2p \+ 2 = 26.*rows have 24"
    ):
        prefix_induction(planted, prefix_lengths=[1, 12], **kwargs)
    with pytest.raises(ValueError, match=r"valid prefix lengths: 1\.\.11"):
        prefix_induction(planted, prefix_lengths=[30], **kwargs)
    with pytest.raises(ValueError, match=r"seq_len=30 exceeds the model's context of 24"):
        prefix_induction(planted, prefix_lengths=[1], seq_len=30, **kwargs)
    with pytest.raises(ValueError, match=r"prefix_lengths must be integers >= 1"):
        prefix_induction(planted, prefix_lengths=[0, 1], **kwargs)
    with pytest.raises(ValueError, match=r"must not repeat"):
        prefix_induction(planted, prefix_lengths=[2, 2], **kwargs)
    with pytest.raises(ValueError, match=r"layer"):
        prefix_induction(planted, layers=[2], **kwargs)
    with pytest.raises(ValueError, match=r"distinct candidate tokens"):
        prefix_induction(planted, exclude_token_ids=list(range(30)), **kwargs)
    with pytest.raises(ValueError, match=r"pass bos_token_id"):
        prefix_induction(planted, n_samples=2)  # no tokenizer
    tokens = repeated_text(2, seed=0)
    with pytest.raises(ValueError, match=r"needs a tokenizer"):
        prefix_events(planted, tokens, match="fuzzy")
    with pytest.raises(ValueError, match=r"unknown match 'loose'; valid: \['exact', 'fuzzy'\]"):
        prefix_events(planted, tokens, match="loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        prefix_events(planted, tokens, threshold=1.5)


def test_exported_from_the_package() -> None:
    assert sla.analysis.prefix_induction is prefix_induction
    assert sla.analysis.rdfa.__name__ == "rdfa"


@pytest.mark.slow
def test_analyzer_tables_and_plots(planted, tmp_path) -> None:
    from sae_lens_attn import AttnSite
    from sae_lens_attn.analysis import AnalysisInput
    from sae_lens_attn.viz.induction_plots import (
        induction_table_plots,
        prefix_corruption_png,
        prefix_counts_png,
        prefix_curves_png,
    )

    from .factories import random_sae

    tokens = repeated_text(4, seed=3)
    options = {
        "bos_token_id": 0,
        "n_samples": 16,
        "prefix_lengths": [1, 2, 3],
        "layers": [1],
        "threshold": 0.5,
        "max_length": 4,
    }
    inputs = AnalysisInput(
        planted, random_sae(AttnSite.from_model(planted, 1)), tokens, options=options
    )
    tables = sla.analysis.get("prefix_induction")(inputs)
    assert len(tables["prefix_scores"]) == 3 * 3
    long_head = [r["score"] for r in tables["prefix_scores"] if r["head"] == 1]
    assert long_head[0] < 0.05 and min(long_head[1:]) > 0.95
    events = prefix_events(planted, tokens, layers=[1], threshold=0.5)
    for row in tables["prefix_events"]:
        counts = events.prefix_counts(row["layer"], row["head"], 4)
        assert row["events"] == counts[row["prefix_length"]]
    corruption = {r["head"]: r for r in tables["prefix_corruption"]}
    assert corruption[1]["corrupted"] < 0.1 < 0.9 < corruption[1]["clean"]
    written = induction_table_plots(tables, tmp_path)
    assert sorted(p.name for p in written) == [
        "prefix_corruption.png", "prefix_events.png", "prefix_scores.png",
    ]  # fmt: skip
    result = prefix_induction(planted, prefix_lengths=[1, 2], n_samples=4, bos_token_id=0)
    for draw, source in (
        (prefix_curves_png, result),
        (prefix_counts_png, events),
        (prefix_corruption_png, events),
    ):
        path = draw(source, tmp_path / f"{draw.__name__}.png")  # type: ignore[operator]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
