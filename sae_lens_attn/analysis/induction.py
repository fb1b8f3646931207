"""Induction scores of every attention head, on repeated uniformly random tokens, and the
random-token prompts this package's induction measurements share.

Definition (DESIGN.md): on ``[BOS, r, r]``, with ``r`` a uniformly random token sequence of length
``n``, a head's induction score is its mean attention from each position ``i`` of the second copy
to position ``i − n + 1``: the token after the earlier occurrence of the current token.

Random-token prompts (``induction_scores`` here, ``long_prefix.prefix_induction`` with a span
repeated in rows of distinct tokens) are made one way. Every row starts with BOS:
``bos_token_id``, by default the tokenizer's (``bos_token_of``). Its other tokens are drawn
uniformly from the candidate ids (``random_token_vocab``): ``0..vocab_size − 1`` (by default the
model's vocabulary) without ``exclude_token_ids`` (by default the tokenizer's special tokens,
``all_special_ids``) and never BOS itself, so that BOS is only ever the first token of a row.
``random_tokens`` draws the rows from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae_lens_attn.backends import backend_for
from sae_lens_attn.validation import check_count, tokenizer_of
from sae_lens_attn.validation import vocab_size as model_vocab_size


def bos_token_of(model: Any, bos_token_id: int | None = None) -> int:
    """The BOS id random-token rows start with: ``bos_token_id``, else the model's tokenizer's.

    Raises:
        ValueError: none given and the model has no tokenizer with a ``bos_token_id``, or a given
            id below 0.
        TypeError: a given id that is not an integer.
    """
    if bos_token_id is not None:
        return check_count("bos_token_id", bos_token_id, minimum=0)
    bos = getattr(tokenizer_of(model), "bos_token_id", None)
    if bos is None:
        raise ValueError(
            "the model has no tokenizer with a bos_token_id; pass bos_token_id= explicitly"
        )
    return int(bos)


def random_token_vocab(
    model: Any,
    bos_token_id: int,
    *,
    vocab_size: int | None = None,
    exclude_token_ids: Sequence[int] | None = None,
) -> Int[Tensor, " n_candidates"]:
    """The ids random tokens are drawn from, ascending (module docstring).

    Args:
        model: any model a backend supports (or its backend).
        bos_token_id: BOS, never a candidate.
        vocab_size: ids ``0..vocab_size − 1`` are candidates; by default the model's vocabulary.
        exclude_token_ids: ids never drawn; by default the tokenizer's special tokens (none
            without a tokenizer). Ids outside the vocabulary are ignored.

    Raises:
        ValueError: the model states no vocabulary size and none is given, or one below 1.
    """
    if vocab_size is None:
        vocab_size = model_vocab_size(model)
        if vocab_size is None:
            raise ValueError(
                f"cannot find the vocabulary size of a {type(model).__name__}; pass "
                "vocab_size= explicitly"
            )
    vocab_size = check_count("vocab_size", vocab_size)
    if exclude_token_ids is None:
        exclude_token_ids = list(getattr(tokenizer_of(model), "all_special_ids", None) or [])
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in [*exclude_token_ids, bos_token_id] if 0 <= i < vocab_size]] = False
    return keep.nonzero().squeeze(1)


def random_tokens(
    vocab: Int[Tensor, " n_candidates"],
    *,
    bos_token_id: int,
    n_samples: int,
    length: int,
    generator: torch.Generator,
    distinct: bool = False,
) -> Int[Tensor, " n_samples pos"]:
    """``n_samples`` rows ``[BOS, t_1, ..., t_length]``, each ``t`` drawn uniformly from ``vocab``.

    Args:
        vocab: the candidate ids (``random_token_vocab``).
        bos_token_id: the first token of every row.
        n_samples: number of rows.
        length: random tokens per row, after BOS.
        generator: the source of randomness; it advances, so consecutive calls differ.
        distinct: draw each row's tokens without replacement (no id twice in a row) instead of
            independently.

    Returns:
        Token ids of shape ``[n_samples, length + 1]``, of ``vocab``'s dtype.

    Raises:
        ValueError: ``vocab`` is not a non-empty 1-d tensor, a count is below 1, or ``distinct``
            rows are longer than ``vocab``.
        TypeError: a count that is not an integer.
    """
    n_samples = check_count("n_samples", n_samples)
    length = check_count("length", length)
    if vocab.ndim != 1 or vocab.numel() == 0:
        raise ValueError(f"vocab must be a non-empty 1-d tensor of ids, got {tuple(vocab.shape)}")
    if distinct:
        if length > vocab.numel():
            raise ValueError(
                f"rows of {length} distinct random tokens need as many candidates, but vocab "
                f"has {vocab.numel()}"
            )
        weights = torch.ones(n_samples, vocab.numel())
        drawn = torch.multinomial(weights, length, replacement=False, generator=generator)
    else:
        drawn = torch.randint(0, vocab.numel(), (n_samples, length), generator=generator)
    r = vocab[drawn]
    bos = torch.full((n_samples, 1), bos_token_id, dtype=r.dtype)
    return torch.cat([bos, r], dim=1)


def repeated_random_tokens(
    vocab: Int[Tensor, " n_candidates"],
    *,
    bos_token_id: int,
    seq_len: int,
    n_samples: int,
    seed: int,
) -> Int[Tensor, " n_samples pos"]:
    """``n_samples`` rows ``[BOS, r, r]``, each ``r`` drawn uniformly from ``vocab`` (seeded).

    Returns:
        Token ids of shape ``[n_samples, 2 * seq_len + 1]``.
    """
    if seq_len < 1 or n_samples < 1:
        raise ValueError(f"seq_len and n_samples must be >= 1, got {seq_len} and {n_samples}")
    rows = random_tokens(
        vocab,
        bos_token_id=bos_token_id,
        n_samples=n_samples,
        length=seq_len,
        generator=torch.Generator().manual_seed(seed),
    )
    return torch.cat([rows, rows[:, 1:]], dim=1)


@torch.no_grad()
def induction_scores(
    model: Any,
    *,
    seq_len: int = 40,
    n_samples: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    bos_token_id: int | None = None,
    vocab_size: int | None = None,
    exclude_token_ids: Sequence[int] | None = None,
    sequences: Int[Tensor, " n_samples seq_len"] | None = None,
) -> Float[Tensor, " n_layers n_heads"]:
    """Induction score of every head of ``model`` (any model a backend supports).

    Args:
        model: a HookedTransformer, an nnsight-wrapped or plain Hugging Face causal LM.
        seq_len: ``n``, the length of the random sequence ``r`` (rows hold ``2n + 1`` tokens).
        n_samples: number of random rows averaged over.
        seed: seed of the token generator; the same seed gives the same rows.
        batch_size: rows per forward pass.
        bos_token_id: BOS id; by default the tokenizer's (``bos_token_of``).
        vocab_size: ids ``0..vocab_size-1`` are candidates for ``r``; by default the model's.
        exclude_token_ids: ids never drawn; by default the tokenizer's special tokens (BOS is
            never drawn; see ``random_token_vocab``).
        sequences: the sequences ``r`` to repeat instead of random ones (e.g. segments of real
            text); ``seq_len``, ``n_samples``, ``seed``, ``vocab_size`` and
            ``exclude_token_ids`` are then unused.

    Returns:
        Scores ``[n_layers, n_heads]`` in ``[0, 1]``.

    Examples:
        >>> scores = sla.analysis.induction_scores(model)
        >>> scores[1].max()   # the best layer-1 head
    """
    backend = backend_for(model)
    bos_token_id = bos_token_of(model, bos_token_id)
    if sequences is not None:
        if sequences.ndim != 2 or sequences.numel() == 0:
            raise ValueError(
                f"sequences must be a non-empty [n_samples, seq_len] tensor, got "
                f"{tuple(sequences.shape)}"
            )
        n_samples, seq_len = sequences.shape
        bos = torch.full((n_samples, 1), bos_token_id, dtype=sequences.dtype)
        tokens = torch.cat([bos, sequences, sequences], dim=1)
    else:
        vocab = random_token_vocab(
            model, bos_token_id, vocab_size=vocab_size, exclude_token_ids=exclude_token_ids
        )
        tokens = repeated_random_tokens(
            vocab,
            bos_token_id=bos_token_id,
            seq_len=seq_len,
            n_samples=n_samples,
            seed=seed,
        )
    sites = [backend.site(layer) for layer in range(backend.n_layers)]
    queries = torch.arange(seq_len + 1, 2 * seq_len + 1)  # positions i of the second copy
    total = torch.zeros(len(sites), sites[0].n_heads, dtype=torch.float64)
    for start in range(0, n_samples, batch_size):
        batch = tokens[start : start + batch_size]
        captures = backend.capture(batch, sites, pattern=True)
        for site in sites:
            pattern = captures[site.layer].pattern  # (B, H, Q, K)
            if pattern is None:
                raise RuntimeError(f"backend {backend.name} captured no pattern at {site}")
            # attention from each i of the second copy to i - n + 1
            picked = pattern[:, :, queries, queries - seq_len + 1]  # (B, H, n)
            total[site.layer] += picked.double().sum(dim=(0, 2)).cpu()
    return (total / (n_samples * seq_len)).float()
