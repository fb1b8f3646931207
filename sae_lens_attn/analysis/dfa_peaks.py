"""DFA at each feature's own query position per context, usually its max-activating one.

This is what feature dashboards show: for every feature and every prompt, which source positions
(and heads) drove the feature where it fired hardest. Positions differ per feature, so the DFA
kernel (``dfa.attribute``) gathers the pattern rows per (prompt, feature); the cost is about one
``[tokens, d_in] @ [d_in, F]`` matrix multiply, plus one pass of the SAE's ``encode`` to find
the peaks. Every SAE flag ``dfa`` supports is supported here, by the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import (
    _check_sae,
    _features,
    _zero_unless,
    attribute,
    check_device,
    check_tokens,
    compute_dtype,
    dfa_capture,
    encoder_terms,
    feature_acts,
    pre_activation,
)
from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite


@dataclass(frozen=True)
class PeakDFA:
    """DFA of each feature at one query position per prompt (its peak unless given)."""

    pre_act: Float[Tensor, " batch F"]
    """Encoder pre-activation at the position (SAELens's ``hook_sae_acts_pre``)."""
    bias: Float[Tensor, " F"]
    """``b_enc − b_dec · W_enc`` (no b_dec term when the SAE does not subtract it from its
    input): the part of ``pre_act`` no source explains."""
    by_src: Float[Tensor, " batch s F"]
    """Contribution of each source position, summed over heads."""
    by_head: Float[Tensor, " batch n_heads F"]
    """Contribution of each head, summed over source positions."""
    features: Int[Tensor, " F"]
    """Feature indices, in the order of the last dimension."""
    positions: Int[Tensor, " batch F"]
    """The query position of each (prompt, feature): where its activation is largest, or, for a
    feature that never fires in the prompt (``fired`` False), where its pre-activation is."""
    mask: Bool[Tensor, " batch F"]
    """True where the position is a real token (not padding)."""
    acts: Float[Tensor, " batch F"]
    """The SAE's own feature activation at the position (its ``encode``)."""
    fired: Bool[Tensor, " batch F"]
    """True where that activation is positive; False where the feature does not fire there
    (by default: nowhere in the prompt)."""
    activation_scale: Float[Tensor, " F"]
    """``DFAResult.activation_scale``: a firing TopK feature's activation is ``scale · pre_act``."""
    input_scale: Float[Tensor, " batch F"]
    """The per-token factor of the SAE's input normalisation at the position (1 without one)."""


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
) -> PeakDFA:
    """DFA of every feature at its max-activating position in each prompt (or at ``peaks``).

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE that ``sla.analysis.dfa`` accepts (same flags, same kernel).
        tokens: token ids ``[batch, pos]``.
        features: feature indices (default: all).
        peaks: the query position per (prompt, feature); default: where the feature's
            activation is largest in that prompt (padding excluded), and where its pre-activation
            is largest if it never fires there (``fired`` says which).
        attention_mask: 0 at padding; padding is never attributed.
        feature_chunk: features computed at once.

    Returns:
        A ``PeakDFA`` whose ``by_src.sum(1) + bias`` equals ``pre_act``.
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    _check_sae(sae)
    feature_idx = _features(features, sae.cfg.d_sae)
    check_tokens(tokens)
    _check_peaks(peaks, tokens, feature_idx)
    cap = dfa_capture(backend, sae, site, tokens, attention_mask)
    assert cap.pattern is not None and cap.values is not None
    check_device(sae, cap.z)
    acts = feature_acts(sae, cap.z, feature_idx)  # (B, T, F)
    real = (
        torch.ones(tokens.shape, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    ).to(acts.device)
    if peaks is None:
        peaks = _default_peaks(acts, _pre_acts(sae, cap.z_flat, feature_idx), real)
    return peak_dfa(
        cap.pattern,
        cap.values,
        cap.z_flat,
        sae,
        site,
        feature_idx,
        peaks,
        feature_chunk,
        acts=acts,
        real=real,
    )


def peak_dfa(
    pattern: Float[Tensor, " batch n_heads q s"],
    values: Float[Tensor, " batch s n_heads d_head"],
    z: Float[Tensor, " batch q d_in"],
    sae: SAE[Any],
    site: AttnSite,
    features: Int[Tensor, " F"],
    peaks: Int[Tensor, " batch F"],
    feature_chunk: int = 256,
    *,
    acts: Float[Tensor, " batch q F"] | None = None,
    real: Bool[Tensor, " batch q"] | None = None,
) -> PeakDFA:
    """``dfa_at_peaks`` on captured tensors (values expanded to query heads, z flattened).

    ``acts`` (the SAE's activations of ``features`` at every position) are computed with the
    SAE's ``encode`` when not given; ``real`` (True at non-padding positions) defaults to all.
    """
    peaks = peaks.to(z.device)
    out = attribute(
        pattern, values, z, sae, site, features, peaks[:, None, :], feature_chunk=feature_chunk
    )
    if acts is None:
        acts = feature_acts(sae, z.unflatten(-1, (site.n_heads, site.d_head)), features)
    real = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if real is None else real
    at_peak = acts.gather(1, peaks[:, None, :]).squeeze(1).to(out.pre_act.dtype)  # (B, F)
    mask = real.to(z.device).gather(1, peaks)
    keep = mask[:, None]
    return PeakDFA(
        pre_act=_zero_unless(mask, out.pre_act[:, 0]),
        bias=out.bias,
        by_src=_zero_unless(keep, out.by_src[:, 0]),
        by_head=_zero_unless(keep, out.by_head[:, 0]),
        features=features,
        positions=peaks,
        mask=mask,
        acts=_zero_unless(mask, at_peak),
        fired=mask & (at_peak > 0),
        activation_scale=out.activation_scale,
        input_scale=out.input_scale.gather(1, peaks),
    )


def _pre_acts(
    sae: SAE[Any], z: Float[Tensor, " batch pos d_in"], features: Int[Tensor, " F"]
) -> Float[Tensor, " batch pos F"]:
    """Pre-activations of ``features`` at every position, as the DFA kernel computes them."""
    terms = encoder_terms(sae, features, compute_dtype(z, sae.W_enc))
    z = z.to(terms.weight.dtype)
    return pre_activation(terms, z, terms.normalisation.scale(z))


def _default_peaks(
    acts: Float[Tensor, " batch pos F"],
    pre_acts: Float[Tensor, " batch pos F"],
    real: Bool[Tensor, " batch pos"],
) -> Int[Tensor, " batch F"]:
    """Each (prompt, feature)'s max-activating real position, or its max pre-activation one
    where the feature never fires in the prompt."""
    padding = ~real[..., None]
    by_act = acts.float().masked_fill(padding, float("-inf")).max(1)
    by_pre = pre_acts.float().masked_fill(padding, float("-inf")).argmax(1)
    return torch.where(by_act.values > 0, by_act.indices, by_pre)


def _check_peaks(peaks: Tensor | None, tokens: Tensor, features: Tensor) -> None:
    if peaks is None:
        return
    if peaks.shape != (tokens.shape[0], features.numel()):
        raise ValueError(
            f"peaks must be [batch, F] = {[tokens.shape[0], features.numel()]}, got {list(peaks.shape)}"
        )
    if ((peaks < 0) | (peaks >= tokens.shape[1])).any():
        raise ValueError(f"peaks must lie in 0..{tokens.shape[1] - 1}")
