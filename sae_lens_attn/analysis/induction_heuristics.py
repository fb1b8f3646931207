"""Induction heuristics for SAE features (Kissane et al., DESIGN.md), with a negative control.

Selection: a feature's head-attribution share to the layer's induction heads is at least
``selection_share``. Behaviour: over up to ``max_contexts`` contexts where the feature fires, a
context passes when the top-DFA source position s* satisfies ``tokens[s* − 1] == tokens[q]`` with
``1 ≤ s* < q`` (the feature reads the token after an earlier occurrence of the current token;
``sources.follows_earlier_copy``, the test the induction family uses); a feature passes at a pass
rate of at least ``pass_rate``. Special tokens (the tokenizer's: BOS, an attention sink) are
never a context's query nor its top source s*, which is the usable source with the largest
positive DFA contribution (``sources.top_source``); a context without one fails. Features with
less than ``control_share`` to the induction heads are the negative control: their pass rate is
measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import NO_QUERY, attribute, dfa_capture, kernel_inputs
from sae_lens_attn.analysis.families import usable_positions
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.analysis.induction import induction_scores
from sae_lens_attn.analysis.sources import follows_earlier_copy, top_source
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.validation import check_count, check_features, context_limit, tokenizer_of

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
    tokens: Int[Tensor, " batch pos"] | Corpus,
    *,
    features: Int[Tensor, " F"] | list[int] | None = None,
    induction_heads: list[int] | None = None,
    head_score: float = 0.3,
    relative_head_score: float | None = None,
    selection_share: float = 0.5,
    pass_rate: float = 0.6,
    control_share: float = 0.2,
    max_contexts: int = 200,
    batch_size: int = 16,
    feature_chunk: int = 64,
    bos_token_id: int | None = None,
    induction_seq_len: int | None = None,
) -> InductionReport:
    """Run the selection and behaviour heuristics on ``features`` (default: all) of a hook_z SAE.

    Args:
        model: any model a backend supports; ``tokens`` are real text from its distribution.
        sae: a hook_z SAE with a linear encoder.
        tokens: contexts ``[batch, pos]`` to find the features firing in, or a ``Corpus``
            of them (its capture and encode are shared; padding is never a context).
        features: feature indices to test (default: all).
        induction_heads: heads of the SAE's layer to count as induction heads (default: heads whose
            induction score is at least ``head_score``).
        head_score: induction score that makes a head an induction head.
        relative_head_score: instead of ``head_score``, the share of the layer's best score a head
            needs (``0.9``: within 10% of the best head), so a layer whose heads all score high
            still leaves heads for the negative control.
        selection_share: share to induction heads that selects a feature.
        pass_rate: pass rate a selected feature needs to count as induction.
        control_share: share below which a feature is in the negative control.
        max_contexts: contexts tested per feature at most.
        batch_size: rows per forward pass.
        feature_chunk: features attributed at once (bounds memory).
        bos_token_id: BOS id for the induction scores (default: the tokenizer's).
        induction_seq_len: length of the repeated random sequence scoring the heads (default:
            40, or as long as the model's context allows).

    Returns:
        An ``InductionReport``; ``report.induction_features`` are the features judged induction.
    """
    corpus = corpus_of(model, tokens)
    backend, tokens = corpus.backend, corpus.tokens
    site, whole = dfa_capture(corpus, sae)
    batch_size = check_count("batch_size", batch_size)
    feature_chunk = check_count("feature_chunk", feature_chunk)
    seq_len = induction_seq_len if induction_seq_len is not None else default_seq_len(model)
    scores = induction_scores(model, bos_token_id=bos_token_id, seq_len=seq_len)
    scores = scores[site.layer]
    heads = (
        induction_heads
        if induction_heads is not None
        else (scores >= _head_threshold(scores, head_score, relative_head_score))
        .nonzero()
        .flatten()
        .tolist()
    )
    bad = [h for h in heads if not 0 <= h < site.n_heads]
    if bad:
        raise ValueError(
            f"induction_heads {bad} out of range for {site.n_heads} heads (valid: 0..{site.n_heads - 1})"
        )
    feature_idx = check_features(features, sae.cfg.d_sae)
    shares = (
        head_attribution(sae, backend)[:, heads].sum(-1) if heads else torch.zeros(sae.cfg.d_sae)
    )

    passes = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    tried = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    pattern, values, z_flat = kernel_inputs(whole)
    every_act = corpus.activations(sae)[..., feature_idx.to(z_flat.device)]  # (N, Q, F)
    every_act = every_act * corpus.real[..., None].to(every_act.device)  # padding: no context
    # special tokens (BOS) are never a query nor a top source (``sources``), as in the families
    usable = usable_positions(tokens, tokenizer=tokenizer_of(backend)) & corpus.real.cpu()
    for start in range(0, tokens.shape[0], batch_size):
        part = slice(start, start + batch_size)
        rows = tokens[part]
        acts = every_act[part]  # (B, Q, F)
        for chunk in torch.arange(feature_idx.numel()).split(feature_chunk):
            chunk_features = feature_idx[chunk]
            fired = (acts[..., chunk] > 0) & usable[part, :, None].to(acts.device)
            query = _contexts(fired, max_contexts - tried[chunk_features])
            if query.shape[1] == 0:
                continue
            result = attribute(
                pattern[part], values[part], z_flat[part], sae, site, chunk_features, query,
                acts=acts[..., chunk],
            )  # fmt: skip
            top = top_source(result.by_src.transpose(1, 2), query, usable[part]).position
            ok = follows_earlier_copy(rows, query, top)  # (B, C, F)
            tested = query >= 0
            passes[chunk_features] += (ok & tested).sum((0, 1)).cpu()
            tried[chunk_features] += tested.sum((0, 1)).cpu()

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
            "head_score": _head_threshold(scores, head_score, relative_head_score),
            "selection_share": selection_share,
            "pass_rate": pass_rate,
            "control_share": control_share,
            "max_contexts": max_contexts,
        },
    )


def _contexts(
    fired: Bool[Tensor, " batch pos F"], room: Int[Tensor, " F"]
) -> Int[Tensor, " batch C F"]:
    """The query positions to test per (prompt, feature): where it fires, the first ``room[f]``
    contexts of each feature in (prompt, position) order; −1 pads the rest."""
    n_pos = fired.shape[1]
    rank = fired.flatten(0, 1).cumsum(0).view_as(fired)  # 1-based, over (prompt, position)
    take = fired & (rank <= room.to(fired.device).clamp(min=0))
    width = int(take.sum(1).max()) if take.any() else 0
    positions = torch.arange(n_pos, device=fired.device)[None, :, None]
    first = torch.where(take, positions, n_pos).sort(dim=1).values[:, :width]
    return torch.where(first < n_pos, first, NO_QUERY)


def default_seq_len(model: Any) -> int:
    """40, or the longest ``n`` whose ``[BOS, r, r]`` (``2n + 1`` tokens) fits the model's context."""
    n_ctx = context_limit(model)
    return 40 if n_ctx is None else max(1, min(40, (n_ctx - 1) // 2))


def _head_threshold(scores: Tensor, head_score: float, relative: float | None) -> float:
    """The induction score a head needs: ``head_score``, or ``relative`` × the layer's best."""
    if relative is None:
        return head_score
    if not 0.0 < relative <= 1.0:
        raise ValueError(
            f"relative_head_score must be in (0, 1] (a share of the best head's score), got "
            f"{relative!r}"
        )
    return relative * float(scores.max())
