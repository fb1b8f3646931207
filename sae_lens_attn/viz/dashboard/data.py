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

from sae_lens_attn.analysis import DFAResult, dfa_at_peaks, head_attribution
from sae_lens_attn.analysis.attribution import encode_z, encoder_terms, sae_convention
from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite
from sae_lens_attn.validation import check_features


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
def feature_activations(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " rows ctx"],
    *,
    batch_size: int = 8,
) -> Tensor:
    """Activations of every feature ``[rows, ctx, d_sae]`` (z in the SAE's convention)."""
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    convention = sae_convention(sae, backend.native_convention)
    parts = []
    for batch in tokens.split(batch_size):
        z = backend.capture(batch, [site], convention=convention)[site.layer].z
        parts.append(encode_z(sae, z).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def collect(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " rows ctx"],
    features: Sequence[int],
    *,
    tokenizer: Any = None,
    counted: Tensor | None = None,
    acts: Tensor | None = None,
    n_contexts: int = 8,
    batch_size: int = 8,
    bins: int = 20,
) -> list[FeatureData]:
    """Dashboard data of ``features``.

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE with a linear encoder (DFA needs one).
        tokens: token ids ``[rows, ctx]``.
        features: feature indices.
        tokenizer: decodes tokens (ids are shown without one).
        counted: ``[rows, ctx]`` True where a position may be a peak and counts in the
            histogram and density (default: every position).
        acts: precomputed ``feature_activations`` (computed when not given).
        n_contexts: top contexts per feature.
        batch_size: contexts per forward pass.
        bins: histogram bins.

    Returns:
        One ``FeatureData`` per feature, in order.
    """
    chosen = check_features(features, sae.cfg.d_sae).tolist()
    if acts is None:
        acts = feature_activations(model, sae, tokens, batch_size=batch_size)
    acts = acts[..., chosen]  # (R, T, F)
    counted = torch.ones(tokens.shape, dtype=torch.bool) if counted is None else counted.cpu()
    masked = acts.masked_fill(~counted[..., None], float("-inf"))
    peak_values, peaks = masked.max(1)  # (R, F)
    shares = head_attribution(sae, model)[chosen]
    biases = encoder_terms(sae, torch.tensor(chosen), torch.float32).bias  # DFA's bias term
    out = []
    for column, feature in enumerate(chosen):
        fires = peak_values[:, column] > 0
        order = peak_values[:, column].argsort(descending=True)
        rows = order[fires[order]][:n_contexts]
        contexts: tuple[FeatureContext, ...] = ()
        if rows.numel():
            peak = dfa_at_peaks(
                model, sae, tokens[rows], [feature], peaks=peaks[rows, column : column + 1]
            )
            contexts = tuple(
                _context(tokens, acts[..., column], peak, i, int(row), tokenizer)
                for i, row in enumerate(rows.tolist())
                if peak.fired[i, 0, 0]  # the SAE's own activation at the peak: always, here
            )
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
                bias=float(biases[column]),
                contexts=contexts,
            )
        )
    return out


def _context(
    tokens: Tensor, acts: Tensor, peak: DFAResult, i: int, row: int, tokenizer: Any
) -> FeatureContext:
    position = int(peak.positions[i, 0, 0])
    ids = tokens[row, : position + 1].tolist()
    return FeatureContext(
        prompt=row,
        position=position,
        tokens=tuple(readable_token(decode_token(tokenizer, t)) for t in ids),
        activations=tuple(acts[row, : position + 1].tolist()),
        pre_act=float(peak.pre_act[i, 0, 0]),
        dfa_by_src=tuple(peak.by_src[i, 0, : position + 1, 0].tolist()),
        dfa_by_head=tuple(peak.by_head[i, 0, :, 0].tolist()),
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


def decode_token(tokenizer: Any, token: int) -> str:
    """One token as text (its id in angle brackets without a tokenizer)."""
    return f"<{token}>" if tokenizer is None else str(tokenizer.decode([token]))


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
