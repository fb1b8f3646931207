"""One random-token setup: induction scores and prefix induction draw their rows the same way
(BOS first and only there, the same candidate ids), and draw the same numbers as before."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sae_lens_attn as sla
from sae_lens_attn.analysis.induction import (
    bos_token_of,
    random_token_vocab,
    random_tokens,
    repeated_random_tokens,
)
from sae_lens_attn.analysis.long_prefix import prefix_induction

from .hf_twins import VOCAB_SIZE, build_hf, build_twin

BOS = 0
SPECIAL = (0, 1)
"""BOS and the other special token of the twins' tokenizer."""


@pytest.fixture(scope="module")
def twin() -> Any:
    model = build_twin(build_hf("gpt2"), fold_value_biases=False)
    assert model.tokenizer is not None
    assert sorted(model.tokenizer.all_special_ids) == list(SPECIAL)
    assert model.tokenizer.bos_token_id == BOS
    return model


def captured_rows(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every batch of tokens the model's backend captures from, while the test holds it."""
    backend = sla.backend_for(model)
    seen: list[torch.Tensor] = []
    capture = backend.capture

    def spy(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tokens.clone())
        return capture(tokens, *args, **kwargs)

    monkeypatch.setattr(backend, "capture", spy)
    return seen


def test_the_vocabulary_leaves_out_special_tokens_and_bos(twin) -> None:
    expected = torch.tensor([i for i in range(VOCAB_SIZE) if i not in SPECIAL])
    torch.testing.assert_close(random_token_vocab(twin, BOS), expected)
    # given exclusions replace the special tokens, and BOS stays out all the same
    given = random_token_vocab(twin, 5, vocab_size=10, exclude_token_ids=[3, 99])
    assert given.tolist() == [0, 1, 2, 4, 6, 7, 8, 9]
    assert bos_token_of(twin) == BOS and bos_token_of(twin, 7) == 7
    hf_model = build_hf("gpt2")  # no tokenizer: no BOS, no special tokens
    with pytest.raises(ValueError, match=r"no tokenizer with a bos_token_id; pass bos_token_id="):
        bos_token_of(hf_model)
    with pytest.raises(ValueError, match=r"bos_token_id must be an integer >= 0, got -1"):
        bos_token_of(twin, -1)
    assert random_token_vocab(hf_model, 3).tolist() == [i for i in range(VOCAB_SIZE) if i != 3]


def test_rows_are_bos_then_draws_from_the_vocabulary() -> None:
    vocab = torch.tensor([3, 5, 8, 13, 21, 34])
    generator = torch.Generator().manual_seed(4)
    rows = random_tokens(vocab, bos_token_id=1, n_samples=50, length=6, generator=generator)
    assert rows.shape == (50, 7) and bool((rows[:, 0] == 1).all())
    assert bool(torch.isin(rows[:, 1:], vocab).all())
    assert any(len(set(row)) < 6 for row in rows[:, 1:].tolist())  # independent: repeats occur
    distinct = random_tokens(
        vocab, bos_token_id=1, n_samples=50, length=6, generator=generator, distinct=True
    )
    assert all(sorted(row) == vocab.tolist() for row in distinct[:, 1:].tolist())
    with pytest.raises(ValueError, match=r"rows of 7 distinct random tokens need as many"):
        random_tokens(
            vocab, bos_token_id=1, n_samples=2, length=7, generator=generator, distinct=True
        )
    with pytest.raises(ValueError, match=r"non-empty 1-d tensor"):
        random_tokens(torch.zeros(0, dtype=torch.long), bos_token_id=1, n_samples=2, length=3,
                      generator=generator)  # fmt: skip


def test_repeated_random_tokens_draw_what_a_seeded_randint_draws() -> None:
    vocab = torch.arange(2, 50)
    tokens = repeated_random_tokens(vocab, bos_token_id=0, seq_len=9, n_samples=4, seed=11)
    r = vocab[torch.randint(0, 48, (4, 9), generator=torch.Generator().manual_seed(11))]
    torch.testing.assert_close(tokens, torch.cat([torch.zeros(4, 1, dtype=torch.long), r, r], 1))
    with pytest.raises(ValueError, match=r"seq_len and n_samples must be >= 1, got 0 and 4"):
        repeated_random_tokens(vocab, bos_token_id=0, seq_len=0, n_samples=4, seed=11)


def test_both_analyses_draw_from_the_one_setup(twin, monkeypatch) -> None:
    seen = captured_rows(twin, monkeypatch)
    vocab = random_token_vocab(twin, BOS)
    sla.analysis.induction_scores(twin, seq_len=6, n_samples=5, seed=3, batch_size=5)
    induction_rows = torch.cat(seen)
    torch.testing.assert_close(
        induction_rows,
        repeated_random_tokens(vocab, bos_token_id=BOS, seq_len=6, n_samples=5, seed=3),
    )
    seen.clear()
    prefix_induction(twin, layers=[1], prefix_lengths=[2], seq_len=12, n_samples=6, seed=5)
    prefix_rows = torch.cat(seen)
    for rows in (induction_rows, prefix_rows):
        assert bool((rows[:, 0] == BOS).all())
        assert bool(torch.isin(rows[:, 1:], vocab).all())  # no BOS, no special token after it
    # the prefix rows are what the protocol drew before the setup was shared: distinct tokens
    # from a multinomial over the vocabulary, then one span of 2 copied from a1 to a2
    generator = torch.Generator().manual_seed(5)
    drawn = torch.multinomial(torch.ones(6, vocab.numel()), 11, replacement=False,
                              generator=generator)  # fmt: skip
    expected = torch.cat([torch.full((6, 1), BOS), vocab[drawn]], dim=1)
    a1 = 1 + (torch.rand(6, generator=generator) * (12 - 2 * 2 - 1)).long()
    a2 = a1 + 2 + 1 + (torch.rand(6, generator=generator) * (12 - 2 * 2 - a1)).long()
    for row in range(6):
        expected[row, a2[row] : a2[row] + 2] = expected[row, a1[row] : a1[row] + 2]
    torch.testing.assert_close(prefix_rows, expected)
