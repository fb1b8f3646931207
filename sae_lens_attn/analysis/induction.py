"""Induction scores of every attention head, on repeated uniformly random tokens.

Definition (DESIGN.md): on ``[BOS, r, r]``, with ``r`` a uniformly random token sequence of length
``n``, a head's induction score is its mean attention from each position ``i`` of the second copy
to position ``i − n + 1``: the token after the earlier occurrence of the current token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae_lens_attn.backends import backend_for
from sae_lens_attn.validation import tokenizer_of
from sae_lens_attn.validation import vocab_size as model_vocab_size


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
    if vocab.ndim != 1 or vocab.numel() == 0:
        raise ValueError(f"vocab must be a non-empty 1-d tensor of ids, got {tuple(vocab.shape)}")
    generator = torch.Generator().manual_seed(seed)
    r = vocab[torch.randint(0, vocab.numel(), (n_samples, seq_len), generator=generator)]
    bos = torch.full((n_samples, 1), bos_token_id, dtype=r.dtype)
    return torch.cat([bos, r, r], dim=1)


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
        bos_token_id: BOS id; by default the tokenizer's.
        vocab_size: ids ``0..vocab_size-1`` are candidates for ``r``; by default the model's.
        exclude_token_ids: ids never drawn; by default the tokenizer's special tokens.
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
    tokenizer = tokenizer_of(backend)
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
        if bos_token_id is None:
            raise ValueError(
                "the model has no tokenizer with a bos_token_id; pass bos_token_id= explicitly"
            )
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
        if vocab_size is None:
            vocab_size = model_vocab_size(backend)
            if vocab_size is None:
                raise ValueError(
                    f"cannot find the vocabulary size of a {type(model).__name__}; pass "
                    "vocab_size= explicitly"
                )
        if exclude_token_ids is None:
            exclude_token_ids = list(getattr(tokenizer, "all_special_ids", None) or [bos_token_id])
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[[i for i in exclude_token_ids if 0 <= i < vocab_size]] = False
        tokens = repeated_random_tokens(
            keep.nonzero().squeeze(1),
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
