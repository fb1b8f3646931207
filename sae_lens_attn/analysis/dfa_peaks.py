"""DFA at each feature's own query position per context, usually its max-activating one.

This is what feature dashboards show: for every feature and every prompt, which source positions
(and heads) drove the feature where it fired hardest. Positions differ per feature, so the
pattern rows are gathered per (prompt, feature) and values are projected onto the encoder in
feature chunks; the cost is about one ``[tokens, d_in] @ [d_in, F]`` matrix multiply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.dfa import (
    _b_enc,
    _check_sae,
    _features,
    check_tokens,
    dfa_capture,
    encode_z,
)
from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite


@dataclass(frozen=True)
class PeakDFA:
    """DFA of each feature at one query position per prompt (its peak unless given)."""

    pre_act: Float[Tensor, " batch F"]
    """Encoder pre-activation at the position."""
    bias: Float[Tensor, " F"]
    """``b_enc − b_dec · W_enc``: the part of ``pre_act`` no source explains."""
    by_src: Float[Tensor, " batch s F"]
    """Contribution of each source position, summed over heads."""
    by_head: Float[Tensor, " batch n_heads F"]
    """Contribution of each head, summed over source positions."""
    features: Int[Tensor, " F"]
    """Feature indices, in the order of the last dimension."""
    positions: Int[Tensor, " batch F"]
    """The query position of each (prompt, feature)."""
    mask: Bool[Tensor, " batch F"]
    """True where the position is a real token (not padding)."""


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
        sae: a hook_z SAE with a linear encoder.
        tokens: token ids ``[batch, pos]``.
        features: feature indices (default: all).
        peaks: the query position per (prompt, feature); default: where the feature's
            activation is largest in that prompt (padding excluded).
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
    cap = dfa_capture(backend, sae, site, tokens, attention_mask)
    assert cap.pattern is not None and cap.values is not None
    real = (
        torch.ones(tokens.shape, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    )
    if peaks is None:
        acts = encode_z(sae, cap.z)[..., feature_idx].float()
        peaks = acts.masked_fill(~real[..., None], float("-inf")).argmax(1)
    elif peaks.shape != (tokens.shape[0], feature_idx.numel()):
        raise ValueError(
            f"peaks must be [batch, F] = {[tokens.shape[0], feature_idx.numel()]}, got {list(peaks.shape)}"
        )
    elif ((peaks < 0) | (peaks >= tokens.shape[1])).any():
        raise ValueError(f"peaks must lie in 0..{tokens.shape[1] - 1}")
    result = peak_dfa(
        cap.pattern, cap.values, cap.z_flat, sae, site, feature_idx, peaks, feature_chunk
    )
    mask = real.gather(1, peaks)
    keep = mask.to(result.pre_act.dtype)
    return PeakDFA(
        pre_act=result.pre_act * keep,
        bias=result.bias,
        by_src=result.by_src * keep[:, None],
        by_head=result.by_head * keep[:, None],
        features=feature_idx,
        positions=peaks,
        mask=mask,
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
) -> PeakDFA:
    """The arithmetic of ``dfa_at_peaks`` on captured tensors (values expanded to query heads)."""
    W_enc = sae.W_enc.detach().to(values.dtype)
    b_enc = _b_enc(sae).to(values.dtype)
    b_dec = sae.b_dec.detach().to(values.dtype)
    rows = torch.arange(values.shape[0])[:, None]
    pattern_by_query = pattern.permute(0, 2, 1, 3).contiguous()  # (B, Q, H, S): rows gather fast
    values_by_head = values.permute(2, 0, 1, 3).flatten(1, 2)  # (H, B*S, D)
    parts: dict[str, list[Tensor]] = {"pre_act": [], "bias": [], "by_src": [], "by_head": []}
    for start in range(0, features.numel(), feature_chunk):
        chunk = features[start : start + feature_chunk]
        q = peaks[:, start : start + feature_chunk]  # (B, F)
        w = W_enc[:, chunk]  # (d_in, F)
        # v_h[s] · W_enc[h-block, f], one matmul per head: (H, B*S, F) -> (B, F, H, S)
        projected = torch.bmm(values_by_head, w.unflatten(0, (site.n_heads, site.d_head)))
        projected = projected.unflatten(1, (values.shape[0], values.shape[1])).permute(1, 3, 0, 2)
        rows_at_peak = pattern_by_query[rows, q]  # (B, F, H, S)
        # DFA_f[q*, h, s] for every (prompt, feature): an elementwise product, no matmul needed.
        per_head_src = rows_at_peak * projected  # (B, F, H, S)
        parts["by_src"].append(per_head_src.sum(2).transpose(1, 2))
        parts["by_head"].append(per_head_src.sum(3).transpose(1, 2))
        bias = b_enc[chunk] - b_dec @ w
        pre = (z @ w).gather(1, q[:, None, :]).squeeze(1)  # (B, F)
        parts["pre_act"].append(pre + bias)
        parts["bias"].append(bias)
    out = {name: torch.cat(tensors, dim=-1) for name, tensors in parts.items()}
    return PeakDFA(
        pre_act=out["pre_act"],
        bias=out["bias"],
        by_src=out["by_src"],
        by_head=out["by_head"],
        features=features,
        positions=peaks,
        mask=torch.ones(peaks.shape, dtype=torch.bool),
    )
