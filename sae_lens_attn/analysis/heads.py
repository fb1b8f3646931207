"""Weight-based head attribution: how much of each feature's decoder direction lives in each head."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.site import AttnSite


@torch.no_grad()
def head_attribution(sae: SAE[Any], model: Any = None) -> Float[Tensor, " d_sae n_heads"]:
    """``share[f, h] = ‖W_dec[f, h-block]‖₂ / Σ_j ‖W_dec[f, j-block]‖₂`` (DESIGN.md).

    Args:
        sae: a hook_z SAE.
        model: only needed when the SAE's metadata lacks its head structure (plain SAELens SAEs).

    Returns:
        ``[d_sae, n_heads]``, every row summing to 1 (a feature with an all-zero decoder row is
        spread evenly over the heads).

    Raises:
        ValueError: a decoder row holds NaN or infinity, which has no share per head (the message
            lists the features).
    """
    return decoder_head_shares(sae.W_dec, AttnSite.from_sae(sae, model))


@torch.no_grad()
def decoder_head_shares(
    W_dec: Float[Tensor, " d_sae d_in"], site: AttnSite
) -> Float[Tensor, " d_sae n_heads"]:
    """``head_attribution`` of a decoder ``W_dec`` on ``site``, without an SAE object.

    Raises:
        ValueError: a decoder row holds NaN or infinity (the message lists the features).
    """
    W_dec = W_dec.detach().float()
    check_finite_rows(W_dec)
    norms = W_dec.unflatten(-1, (site.n_heads, site.d_head)).norm(dim=-1)
    total = norms.sum(-1, keepdim=True)
    even = torch.full_like(norms, 1.0 / site.n_heads)
    return torch.where(total > 0, norms / total.clamp_min(torch.finfo(norms.dtype).tiny), even)


def check_finite_rows(W_dec: Float[Tensor, " d_sae d_in"]) -> None:
    """Raise ``ValueError`` if a decoder row holds NaN or infinity (naming those features)."""
    bad = (~W_dec.isfinite()).any(-1).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"W_dec rows of features {bad[:10].tolist()}{' ...' if bad.numel() > 10 else ''} "
            f"({bad.numel()} of {W_dec.shape[0]}) hold NaN or infinity: their decoder norm per "
            "head, and so their head attribution, is undefined; retrain or drop those features"
        )
