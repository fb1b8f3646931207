"""The joint ablation of a layer's induction features at repeated spans: the analyzer
``induction_ablation`` and the functions behind it (the demo's causal check uses them too).

It zero-ablates, each set at once and with the SAE's error term kept, the SAE's induction features
(``induction_features``' verdict), its negative-control features, as many of the most active other
features as carry the same summed activation at the positions (``matched``; features that load on
the induction heads but fail the behaviour test are left out of it), and the error term, at the
second occurrence of repeated spans in the command's tokens (or ``at=<position>``, as for
``prompts="tokens"`` in ``causal``). The metric is the logit (and the log-probability) of the
token that follows, averaged per context. Options: those of ``induction_features``
(``induction_heads``, ``head_score``, ``relative_head_score``, ...) and ``at``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.analyzers import NEEDS_DFA
from sae_lens_attn.analysis.analyzers.basic import INDUCTION_FEATURES
from sae_lens_attn.analysis.analyzers.causal import (
    mean_of,
    next_token_logit,
    repeat_positions,
    token_prompts,
)
from sae_lens_attn.analysis.interventions import ERROR_TERM, Edit, spliced
from sae_lens_attn.analysis.registry import AnalysisInput, Table
from sae_lens_attn.corpus import CaptureExtra, Corpus

ABLATION_SETS = ("induction", "control", "matched", "error term")
"""The sets ``induction_ablation`` zero-ablates, each at once."""


class AblationSets(NamedTuple):
    """The feature sets ``induction_ablation`` zero-ablates, each at once."""

    induction: list[int]
    """Features judged induction features."""
    control: list[int]
    """The negative-control features (little decoder norm in the induction heads)."""
    matched: list[int]
    """Other features, most active first, as many as match the induction set's summed
    activation at the positions."""


def ablation_sets(verdicts: Mapping[int, str], activation: Float[Tensor, " d_sae"]) -> AblationSets:
    """The sets from ``induction_features``' verdicts and each feature's summed activation at the
    ablated positions (the ``matched`` set leaves out features that load on the induction heads
    but fail the behaviour test, and features with no activation there)."""
    induction = sorted(f for f, v in verdicts.items() if v == "induction")
    control = sorted(f for f, v in verdicts.items() if v == "control")
    target = float(activation[induction].sum()) if induction else 0.0
    matched, total = [], 0.0
    for feature in activation.argsort(descending=True).tolist():
        if total >= target or float(activation[feature]) <= 0:
            break
        if verdicts.get(feature) in ("induction", "selected, fails behaviour"):
            continue
        matched.append(feature)
        total += float(activation[feature])
    return AblationSets(induction, control, sorted(matched))


@torch.no_grad()
def joint_ablation(
    model: Any,
    sae: SAE[Any],
    corpus: Corpus,
    positions: Bool[Tensor, "batch pos"],
    sets: Mapping[str, Sequence[int] | str],
) -> Table:
    """Zero-ablate each set of features (or the error term, ``"error"``) at once at
    ``positions``, with the error term kept; the logit and log-probability of the next token
    there, averaged per context, against the clean run.

    Returns:
        One row per set: ``set``, ``features``, ``activation`` (the set's summed activation per
        position), ``clean`` and ``ablated`` logits (mean over contexts), ``delta_logit``,
        ``delta_logprob`` and ``contexts_lower`` (share of contexts whose logit fell).
    """
    keep = positions.any(1)
    tokens = corpus.tokens[keep]
    mask = positions[keep]
    mask_in = corpus.attention_mask[keep] if corpus.attention_mask is not None else None
    logit = next_token_logit(tokens, mask)
    logprob = next_token_logit(tokens, mask, log_probs=True)
    acts = corpus.activations(sae).detach()[positions.to(corpus.tokens.device)]  # (N, d_sae)
    clean_logits = corpus.backend.forward(tokens, attention_mask=mask_in)
    assert clean_logits is not None
    clean, clean_lp = logit(clean_logits).cpu(), logprob(clean_logits).cpu()
    rows: Table = []
    for name, chosen in sets.items():
        error = isinstance(chosen, str)
        if error and chosen != ERROR_TERM:
            raise ValueError(f"a set is feature indices or {ERROR_TERM!r}, got {chosen!r}")
        features = [] if isinstance(chosen, str) else [int(f) for f in chosen]
        if not error and not features:
            rows.append({"set": name, "features": 0} | dict.fromkeys(_JOINT_COLUMNS))
            continue
        edit = Edit(sae, ERROR_TERM if error else features, mask, mode="zero")
        with spliced(corpus.backend, edits=[edit]) as run:
            logits = run(tokens, mask_in)
        delta = logit(logits).cpu() - clean
        rows.append(
            {
                "set": name,
                "features": 0 if error else len(features),
                "activation": None if error else float(acts[:, features].sum(1).mean()),
                "clean": mean_of(clean),
                "ablated": mean_of(clean + delta),
                "delta_logit": mean_of(delta),
                "delta_logprob": mean_of(logprob(logits).cpu() - clean_lp),
                "contexts_lower": mean_of((delta < 0).float()),
                "contexts": int(keep.sum()),
                "positions": int(mask.sum()),
            }
        )
    return rows


_JOINT_COLUMNS = (
    "activation",
    "clean",
    "ablated",
    "delta_logit",
    "delta_logprob",
    "contexts_lower",
    "contexts",
    "positions",
)


def induction_ablation(
    model: Any,
    sae: SAE[Any],
    corpus: Corpus,
    verdicts: Mapping[int, str],
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[Table, Table]:
    """Zero-ablate, each set at once, the induction, negative-control and matched features
    (``ablation_sets``) and the error term at ``positions`` (default: the second occurrence of
    repeated spans, ``repeat_positions``).

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE of it.
        corpus: the contexts.
        verdicts: ``induction_features``' verdict per feature (``"induction"``, ``"control"``,
            ...); features without one are neither.

    Returns:
        ``joint_ablation``'s rows (one per set), and the sets' members (``set``, ``feature``).

    Raises:
        ValueError: no position to ablate at.
    """
    mask = repeat_positions(corpus) if positions is None else positions.bool().cpu()
    if not mask.any():
        raise ValueError(
            "no context has a position to ablate at (no repeated span whose next token repeats "
            "too): give longer or more repetitive text"
        )
    acts = corpus.activations(sae).detach()[mask.to(corpus.tokens.device)].sum(0).cpu()
    sets = ablation_sets(verdicts, acts)
    chosen: dict[str, Sequence[int] | str] = {
        "induction": sets.induction,
        "control": sets.control,
        "matched": sets.matched,
        "error term": ERROR_TERM,
    }
    members = [
        {"set": name, "feature": feature}
        for name, features in chosen.items()
        if not isinstance(features, str)
        for feature in features
    ]
    return joint_ablation(model, sae, corpus, mask, chosen), members


@dataclass(frozen=True)
class _InductionAblation:
    description: str = (
        "zero-ablate the SAE's induction features at once at the second occurrence of repeated "
        "spans, against the negative-control and activation-matched features and the error term: "
        "the logit of the induced token"
    )
    needs: frozenset[CaptureExtra] = NEEDS_DFA

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        prompts = token_prompts(inputs)
        assert isinstance(prompts.positions, Tensor)
        verdicts = {
            int(row["feature"]): str(row["verdict"])
            for row in INDUCTION_FEATURES(inputs)["induction_features"]
        }
        rows, members = induction_ablation(
            inputs.model, inputs.sae, inputs.corpus, verdicts, prompts.positions
        )
        return {"induction_ablation": rows, "induction_ablation_sets": members}


INDUCTION_ABLATION = _InductionAblation()
