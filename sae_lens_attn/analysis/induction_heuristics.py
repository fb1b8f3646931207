"""Induction heuristics for SAE features (Kissane et al., DESIGN.md), with a negative control.

Selection: a feature's head-attribution share to the layer's induction heads is at least
``selection_share``. Behaviour: over up to ``max_contexts`` contexts where the feature fires, a
context passes when the top-DFA source position s* satisfies ``tokens[s* − 1] == tokens[q]`` with
``s* − 1 < q`` (the feature reads the token after an earlier occurrence of the current token); a
feature passes at a pass rate of at least ``pass_rate``. Features with less than ``control_share``
to the induction heads are the negative control: their pass rate is measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import _check_sae, dfa_capture, encode_z
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.analysis.induction import induction_scores
from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite

Verdict = Literal["induction", "selected, fails behaviour", "control", "neither"]


@dataclass(frozen=True)
class InductionFeature:
    """One feature's induction heuristics."""

    feature: int
    """Feature index."""
    share: float
    """Head-attribution share to the layer's induction heads."""
    contexts: int
    """Contexts (prompt, query position) where the feature fired and was tested."""
    pass_rate: float
    """Share of those contexts whose top-DFA source follows an earlier copy of the query token
    (NaN when the feature never fired)."""
    verdict: Verdict
    """``induction``: selected and passes; ``control``: share below the control threshold;
    ``selected, fails behaviour``; ``neither``: between the thresholds."""


@dataclass(frozen=True)
class InductionReport:
    """The heuristics over many features, with the thresholds used."""

    rows: tuple[InductionFeature, ...]
    """One row per tested feature that fired at least once, or was selected."""
    induction_heads: tuple[int, ...]
    """Heads of the SAE's layer counted as induction heads."""
    head_scores: tuple[float, ...]
    """Induction score of every head of the layer."""
    thresholds: dict[str, float]
    """``head_score``, ``selection_share``, ``pass_rate``, ``control_share``, ``max_contexts``."""

    @property
    def induction_features(self) -> list[InductionFeature]:
        """Rows judged induction features."""
        return [row for row in self.rows if row.verdict == "induction"]

    def control_pass_rate(self) -> float:
        """Pass rate over all contexts of the negative-control features (NaN without any)."""
        control = [row for row in self.rows if row.verdict == "control" and row.contexts]
        contexts = sum(row.contexts for row in control)
        return (
            sum(row.pass_rate * row.contexts for row in control) / contexts
            if contexts
            else float("nan")
        )


@torch.no_grad()
def induction_features(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"],
    *,
    features: Int[Tensor, " F"] | list[int] | None = None,
    induction_heads: list[int] | None = None,
    head_score: float = 0.3,
    selection_share: float = 0.5,
    pass_rate: float = 0.6,
    control_share: float = 0.2,
    max_contexts: int = 200,
    batch_size: int = 16,
    bos_token_id: int | None = None,
    induction_seq_len: int | None = None,
) -> InductionReport:
    """Run the selection and behaviour heuristics on ``features`` (default: all) of a hook_z SAE.

    Args:
        model: any model a backend supports; ``tokens`` are real text from its distribution.
        sae: a hook_z SAE with a linear encoder.
        tokens: contexts ``[batch, pos]`` to find the features firing in.
        features: feature indices to test (default: all).
        induction_heads: heads of the SAE's layer to count as induction heads (default: heads whose
            induction score is at least ``head_score``).
        head_score: induction score that makes a head an induction head.
        selection_share: share to induction heads that selects a feature.
        pass_rate: pass rate a selected feature needs to count as induction.
        control_share: share below which a feature is in the negative control.
        max_contexts: contexts tested per feature at most.
        batch_size: rows per forward pass.
        bos_token_id: BOS id for the induction scores (default: the tokenizer's).
        induction_seq_len: length of the repeated random sequence scoring the heads (default:
            40, or as long as the model's context allows).

    Returns:
        An ``InductionReport``; ``report.induction_features`` are the features judged induction.
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    _check_sae(sae)
    seq_len = induction_seq_len if induction_seq_len is not None else default_seq_len(model)
    scores = induction_scores(model, bos_token_id=bos_token_id, seq_len=seq_len)
    scores = scores[site.layer]
    heads = (
        induction_heads
        if induction_heads is not None
        else (scores >= head_score).nonzero().flatten().tolist()
    )
    bad = [h for h in heads if not 0 <= h < site.n_heads]
    if bad:
        raise ValueError(
            f"induction_heads {bad} out of range for {site.n_heads} heads (valid: 0..{site.n_heads - 1})"
        )
    feature_idx = (
        torch.arange(sae.cfg.d_sae) if features is None else torch.as_tensor(features).flatten()
    )
    shares = (
        head_attribution(sae, backend)[:, heads].sum(-1) if heads else torch.zeros(sae.cfg.d_sae)
    )

    passes = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    tried = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    W_enc = sae.W_enc.detach()[:, feature_idx]  # (d_in, F)
    for start in range(0, tokens.shape[0], batch_size):
        rows = tokens[start : start + batch_size]
        cap = dfa_capture(backend, sae, site, rows)
        assert cap.pattern is not None and cap.values is not None
        acts = encode_z(sae, cap.z)[..., feature_idx]  # (B, Q, F) feature activations
        projected = torch.einsum(
            "bshd,hdf->bshf", cap.values, W_enc.unflatten(0, (site.n_heads, site.d_head))
        )
        for column, feature in enumerate(feature_idx.tolist()):
            room = max_contexts - int(tried[feature])
            fired = (acts[..., column] > 0).nonzero()[:room]  # (C, 2): row, query
            if not len(fired):
                continue
            b, q = fired[:, 0], fired[:, 1]
            by_src = torch.einsum("chs,csh->cs", cap.pattern[b, :, q], projected[b, :, :, column])
            top = by_src.argmax(-1)
            ok = (top >= 1) & (top - 1 < q) & (rows[b, (top - 1).clamp(min=0)] == rows[b, q])
            passes[feature] += int(ok.sum())
            tried[feature] += len(fired)

    report_rows = []
    for feature in feature_idx.tolist():
        share, n = float(shares[feature]), int(tried[feature])
        rate = passes[feature].item() / n if n else float("nan")
        if share < control_share:
            verdict: Verdict = "control"
        elif share < selection_share:
            verdict = "neither"
        else:
            verdict = "induction" if n and rate >= pass_rate else "selected, fails behaviour"
        if n or verdict != "control":
            report_rows.append(InductionFeature(feature, share, n, rate, verdict))
    return InductionReport(
        rows=tuple(report_rows),
        induction_heads=tuple(heads),
        head_scores=tuple(scores.tolist()),
        thresholds={
            "head_score": head_score,
            "selection_share": selection_share,
            "pass_rate": pass_rate,
            "control_share": control_share,
            "max_contexts": max_contexts,
        },
    )


def default_seq_len(model: Any) -> int:
    """40, or the longest ``n`` whose ``[BOS, r, r]`` (``2n + 1`` tokens) fits the model's context."""
    inner = getattr(model, "model", model)
    n_ctx = getattr(getattr(inner, "cfg", None), "n_ctx", None) or getattr(
        getattr(inner, "config", None), "max_position_embeddings", None
    )
    return 40 if n_ctx is None else max(1, min(40, (int(n_ctx) - 1) // 2))
