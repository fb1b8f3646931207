"""DFA at each feature's own query position per prompt, usually its max-activating one.

This is what feature dashboards show: for every feature and every prompt, which source positions
(and heads) drove the feature where it fired hardest. It is the DFA kernel (``attribute``) with
one query per (prompt, feature), returned as a ``PeakDFA`` (one entry per prompt and feature).
Besides the kernel it costs the corpus's one capture and one encode (shared with everything else
that reads the same ``Corpus``). A feature that never fires in a prompt has no peak there: its
entry has position −1, ``fired`` False and NaN values, never an attribution at some position it
did not fire at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import (
    NO_QUERY,
    DFAResult,
    attribute,
    dfa_capture,
    kernel_inputs,
)
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.validation import check_count, check_features


@dataclass(frozen=True)
class PeakDFA:
    """DFA of each feature at one query position per prompt (``dfa_at_peaks``).

    Entry ``[prompt, feature]`` stands for the query ``positions[prompt, feature]``: the
    feature's peak in that prompt, −1 where it never fires there (NaN values, ``fired`` and
    ``mask`` False); entries at padded positions are zero with ``mask`` False.
    """

    features: Int[Tensor, " F"]
    """The feature indices, in the order of the last dimension."""
    positions: Int[Tensor, " batch F"]
    """The query position of each entry (−1 where there is none)."""
    pre_act: Float[Tensor, " batch F"]
    """Encoder pre-activation there (SAELens's ``hook_sae_acts_pre``)."""
    bias: Float[Tensor, " F"]
    """``c_f``: the part of ``pre_act`` no source explains (``DFAResult.bias``)."""
    by_src: Float[Tensor, " batch s F"]
    """Contribution of each source position, summed over heads; ``by_src.sum(1) + bias ==
    pre_act`` where ``mask``."""
    by_head: Float[Tensor, " batch n_heads F"]
    """Contribution of each head, summed over source positions."""
    acts: Float[Tensor, " batch F"]
    """The SAE's own activation at the query."""
    fired: Bool[Tensor, " batch F"]
    """True where that activation is positive."""
    mask: Bool[Tensor, " batch F"]
    """True where the entry is attributed: a real (non-padding) query position."""
    activation_scale: Float[Tensor, " F"]
    """``DFAResult.activation_scale``."""
    input_scale: Float[Tensor, " batch F"]
    """``DFAResult.input_scale`` at the query."""

    @classmethod
    def from_kernel(cls, result: DFAResult) -> PeakDFA:
        """The kernel's result with its one query per entry (``q`` = 1) taken out."""
        return cls(
            features=result.features,
            positions=result.positions[:, 0],
            pre_act=result.pre_act[:, 0],
            bias=result.bias,
            by_src=result.by_src[:, 0],
            by_head=result.by_head[:, 0],
            acts=result.acts[:, 0],
            fired=result.fired[:, 0],
            mask=result.mask[:, 0],
            activation_scale=result.activation_scale,
            input_scale=result.input_scale[:, 0],
        )


@torch.no_grad()
def dfa_at_peaks(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    features: Int[Tensor, " F"] | list[int] | None = None,
    *,
    peaks: Int[Tensor, " batch F"] | None = None,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    feature_chunk: int = 256,
) -> PeakDFA:
    """DFA of every feature at its max-activating position in each prompt (or at ``peaks``).

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE that ``sla.analysis.dfa`` accepts (same flags, same kernel).
        tokens: token ids ``[batch, pos]``, or a ``Corpus`` (its capture and encode are shared).
        features: feature indices (default: all).
        peaks: the query position per (prompt, feature), −1 for none (nothing attributed);
            default: where the feature's activation is largest in that prompt (padding
            excluded), and none where it never fires there.
        attention_mask: 0 at padding; padding is never attributed.
        feature_chunk: (query, feature) entries of a prompt computed at once.

    Returns:
        A ``PeakDFA``: ``by_src`` is ``[batch, s, F]``; ``by_src.sum(1) + bias`` equals
        ``pre_act`` wherever ``mask`` is True.

    Examples:
        >>> peak = sla.analysis.dfa_at_peaks(model, sae, tokens, features=[12])
        >>> peak.positions[:, 0], peak.fired[:, 0]   # each prompt's peak, and if it fired
    """
    corpus = corpus_of(model, tokens, attention_mask)
    feature_idx = check_features(features, sae.cfg.d_sae)
    feature_chunk = check_count("feature_chunk", feature_chunk)
    _check_peaks(peaks, corpus.tokens, feature_idx)
    site, capture = dfa_capture(corpus, sae)
    acts = corpus.activations(sae)[..., feature_idx.to(capture.z.device)]  # (B, T, F)
    real = corpus.real.to(acts.device)
    if peaks is None:
        peaks = peak_positions(acts, real)
    query = peaks.to(acts.device)[:, None, :]  # one query per (prompt, feature)
    result = attribute(
        *kernel_inputs(capture),
        sae,
        site,
        feature_idx,
        query,
        acts=acts,
        real=real,
        feature_chunk=feature_chunk,
    )
    return PeakDFA.from_kernel(result)


def peak_positions(
    acts: Float[Tensor, " batch pos F"], real: Bool[Tensor, " batch pos"]
) -> Int[Tensor, " batch F"]:
    """Each (prompt, feature)'s max-activating real position; −1 where it never fires."""
    by_act = acts.float().masked_fill(~real[..., None], float("-inf")).max(1)
    return torch.where(by_act.values > 0, by_act.indices, NO_QUERY)


def _check_peaks(peaks: Tensor | None, tokens: Tensor, features: Tensor) -> None:
    if peaks is None:
        return
    expected = [tokens.shape[0], features.numel()]
    if not isinstance(peaks, Tensor) or list(peaks.shape) != expected:
        shape = list(peaks.shape) if isinstance(peaks, Tensor) else type(peaks).__name__
        raise ValueError(
            f"peaks must be a [batch, F] = {expected} tensor of query positions, got {shape}"
        )
    if peaks.dtype.is_floating_point or peaks.dtype == torch.bool:
        raise TypeError(f"peaks must hold integer positions, got dtype {peaks.dtype}")
    bad = peaks[(peaks < NO_QUERY) | (peaks >= tokens.shape[1])]
    if bad.numel():
        raise ValueError(
            f"peaks {bad.unique()[:10].tolist()} are out of range: peaks must lie in "
            f"0..{tokens.shape[1] - 1} for {tokens.shape[1]} tokens, or be {NO_QUERY} (none)"
        )
