"""Induction by prefix length: how much of a repeated span a head needs before it attends.

Kissane et al. (arXiv 2406.17759, §4 and Figure 4a) separate "long-prefix" from "short-prefix"
induction heads in GPT-2 Small (5.1 vs 5.5). Their synthetic protocol, which ``prefix_induction``
follows: a row of ``seq_len`` tokens, BOS first and then distinct random tokens (the random-token
prompts of ``sae_lens_attn.analysis.induction``: the same BOS and candidate ids); a span of ``p``
tokens at ``a1`` is copied to ``a2`` (the token after the first copy, ``a1 + p``, is not part of
the copy); the head's score is its attention from the end of the second copy, ``a2 + p − 1``, to
the token after the first copy, ``a1 + p``, averaged over rows. Here ``a1`` is uniform over the
positions that leave room and ``a2`` uniform over ``a1 + p + 1 .. seq_len − p``, so rows need at
least ``2p + 2`` tokens.

On real text (``prefix_events``), an induction event is a head attending more than a threshold
from a destination ``d`` to a source ``s`` (position 0, BOS, excluded); its prefix length is the
number of tokens that match going backwards, ``tokens[d − k]`` against ``tokens[s − 1 − k]``
for ``k = 0, 1, ...`` while ``s − 1 − k ≥ 1``: 0 for attention that is not induction. Tokens
match exactly or, with ``match="fuzzy"``, up to case and one leading space. The intervention
replaces ``tokens[s − 2]`` (the first occurrence of the token before the destination) by a
random token, which cuts a prefix of 2 or more down to 1, and measures the attention again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sae_lens_attn.analysis.induction import bos_token_of, random_token_vocab, random_tokens
from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.validation import (
    as_integer,
    check_count,
    context_limit,
    token_texts,
    tokenizer_of,
)

TokenMatch = Literal["exact", "fuzzy"]
"""How tokens of a prefix are compared: equal ids, or equal text up to case and a leading space."""
TOKEN_MATCHES: tuple[TokenMatch, ...] = get_args(TokenMatch)
DEFAULT_SEQ_LEN = 128
"""Kissane et al.'s row length, used where the model's context allows it."""


@dataclass(frozen=True)
class PrefixInduction:
    """Attention from the end of a repeated span to the token after its first occurrence,
    per head and span (prefix) length, on repeated random tokens (module docstring)."""

    scores: Float[Tensor, " layers n_heads n_prefix_lengths"]
    """Mean attention over ``n_samples`` rows, in ``[0, 1]``."""
    sem: Float[Tensor, " layers n_heads n_prefix_lengths"]
    """Standard error of each mean."""
    layers: tuple[int, ...]
    """The layer of each row of ``scores``."""
    prefix_lengths: tuple[int, ...]
    """The prefix length of each column of ``scores``."""
    seq_len: int
    """Tokens per row, BOS included."""
    n_samples: int
    """Rows per prefix length."""

    def rows(self) -> list[dict[str, Any]]:
        """One record per (layer, head, prefix length)."""
        return [
            {
                "layer": layer,
                "head": head,
                "prefix_length": p,
                "score": float(self.scores[i, head, j]),
                "sem": float(self.sem[i, head, j]),
            }
            for i, layer in enumerate(self.layers)
            for head in range(self.scores.shape[1])
            for j, p in enumerate(self.prefix_lengths)
        ]


@dataclass(frozen=True)
class PrefixEvents:
    """Induction events of some heads on given tokens (module docstring), one entry per event.

    An event is one (head, prompt, destination, source) where the head attends more than
    ``threshold``; events with ``prefix_length ≥ 2`` may carry the attention after corruption.
    """

    layer: Int[Tensor, " E"]
    head: Int[Tensor, " E"]
    prompt: Int[Tensor, " E"]
    dest: Int[Tensor, " E"]
    """Destination (query) position."""
    src: Int[Tensor, " E"]
    """Source (key) position: the token after the earlier occurrence, for an induction event."""
    attention: Float[Tensor, " E"]
    """The head's attention from ``dest`` to ``src``."""
    prefix_length: Int[Tensor, " E"]
    """Matching tokens before ``src`` and up to ``dest`` (0: not an induction event)."""
    corrupted_attention: Float[Tensor, " E"]
    """Attention from ``dest`` to ``src`` with ``tokens[src − 2]`` replaced by a random token;
    NaN where no corruption was run (prefix length < 2, or beyond ``max_corrupted``)."""
    threshold: float
    """Attention above which an event counts."""
    match: TokenMatch
    """How prefix tokens were compared."""

    def prefix_counts(self, layer: int, head: int, max_length: int) -> list[int]:
        """Events of ``layer.head`` with prefix length 0, 1, ..., ``max_length`` (the last
        bucket also holds longer ones)."""
        lengths = self.prefix_length[(self.layer == layer) & (self.head == head)]
        clipped = lengths.clamp(max=max_length)
        return torch.bincount(clipped, minlength=max_length + 1).tolist()

    def corruption(self, layer: int, head: int) -> tuple[int, float, float]:
        """``(n, mean clean attention, mean corrupted attention)`` over the corrupted events
        of ``layer.head`` (NaNs when there are none)."""
        keep = (self.layer == layer) & (self.head == head) & ~self.corrupted_attention.isnan()
        n = int(keep.sum())
        if n == 0:
            return 0, float("nan"), float("nan")
        return n, float(self.attention[keep].mean()), float(self.corrupted_attention[keep].mean())


@torch.no_grad()
def prefix_induction(
    model: Any,
    layers: Sequence[int] | None = None,
    prefix_lengths: Iterable[int] = range(1, 10),
    *,
    seq_len: int | None = None,
    n_samples: int = 200,
    seed: int = 0,
    batch_size: int = 32,
    bos_token_id: int | None = None,
    vocab_size: int | None = None,
    exclude_token_ids: Sequence[int] | None = None,
) -> PrefixInduction:
    """Score against prefix length per head, on repeated random tokens (Kissane et al., §4).

    Each row is BOS followed by ``seq_len − 1`` distinct tokens drawn uniformly from the
    vocabulary (special tokens and BOS excluded, as for ``induction_scores``), in which a span of
    ``p`` tokens at ``a1`` is repeated at ``a2``; the score is the attention from ``a2 + p − 1``
    to ``a1 + p`` (module docstring). A short-prefix induction head scores high from ``p = 1``; a
    long-prefix head only once ``p`` is 2 or more.

    Args:
        model: a HookedTransformer, or a Hugging Face causal LM with eager attention (plain or
            nnsight).
        layers: layers to score (default: all).
        prefix_lengths: span lengths ``p``, each ≥ 1.
        seq_len: tokens per row, BOS included (default: 128, or the model's context if shorter).
        n_samples: rows per prefix length (Kissane et al. use 400).
        seed: seed of the rows; the same seed gives the same rows.
        batch_size: rows per forward pass.
        bos_token_id: BOS id (default: the tokenizer's; see ``induction.bos_token_of``).
        vocab_size: ids ``0..vocab_size-1`` are candidates (default: the model's vocabulary).
        exclude_token_ids: ids never drawn (default: the tokenizer's special tokens; BOS is never
            drawn; see ``induction.random_token_vocab``).

    Returns:
        A ``PrefixInduction`` with ``scores [len(layers), n_heads, len(prefix_lengths)]``.

    Raises:
        ValueError: a prefix length that does not fit the rows or the model's context, layers
            out of range, or a vocabulary too small for rows of distinct tokens.

    Examples:
        >>> result = sla.analysis.prefix_induction(model, layers=[1])
        >>> result.scores[0, :, 0]   # every layer-1 head at prefix length 1
    """
    backend = backend_for(model)
    sites = [backend.site(layer) for layer in _layers(layers, backend)]
    lengths = _prefix_lengths(prefix_lengths)
    seq_len = _seq_len(model, seq_len, max(lengths))
    n_samples = check_count("n_samples", n_samples)
    batch_size = check_count("batch_size", batch_size)
    bos = bos_token_of(model, bos_token_id)
    candidates = random_token_vocab(
        model, bos, vocab_size=vocab_size, exclude_token_ids=exclude_token_ids
    )
    if candidates.numel() < seq_len - 1:
        raise ValueError(
            f"rows of {seq_len} tokens need {seq_len - 1} distinct candidate tokens after BOS, "
            f"but the vocabulary offers {candidates.numel()}: pass a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    picked = torch.zeros(len(sites), sites[0].n_heads, len(lengths), n_samples, dtype=torch.float64)
    for j, p in enumerate(lengths):
        tokens, dest, src = _repeated_spans(candidates, bos, seq_len, p, n_samples, generator)
        for start in range(0, n_samples, batch_size):
            rows = slice(start, start + batch_size)
            captures = backend.capture(tokens[rows], sites, pattern=True)
            for i, site in enumerate(sites):
                pattern = _pattern(captures[site.layer].pattern, backend, site.layer)
                index = torch.arange(pattern.shape[0])
                # (B, H): attention from each row's destination to its source
                at = pattern[index, :, dest[rows], src[rows]]
                picked[i, :, j, rows] = at.double().cpu().T
    sem = picked.std(-1) / n_samples**0.5 if n_samples > 1 else torch.zeros_like(picked[..., 0])
    return PrefixInduction(
        scores=picked.mean(-1).float(),
        sem=sem.float(),
        layers=tuple(site.layer for site in sites),
        prefix_lengths=tuple(lengths),
        seq_len=seq_len,
        n_samples=n_samples,
    )


def _repeated_spans(
    candidates: Int[Tensor, " V"],
    bos: int,
    seq_len: int,
    p: int,
    n_samples: int,
    generator: torch.Generator,
) -> tuple[Int[Tensor, "n seq_len"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Rows of distinct tokens with a span of ``p`` repeated, and each row's (dest, src)."""
    tokens = random_tokens(
        candidates,
        bos_token_id=bos,
        n_samples=n_samples,
        length=seq_len - 1,
        generator=generator,
        distinct=True,
    )
    # a1 in 1..seq_len-2p-1, then a2 in a1+p+1..seq_len-p (uniform, inclusive)
    a1 = 1 + (torch.rand(n_samples, generator=generator) * (seq_len - 2 * p - 1)).long()
    room = seq_len - 2 * p - a1  # number of valid a2 values
    a2 = a1 + p + 1 + (torch.rand(n_samples, generator=generator) * room).long()
    offsets = torch.arange(p)
    rows = torch.arange(n_samples)[:, None]
    tokens[rows, a2[:, None] + offsets] = tokens[rows, a1[:, None] + offsets]
    return tokens, a2 + p - 1, a1 + p


@torch.no_grad()
def prefix_events(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Corpus,
    layers: Sequence[int] | None = None,
    *,
    threshold: float = 0.3,
    match: TokenMatch = "exact",
    max_corrupted: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    tokenizer: Any = None,
) -> PrefixEvents:
    """Induction events on real tokens, their prefix lengths, and the corruption test.

    Every (head, prompt, destination, source ≥ 1) with attention above ``threshold`` is an
    event; its prefix length counts matching tokens backwards from the destination and from the
    token before the source (module docstring). Up to ``max_corrupted`` events per head with a
    prefix of 2 or more (a seeded random subset) are rerun with ``tokens[src − 2]`` replaced by
    a random non-matching token: a long-prefix head's attention drops, a short-prefix head's
    does not.

    Args:
        model: a HookedTransformer, or a Hugging Face causal LM with eager attention.
        tokens: token ids ``[batch, pos]``, or a ``Corpus`` of them (its capture is shared).
        layers: layers whose heads are examined (default: all).
        threshold: attention above which an event counts (Kissane et al. use 0.3).
        match: ``"exact"`` ids, or ``"fuzzy"``: the same text up to case and a leading space.
        max_corrupted: corrupted reruns per head at most (0: none).
        seed: seed of the corrupted subset and the replacement tokens.
        batch_size: rows per forward pass.
        tokenizer: for ``match="fuzzy"`` (default: the model's).

    Returns:
        A ``PrefixEvents``, one entry per event.

    Raises:
        ValueError: bad tokens, threshold, match, or ``"fuzzy"`` without a tokenizer.
    """
    corpus = corpus_of(model, tokens, batch_size=check_count("batch_size", batch_size))
    backend, tokens = corpus.backend, corpus.tokens
    sites = [backend.site(layer) for layer in _layers(layers, backend)]
    if not 0 <= float(threshold) < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if match not in TOKEN_MATCHES:
        raise ValueError(f"unknown match {match!r}; valid: {list(TOKEN_MATCHES)}")
    max_corrupted = check_count("max_corrupted", max_corrupted, minimum=0)
    batch_size = check_count("batch_size", batch_size)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
    classes = token_classes(tokens, match, tokenizer)
    found: list[Tensor] = []
    attention: list[Tensor] = []
    captures = corpus.capture_many(sites, backend.native_convention, pattern=True)
    for start in range(0, tokens.shape[0], batch_size):
        for site in sites:
            rows = captures[site.layer].pattern[start : start + batch_size]  # type: ignore[index]
            pattern = _pattern(rows, backend, site.layer).float().cpu()
            above = pattern > threshold
            above[..., 0] = False  # BOS
            b, h, d, s = above.nonzero(as_tuple=True)
            found.append(torch.stack([torch.full_like(b, site.layer), h, b + start, d, s], 1))
            attention.append(pattern[b, h, d, s])
    events = torch.cat(found) if found else torch.zeros(0, 5, dtype=torch.long)
    layer, head, prompt, dest, src = events.unbind(1)
    lengths = prefix_lengths_of(classes, prompt, dest, src)
    attn = torch.cat(attention) if attention else torch.zeros(0)
    corrupted = _corrupted_attention(
        backend, tokens, classes, events, lengths, max_corrupted, seed, batch_size
    )
    return PrefixEvents(
        layer=layer,
        head=head,
        prompt=prompt,
        dest=dest,
        src=src,
        attention=attn,
        prefix_length=lengths,
        corrupted_attention=corrupted,
        threshold=float(threshold),
        match=match,
    )


def token_classes(tokens: Tensor, match: TokenMatch, tokenizer: Any) -> Int[Tensor, "batch pos"]:
    """Ids such that two tokens match under ``match`` exactly when their ids are equal."""
    if match == "exact":
        return tokens
    if tokenizer is None:
        raise ValueError(
            "match='fuzzy' compares token text and needs a tokenizer; pass tokenizer= or use "
            "match='exact'"
        )
    unique = tokens.unique()
    keys = [text.removeprefix(" ").casefold() for text in token_texts(tokenizer, unique.tolist())]
    class_of = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    lookup = torch.zeros(int(unique.max()) + 1, dtype=torch.long)
    lookup[unique] = torch.tensor([class_of[key] for key in keys])
    return lookup[tokens]


def prefix_lengths_of(
    classes: Int[Tensor, "batch pos"],
    prompt: Int[Tensor, " E"],
    dest: Int[Tensor, " E"],
    src: Int[Tensor, " E"],
) -> Int[Tensor, " E"]:
    """For each event, the largest ``n`` with ``classes[dest − k] == classes[src − 1 − k]`` for
    every ``k < n`` and ``src − 1 − k ≥ 1`` (position 0, BOS, never matches)."""
    length = torch.zeros_like(dest)
    alive: Bool[Tensor, " E"] = torch.ones_like(dest, dtype=torch.bool)
    k = 0
    while bool(alive.any()):
        earlier = src - 1 - k
        alive &= earlier >= 1
        later = (dest - k).clamp(min=0)
        alive &= classes[prompt, later] == classes[prompt, earlier.clamp(min=0)]
        length += alive.long()
        k += 1
    return length


def _corrupted_attention(
    backend: AttnBackend,
    tokens: Tensor,
    classes: Tensor,
    events: Int[Tensor, "E 5"],
    lengths: Tensor,
    max_corrupted: int,
    seed: int,
    batch_size: int,
) -> Float[Tensor, " E"]:
    out = torch.full((events.shape[0],), float("nan"))
    if max_corrupted == 0 or events.shape[0] == 0:
        return out
    generator = torch.Generator().manual_seed(seed)
    chosen: list[Tensor] = []
    eligible = lengths >= 2
    for layer_id, head_id in events[eligible][:, :2].unique(dim=0).tolist():
        mine = (eligible & (events[:, 0] == layer_id) & (events[:, 1] == head_id)).nonzero()[:, 0]
        order = torch.randperm(mine.numel(), generator=generator)[:max_corrupted]
        chosen.append(mine[order])
    if not chosen:
        return out
    index = torch.cat(chosen)
    layer, head, prompt, dest, src = events[index].unbind(1)
    rows = tokens[prompt].clone()
    replacement = _replacement(tokens, classes, prompt, dest, generator)
    rows[torch.arange(index.numel()), src - 2] = replacement
    sites = [backend.site(int(each)) for each in layer.unique()]
    for start in range(0, index.numel(), batch_size):
        part = slice(start, start + batch_size)
        captures = backend.capture(rows[part], sites, pattern=True)
        n = rows[part].shape[0]
        for site in sites:
            pattern = _pattern(captures[site.layer].pattern, backend, site.layer).float().cpu()
            mine = layer[part] == site.layer
            picked = pattern[torch.arange(n), head[part], dest[part], src[part]]
            out[index[part][mine]] = picked[mine]
    return out


def _replacement(
    tokens: Tensor, classes: Tensor, prompt: Tensor, dest: Tensor, generator: torch.Generator
) -> Tensor:
    """Random ids among those in ``tokens`` whose class differs from the token before each
    destination, so that the corrupted prefix has length 1."""
    pool = tokens.unique()
    class_of = torch.zeros(int(pool.max()) + 1, dtype=torch.long)
    class_of[tokens.flatten()] = classes.flatten()
    pool_classes = class_of[pool]
    picks = torch.empty_like(dest)
    for i, avoid in enumerate(classes[prompt, dest - 1].tolist()):
        allowed = pool[pool_classes != avoid]
        if allowed.numel() == 0:
            raise ValueError("every token of the batch matches; there is nothing to corrupt with")
        picks[i] = allowed[torch.randint(0, allowed.numel(), (1,), generator=generator)]
    return picks


def _layers(layers: Sequence[int] | None, backend: AttnBackend) -> list[int]:
    if layers is None:
        return list(range(backend.n_layers))
    given = [as_integer(layer) for layer in layers]
    if not given or any(layer is None for layer in given):
        raise ValueError(
            f"layers must be a non-empty list of layer indices in 0..{backend.n_layers - 1}, "
            f"got {list(layers)!r}"
        )
    for layer in given:
        backend.site(layer)  # type: ignore[arg-type]  # raises on a layer out of range
    return [int(layer) for layer in given]  # type: ignore[arg-type]


def _prefix_lengths(prefix_lengths: Iterable[int]) -> list[int]:
    given = list(prefix_lengths)
    lengths = [as_integer(p) for p in given]
    if not lengths or any(p is None or p < 1 for p in lengths):
        raise ValueError(f"prefix_lengths must be integers >= 1, got {given!r}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"prefix_lengths must not repeat, got {given!r}")
    return [int(p) for p in lengths]  # type: ignore[arg-type]


def _seq_len(model: Any, seq_len: int | None, longest: int) -> int:
    limit = context_limit(model)
    if seq_len is None:
        seq_len = DEFAULT_SEQ_LEN if limit is None else min(DEFAULT_SEQ_LEN, limit)
    seq_len = check_count("seq_len", seq_len, minimum=4)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context of {limit} positions; use at most {limit}"
        )
    needed = 2 * longest + 2
    if needed > seq_len:
        raise ValueError(
            f"prefix length {longest} does not fit: a row needs 2p + 2 = {needed} tokens (BOS, "
            f"the span, the token after it, the repeated span) but rows have {seq_len}"
            + ("" if limit is None else f" (the model's context is {limit})")
            + f"; valid prefix lengths: 1..{(seq_len - 2) // 2}"
        )
    return seq_len


def _pattern(pattern: Tensor | None, backend: AttnBackend, layer: int) -> Tensor:
    if pattern is None:
        raise RuntimeError(
            f"backend {backend.name} captured no attention pattern at layer {layer}: Hugging Face "
            "models need eager attention (attn_implementation='eager')"
        )
    return pattern
