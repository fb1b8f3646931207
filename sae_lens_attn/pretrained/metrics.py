"""The metrics a published attention SAE reports, measured on tokens or given by the publisher.

Definitions (as SAELens's ``run_evals`` computes the first two, so the numbers written to a
release's ``l0`` and ``variance_explained`` are the ones SAELens's benchmark checks):

- ``l0``: mean over tokens of the number of non-zero features.
- ``explained_variance``: ``1 − E‖z − ẑ‖² / (E‖z‖² − ‖E z‖²)`` over all tokens, z flattened.
- ``ce_loss_recovered``: ``(CE_abl − CE_sae) / (CE_abl − CE_clean)``, the reconstruction spliced
  at every position and, for CE_abl, z set to zero (in the SAE's value-bias convention), as in
  Kissane et al.; CE is the mean next-token loss over all positions.
- ``dead_pct``: percentage of features never active on the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite

REPORTED_METRICS = ("l0", "ce_loss_recovered", "dead_pct", "explained_variance")
"""Metric names of the model card's table, and the keys a caller's metrics mapping may use."""

LOG_SPARSITY_EPS = 1e-10
"""SAELens's ``sparsity.safetensors`` holds ``log10(feature density + 1e-10)``."""


@dataclass(frozen=True)
class SAEMetrics:
    """Quality numbers of one SAE; ``None`` where nothing was measured or given."""

    l0: float | None = None
    """Mean number of active features per token."""
    ce_loss_recovered: float | None = None
    """Fraction of the zero-ablation CE increase the reconstruction recovers."""
    dead_pct: float | None = None
    """Percentage of features never active on the evaluation tokens."""
    explained_variance: float | None = None
    """Explained variance of the reconstruction of z (SAELens's definition)."""
    n_tokens: int | None = None
    """Number of tokens measured on; ``None`` for numbers given by the publisher."""
    source: str = "given by the publisher"
    """Where the numbers come from, as shown on the model card."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, sae_id: str = "") -> SAEMetrics:
        """Numbers given by the publisher, keyed by names in ``REPORTED_METRICS``.

        Raises:
            ValueError: an unknown name (the message lists the valid ones) or a non-finite value.
        """
        unknown = sorted(set(values) - set(REPORTED_METRICS))
        if unknown:
            raise ValueError(
                f"unknown metrics {unknown} for SAE {sae_id!r}; valid: {list(REPORTED_METRICS)}"
            )
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"metric {name!r} of SAE {sae_id!r} must be a finite number, got {value!r}"
                )
            checked[name] = float(value)
        return cls(**checked)

    def as_dict(self) -> dict[str, float | None]:
        """The reported metrics by name (``None`` where unknown)."""
        return {name: getattr(self, name) for name in REPORTED_METRICS}


class Measurement(NamedTuple):
    """Metrics and feature densities of one SAE measured on tokens."""

    metrics: SAEMetrics
    """The measured metrics."""
    log_sparsity: Float[Tensor, " d_sae"]
    """``log10(feature density + 1e-10)``, SAELens's ``sparsity.safetensors`` content."""


@torch.no_grad()
def measure(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " batch pos"],
    *,
    exclude_tokens: Sequence[int] = (),
    batch_size: int = 8,
) -> Measurement:
    """Measure an attention SAE on ``tokens`` run through ``model``.

    Args:
        model: any model a backend supports (HookedTransformer, ...).
        sae: a SAELens SAE on a hook_z site of ``model``.
        tokens: token ids, one row per context.
        exclude_tokens: token ids (BOS, EOS, padding) left out of l0, explained variance and
            densities, as SAELens's evals leave out special tokens.
        batch_size: contexts per forward pass.

    Returns:
        The metrics and the log10 feature densities.
    """
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(
            f"expected tokens [batch, pos] with at least one token, got {tuple(tokens.shape)}"
        )
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, model)
    convention = sae.cfg.metadata.get("value_bias_convention") or "included"
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae, dtype=torch.float64)
    active_total = 0.0
    n_kept = 0
    sum_z = torch.zeros(site.d_in, dtype=torch.float64)
    sum_sq = sum_residual = 0.0
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_predictions = 0
    excluded = torch.tensor(list(exclude_tokens), dtype=tokens.dtype)

    def reconstruct(z: Tensor) -> Tensor:
        return sae.decode(sae.encode(z)).to(z.dtype)

    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        z = backend.capture(batch, [site], convention=convention)[site.layer].z  # (B, T, H, D)
        acts = sae.encode(z)  # (B, T, F)
        z_hat = sae.decode(acts).reshape(z.shape)
        keep = ~torch.isin(batch, excluded)  # (B, T)
        acts, x, x_hat = acts[keep], z.flatten(-2)[keep].double(), z_hat.flatten(-2)[keep].double()
        active = acts != 0
        active_total += active.sum().item()
        fired += active.sum(0).double().cpu()
        n_kept += x.shape[0]
        sum_z += x.sum(0).cpu()
        sum_sq += x.pow(2).sum().item()
        sum_residual += (x - x_hat).pow(2).sum().item()

        targets = batch[:, 1:]
        for name, replacement in (
            ("sae", reconstruct),
            ("zero", torch.zeros_like),
            ("clean", None),
        ):
            if replacement is None:
                logits = backend.forward(batch)
            else:
                with backend.splicing({site: replacement}, convention=convention):
                    logits = backend.forward(batch)
            assert logits is not None
            ce[name] += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
            ).item()
        n_predictions += targets.numel()

    if n_kept == 0:
        raise ValueError(f"every token of the batch is in exclude_tokens={list(exclude_tokens)}")
    mean_z = sum_z / n_kept
    variance = sum_sq / n_kept - mean_z.pow(2).sum().item()
    mse = sum_residual / n_kept
    explained = (1.0 if mse < 1e-10 else 0.0) if variance < 1e-10 else 1.0 - mse / variance
    clean, with_sae, zero = (ce[k] / n_predictions for k in ("clean", "sae", "zero"))
    recovered = (zero - with_sae) / (zero - clean) if zero != clean else None
    density = fired / n_kept
    metrics = SAEMetrics(
        l0=active_total / n_kept,
        ce_loss_recovered=recovered,
        dead_pct=100.0 * (fired == 0).double().mean().item(),
        explained_variance=explained,
        n_tokens=n_kept,
        source=f"measured on {n_kept} tokens ({convention} z)",
    )
    return Measurement(metrics, torch.log10(density + LOG_SPARSITY_EPS).float())
