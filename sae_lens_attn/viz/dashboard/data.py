"""What a feature dashboard shows, computed from a model, a hook_z SAE and token ids.

For each feature: its top-activating contexts (activation per token), a histogram of its non-zero
activations, DFA at its peak in each top context (by source position and by head, from
``sla.analysis.dfa_at_peaks``), and its weight-based head attribution
(``sla.analysis.head_attribution``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from sae_lens_attn.analysis.attribution import NO_QUERY
from sae_lens_attn.analysis.dfa_peaks import PeakDFA, dfa_at_peaks
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.validation import check_count, check_features, token_texts


@dataclass(frozen=True)
class FeatureContext:
    """One context where a feature fires, with the DFA at its peak."""

    prompt: int
    """Row of the token ids."""
    position: int
    """The peak (query) position."""
    tokens: tuple[str, ...]
    """Tokens of the row up to and including the peak, decoded and with their whitespace made
    visible (``readable_token``)."""
    activations: tuple[float, ...]
    """The feature's activation at each of those tokens."""
    pre_act: float
    """Encoder pre-activation at the peak; equals ``sum(dfa_by_src) + bias``."""
    dfa_by_src: tuple[float, ...]
    """DFA of each source position (summed over heads), up to the peak."""
    dfa_by_head: tuple[float, ...]
    """DFA of each head (summed over source positions)."""

    @property
    def activation(self) -> float:
        """The activation at the peak."""
        return self.activations[self.position]


@dataclass(frozen=True)
class FeatureData:
    """Everything a dashboard shows about one feature."""

    feature: int
    """Feature index in the SAE."""
    head_shares: tuple[float, ...]
    """Head attribution: share of the decoder norm in each head (sums to 1)."""
    density: float
    """Share of counted positions where the feature is active."""
    histogram_edges: tuple[float, ...]
    """Bin edges of the non-zero activations (one more than counts; empty if it never fired)."""
    histogram_counts: tuple[int, ...]
    """Non-zero activations per bin."""
    bias: float
    """``b_enc − b_dec · W_enc``: the part of every pre-activation no source explains."""
    contexts: tuple[FeatureContext, ...]
    """Top-activating contexts, strongest first (only contexts where it fires)."""


@torch.no_grad()
def collect(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " rows ctx"] | Corpus,
    features: Sequence[int],
    *,
    tokenizer: Any = None,
    counted: Tensor | None = None,
    n_contexts: int = 8,
    batch_size: int = 8,
    bins: int = 20,
) -> list[FeatureData]:
    """Dashboard data of ``features``, from one capture and one encode of the tokens and one
    DFA kernel call for every feature's top contexts.

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE with a linear encoder (DFA needs one).
        tokens: token ids ``[rows, ctx]``, or a ``Corpus`` of them (its capture is shared).
        features: feature indices.
        tokenizer: decodes tokens (ids are shown without one).
        counted: ``[rows, ctx]`` True where a position may be a peak and counts in the
            histogram and density (default: the corpus's ``counted``: real positions that
            are not special tokens).
        n_contexts: top contexts per feature.
        batch_size: contexts per forward pass (when ``tokens`` are ids).
        bins: histogram bins.

    Returns:
        One ``FeatureData`` per feature, in order.
    """
    corpus = corpus_of(model, tokens, batch_size=batch_size)
    chosen = check_features(features, sae.cfg.d_sae).tolist()
    n_contexts = check_count("n_contexts", n_contexts)
    acts = corpus.activations(sae)[..., chosen].float().cpu()  # (R, T, F)
    counted = (corpus.counted if counted is None else counted).cpu()
    masked = acts.masked_fill(~counted[..., None], float("-inf"))
    peak_values, peaks = masked.max(1)  # (R, F)
    top = peak_values.topk(min(n_contexts, acts.shape[0]), dim=0)  # (n, F): strongest rows
    shown = torch.zeros_like(peak_values, dtype=torch.bool)
    shown.scatter_(0, top.indices, top.values > 0)  # only contexts where the feature fires
    peak = dfa_at_peaks(
        corpus.backend, sae, corpus, chosen, peaks=torch.where(shown, peaks, NO_QUERY)
    )  # every feature's contexts in one kernel call
    shares = head_attribution(sae, corpus.backend)[chosen]
    out = []
    for column, feature in enumerate(chosen):
        fires = top.values[:, column] > 0
        rows = top.indices[:, column][fires].tolist()
        values = acts[..., column][counted]
        nonzero = values[values != 0]
        edges, counts = _histogram(nonzero, bins)
        out.append(
            FeatureData(
                feature=feature,
                head_shares=tuple(shares[column].tolist()),
                density=float((values != 0).float().mean()) if values.numel() else 0.0,
                histogram_edges=edges,
                histogram_counts=counts,
                bias=float(peak.bias[column]),
                contexts=tuple(
                    _context(corpus.tokens, acts[..., column], peak, row, column, tokenizer)
                    for row in rows
                    if peak.fired[row, column]  # the SAE's own activation at the peak: always
                ),
            )
        )
    return out


def _context(
    tokens: Tensor, acts: Tensor, peak: PeakDFA, row: int, column: int, tokenizer: Any
) -> FeatureContext:
    position = int(peak.positions[row, column])
    ids = tokens[row, : position + 1].tolist()
    return FeatureContext(
        prompt=row,
        position=position,
        tokens=tuple(readable_token(text) for text in token_texts(tokenizer, ids)),
        activations=tuple(acts[row, : position + 1].tolist()),
        pre_act=float(peak.pre_act[row, column]),
        dfa_by_src=tuple(peak.by_src[row, : position + 1, column].tolist()),
        dfa_by_head=tuple(peak.by_head[row, :, column].tolist()),
    )


def _histogram(values: Tensor, bins: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    if values.numel() == 0:
        return (), ()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts = torch.histc(values.float(), bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return tuple(edges.tolist()), tuple(int(c) for c in counts.tolist())


VISIBLE_WHITESPACE = {" ": "·", "\n": "⏎\n", "\t": "→", "\r": "␍"}
"""How whitespace shows in a token: byte-level BPE tokens (GPT-2's ``Ġthe``, ``Ċ``) decode to
``" the"`` and ``"\\n"``, which a page would show as nothing or as a bare line break; a newline
keeps its line break after the mark, so code keeps its lines."""


def readable_token(text: str) -> str:
    """A decoded token as it is shown: whitespace as visible marks (``VISIBLE_WHITESPACE``),
    other unprintable characters escaped (``\\x0c``)."""
    return "".join(
        VISIBLE_WHITESPACE.get(char, char if char.isprintable() else repr(char)[1:-1])
        for char in text
    )
