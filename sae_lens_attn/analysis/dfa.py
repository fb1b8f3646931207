"""Direct feature attribution (DFA): a feature's pre-activation split over source positions and heads.

For layer L, query q, source s, head h and feature f (DESIGN.md):

    DFA_f[q, h, s] = A_h[q, s] · (v_h[s] · W_enc[h-block, f])
    c_f            = b_enc[f] − b_dec · W_enc[:, f]
    Σ_{h,s} DFA_f[q, h, s] + c_f = pre_f[q]

Values are projected onto the encoder first (``[batch, s, n_heads, F]``), features in chunks, so
nothing of shape ``[batch, q, s, n_heads*d_head]`` is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.backends import AttnBackend, AttnCapture, backend_for
from sae_lens_attn.site import AttnSite, ValueBiasConvention

LINEAR_ENCODER_ARCHITECTURES = ("standard", "topk", "jumprelu")
"""Inference architectures whose pre-activation is ``(z − b_dec) W_enc + b_enc`` (BatchTopK is
saved as JumpReLU)."""


@dataclass(frozen=True)
class DFAResult:
    """DFA of some features at some query positions of a token batch.

    ``q`` indexes the requested positions (all positions when none were given); entries at padded
    query positions are zero and ``mask`` is False there.
    """

    pre_act: Float[Tensor, " batch q F"]
    """Encoder pre-activation of each feature, computed from z directly."""
    bias: Float[Tensor, " F"]
    """``c_f = b_enc[f] − b_dec · W_enc[:, f]``: the part of ``pre_act`` no source explains."""
    by_src: Float[Tensor, " batch q s F"]
    """Contribution of each source position, summed over heads."""
    by_head: Float[Tensor, " batch q n_heads F"]
    """Contribution of each head, summed over source positions."""
    features: Int[Tensor, " F"]
    """The feature indices, in the order of the last dimension."""
    positions: Int[Tensor, " batch q"]
    """The query position each ``q`` index stands for."""
    mask: Bool[Tensor, " batch q"]
    """True at real (non-padding) query positions."""


@torch.no_grad()
def dfa(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"],
    features: Int[Tensor, " F"] | list[int] | None = None,
    positions: Int[Tensor, " batch"] | Int[Tensor, " batch q"] | None = None,
    *,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    feature_chunk: int = 1024,
) -> DFAResult:
    """DFA by source position and by head for a hook_z SAE, on either backend.

    Args:
        model: a ``HookedTransformer``, a Hugging Face causal LM (plain or nnsight), or a backend.
        sae: a SAELens SAE on this model's hook_z, of a linear-encoder architecture
            (standard, TopK, BatchTopK saved as JumpReLU, JumpReLU).
        tokens: token ids.
        features: feature indices (default: all).
        positions: query positions per row, ``[batch]`` or ``[batch, q]`` (default: all).
        attention_mask: 0 at padding; padding is never attributed.
        feature_chunk: features computed at once; bounds memory for large dictionaries.

    Returns:
        A ``DFAResult`` whose ``by_src.sum(2) + bias`` equals ``pre_act``.

    Example:
        >>> acts = sla.analysis.dfa(model, sae, tokens, features=[12, 99], positions=peaks)
        >>> acts.by_src[0, 0, :, 0]   # how much each source position drove feature 12
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    _check_sae(sae)
    feature_idx = _features(features, sae.cfg.d_sae)
    query = _positions(positions, tokens)
    mask = _query_mask(attention_mask, tokens, query)

    capture = dfa_capture(backend, sae, site, tokens, attention_mask)
    assert capture.pattern is not None and capture.values is not None
    batch_rows = torch.arange(tokens.shape[0])[:, None]
    pattern = capture.pattern.permute(0, 2, 1, 3)[batch_rows, query]  # (B, Q, H, S)
    z = capture.z_flat[batch_rows, query]  # (B, Q, d_in)
    values = capture.values  # (B, S, H, D)

    W_enc = sae.W_enc.detach().to(values.dtype)
    b_enc = _b_enc(sae).to(values.dtype)
    b_dec = sae.b_dec.detach().to(values.dtype)
    pieces: dict[str, list[Tensor]] = {"pre_act": [], "bias": [], "by_src": [], "by_head": []}
    for chunk in feature_idx.split(feature_chunk):
        w = W_enc[:, chunk]  # (d_in, F)
        bias = b_enc[chunk] - b_dec @ w
        projected = torch.einsum(
            "bshd,hdf->bshf", values, w.unflatten(0, (site.n_heads, site.d_head))
        )
        pieces["by_src"].append(torch.einsum("bqhs,bshf->bqsf", pattern, projected))
        pieces["by_head"].append(torch.einsum("bqhs,bshf->bqhf", pattern, projected))
        pieces["pre_act"].append(z @ w + bias)
        pieces["bias"].append(bias)
    out = {name: torch.cat(parts, dim=-1) for name, parts in pieces.items()}
    keep = mask[..., None].to(values.dtype)
    return DFAResult(
        pre_act=out["pre_act"] * keep,
        bias=out["bias"],
        by_src=out["by_src"] * keep[..., None],
        by_head=out["by_head"] * keep[..., None],
        features=feature_idx,
        positions=query,
        mask=mask,
    )


def dfa_capture(
    backend: AttnBackend,
    sae: SAE[Any],
    site: AttnSite,
    tokens: Int[Tensor, " batch pos"],
    attention_mask: Int[Tensor, " batch pos"] | None = None,
) -> AttnCapture:
    """z, patterns and values for DFA: in the SAE's value-bias convention, with no attention
    to padded source positions."""
    capture = backend.capture(
        tokens,
        [site],
        pattern=True,
        values=True,
        convention=sae_convention(sae, backend.native_convention),
        attention_mask=attention_mask,
    )[site.layer]
    if attention_mask is not None and capture.pattern is not None:
        keep = attention_mask[:, None, None, :].to(capture.pattern.dtype)
        capture = capture._replace(pattern=capture.pattern * keep)
    return capture


def check_tokens(tokens: Tensor) -> None:
    """Raise ``ValueError`` unless ``tokens`` is a non-empty ``[batch, pos]`` tensor."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}"
        )


def encode_z(
    sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"]
) -> Float[Tensor, " *batch d_sae"]:
    """Feature activations of z, whether or not the SAE reshapes hook_z itself."""
    reshapes = getattr(sae, "hook_z_reshaping_mode", False)
    return sae.encode((z if reshapes else z.flatten(-2)).to(sae.dtype))


def sae_convention(sae: SAE[Any], default: ValueBiasConvention) -> ValueBiasConvention:
    """The value-bias convention an SAE was trained on (its metadata, else ``default``)."""
    return sae.cfg.metadata.get("value_bias_convention", None) or default


def _check_sae(sae: SAE[Any]) -> None:
    architecture = sae.cfg.architecture()
    if architecture not in LINEAR_ENCODER_ARCHITECTURES:
        raise ValueError(
            f"DFA needs a linear encoder pre-activation; SAE architecture {architecture!r} is not "
            f"supported (supported: {list(LINEAR_ENCODER_ARCHITECTURES)})"
        )
    if sae.cfg.normalize_activations != "none":
        raise ValueError(
            f"DFA needs normalize_activations='none' (fold any scaling into the weights first), "
            f"got {sae.cfg.normalize_activations!r}"
        )


def _b_enc(sae: SAE[Any]) -> Tensor:
    b_enc = getattr(sae, "b_enc", None)
    return torch.zeros(sae.cfg.d_sae) if b_enc is None else b_enc.detach()


def _features(features: Tensor | list[int] | None, d_sae: int) -> Tensor:
    if features is None:
        return torch.arange(d_sae)
    idx = torch.as_tensor(features, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError("features is empty: give at least one feature index, or None for all")
    bad = idx[(idx < 0) | (idx >= d_sae)]
    if bad.numel():
        raise ValueError(
            f"feature indices {bad.tolist()} are out of range: the SAE has d_sae={d_sae} (valid: 0..{d_sae - 1})"
        )
    return idx


def _positions(positions: Tensor | None, tokens: Tensor) -> Tensor:
    check_tokens(tokens)
    batch, n_pos = tokens.shape
    if positions is None:
        return torch.arange(n_pos).expand(batch, n_pos)
    query = torch.as_tensor(positions, dtype=torch.long)
    query = query[:, None] if query.ndim == 1 else query
    if query.ndim != 2 or query.shape[0] != batch:
        raise ValueError(
            f"positions must be [batch] or [batch, q] with batch={batch}, got shape {tuple(query.shape)}"
        )
    bad = query[(query < 0) | (query >= n_pos)]
    if bad.numel():
        raise ValueError(
            f"positions {bad.tolist()} are out of range for {n_pos} tokens (valid: 0..{n_pos - 1})"
        )
    return query


def _query_mask(attention_mask: Tensor | None, tokens: Tensor, query: Tensor) -> Tensor:
    if attention_mask is None:
        return torch.ones(query.shape, dtype=torch.bool)
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens {tuple(tokens.shape)}"
        )
    return attention_mask.bool().gather(1, query)
