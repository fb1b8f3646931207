"""DFA at each feature's own query position per prompt, usually its max-activating one.

This is what feature dashboards show: for every feature and every prompt, which source positions
(and heads) drove the feature where it fired hardest. It is the DFA kernel (``attribute``) with
one query per (prompt, feature), returning the same ``DFAResult`` as ``dfa`` with ``q`` = 1.
Besides the kernel it costs one pass of the SAE's ``encode`` to find the peaks. A feature that
never fires in a prompt has no peak there: its entry has position −1, ``fired`` False and NaN
values, never an attribution at some position it did not fire at.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import (
    NO_QUERY,
    DFAResult,
    _check_sae,
    attribute,
    dfa_capture,
    feature_acts,
    kernel_inputs,
    real_positions,
)
from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite
from sae_lens_attn.validation import check_count, check_features, check_tokens


@torch.no_grad()
def dfa_at_peaks(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"],
    features: Int[Tensor, " F"] | list[int] | None = None,
    *,
    peaks: Int[Tensor, " batch F"] | None = None,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    feature_chunk: int = 256,
) -> DFAResult:
    """DFA of every feature at its max-activating position in each prompt (or at ``peaks``).

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE that ``sla.analysis.dfa`` accepts (same flags, same kernel).
        tokens: token ids ``[batch, pos]``.
        features: feature indices (default: all).
        peaks: the query position per (prompt, feature); default: where the feature's
            activation is largest in that prompt (padding excluded), and none (−1) where it
            never fires there.
        attention_mask: 0 at padding; padding is never attributed.
        feature_chunk: (query, feature) entries of a prompt computed at once.

    Returns:
        A ``DFAResult`` with ``q`` = 1: ``result.by_src[:, 0]`` is ``[batch, s, F]``;
        ``by_src.sum(2) + bias`` equals ``pre_act`` wherever ``mask`` is True.

    Examples:
        >>> peak = sla.analysis.dfa_at_peaks(model, sae, tokens, features=[12])
        >>> peak.positions[:, 0, 0], peak.fired[:, 0, 0]   # each prompt's peak, and if it fired
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    _check_sae(sae)
    tokens = check_tokens(tokens, backend)
    feature_idx = check_features(features, sae.cfg.d_sae)
    feature_chunk = check_count("feature_chunk", feature_chunk)
    _check_peaks(peaks, tokens, feature_idx)
    real = real_positions(attention_mask, tokens)
    capture = dfa_capture(backend, sae, site, tokens, attention_mask)
    acts = feature_acts(sae, capture.z, feature_idx)  # (B, T, F)
    real = real.to(acts.device)
    if peaks is None:
        peaks = peak_positions(acts, real)
    query = peaks.to(acts.device)[:, None, :]  # one query per (prompt, feature)
    return attribute(
        *kernel_inputs(capture),
        sae,
        site,
        feature_idx,
        query,
        acts=acts,
        real=real,
        feature_chunk=feature_chunk,
    )


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
    bad = peaks[(peaks < 0) | (peaks >= tokens.shape[1])]
    if bad.numel():
        raise ValueError(
            f"peaks {bad.unique()[:10].tolist()} are out of range: peaks must lie in "
            f"0..{tokens.shape[1] - 1} for {tokens.shape[1]} tokens"
        )
