"""Analyzers of heads and DFA: head attribution, DFA at the peaks, induction scores and the
induction-feature heuristics.

Options (``AnalysisInput.options``): ``features`` / ``top`` (the package's feature policy),
``top_sources`` (DFA sources per context, 5), and for the induction analyzers
``induction_heads``, ``head_score``, ``relative_head_score``, ``selection_share``,
``pass_rate``, ``control_share``, ``max_contexts``, ``bos_token_id``, ``induction_seq_len``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_lens_attn.analysis.analyzers import NEEDS_DFA, NEEDS_Z, chosen_features, shown_token
from sae_lens_attn.analysis.dfa_peaks import PeakDFA, dfa_at_peaks
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.analysis.induction import induction_scores
from sae_lens_attn.analysis.induction_heuristics import default_seq_len, induction_features
from sae_lens_attn.analysis.registry import AnalysisInput, Table
from sae_lens_attn.corpus import CaptureExtra


@dataclass(frozen=True)
class _HeadAttribution:
    description: str = "weight-based share of each feature's decoder norm per head"
    needs: frozenset[CaptureExtra] = NEEDS_Z

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        shares = head_attribution(inputs.sae, inputs.corpus.backend)
        rows = []
        for feature in chosen_features(inputs):
            row = {"feature": feature, "top_head": int(shares[feature].argmax())}
            row |= {f"head_{h}": round(float(s), 6) for h, s in enumerate(shares[feature])}
            rows.append(row)
        return {"head_attribution": rows}


@dataclass(frozen=True)
class _DFA:
    description: str = (
        "direct feature attribution at each context's max-activating position "
        "(fired=False rows: the feature never fires in that context, nothing is attributed)"
    )
    needs: frozenset[CaptureExtra] = NEEDS_DFA

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        features = chosen_features(inputs)
        top_sources = int(inputs.options.get("top_sources", 5))
        result = peak_dfa(inputs, features)
        by_src: Table = []
        by_head: Table = []
        for column, feature in enumerate(features):
            for prompt in range(inputs.tokens.shape[0]):
                entry = (prompt, column)
                if not result.fired[entry]:  # never fires here: no peak, nothing attributed
                    unfired = {
                        "feature": feature,
                        "prompt": prompt,
                        "fired": False,
                        "query_pos": None,
                        "query_token": None,
                        "activation": 0.0,
                        "pre_act": None,
                    }
                    by_src.append(
                        unfired | {"source_pos": None, "source_token": None, "contribution": None}
                    )
                    by_head.append(unfired | {"head": None, "contribution": None})
                    continue
                q = int(result.positions[entry])
                base = {
                    "feature": feature,
                    "prompt": prompt,
                    "fired": True,
                    "query_pos": q,
                    "query_token": shown_token(inputs, prompt, q),
                    "activation": float(result.acts[entry]),
                    "pre_act": float(result.pre_act[entry]),
                }
                contributions = result.by_src[prompt, :, column]
                for s in contributions.abs().argsort(descending=True)[:top_sources].tolist():
                    by_src.append(
                        base
                        | {
                            "source_pos": s,
                            "source_token": shown_token(inputs, prompt, s),
                            "contribution": float(contributions[s]),
                        }
                    )
                for h, value in enumerate(result.by_head[prompt, :, column].tolist()):
                    by_head.append(base | {"head": h, "contribution": value})
        return {"dfa_by_src": by_src, "dfa_by_head": by_head}


@dataclass(frozen=True)
class _InductionScores:
    description: str = "induction score of every head (repeated random tokens)"
    needs: frozenset[CaptureExtra] = NEEDS_Z

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        scores = induction_scores(
            inputs.model,
            bos_token_id=inputs.options.get("bos_token_id"),
            seq_len=induction_seq_len(inputs),
        )
        return {
            "induction_scores": [
                {"layer": layer, "head": head, "score": float(scores[layer, head])}
                for layer in range(scores.shape[0])
                for head in range(scores.shape[1])
            ]
        }


@dataclass(frozen=True)
class _InductionFeatures:
    description: str = "Kissane et al.'s induction selection and behaviour heuristics, with control"
    needs: frozenset[CaptureExtra] = NEEDS_DFA

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        options = {k: v for k, v in inputs.options.items() if k in _INDUCTION_OPTIONS}
        options["induction_seq_len"] = induction_seq_len(inputs)
        if not {"induction_heads", "head_score"} & set(options):  # relative: works on 4 heads
            options.setdefault("relative_head_score", RELATIVE_HEAD_SCORE)
        features = inputs.options.get("features")
        key = ("induction_features", id(inputs.sae), repr(features), repr(sorted(options.items())))
        report = inputs.corpus.memo(  # once per command: induction_ablation reads it too
            key,
            lambda: induction_features(
                inputs.model, inputs.sae, inputs.corpus, features=features, **options
            ),
        )
        rows = [row.__dict__ for row in report.rows]
        summary = {
            "induction_heads": " ".join(map(str, report.induction_heads)),
            "n_induction_features": len(report.induction_features),
            "n_selected": sum(
                row.share >= report.thresholds["selection_share"] for row in report.rows
            ),
            "control_pass_rate": report.control_pass_rate(),
            **report.thresholds,
        }
        return {"induction_features": rows, "induction_summary": [summary]}


RELATIVE_HEAD_SCORE = 0.9
"""Default head selection of ``induction_features``: heads within 10% of the layer's best
induction score (an absolute score selects every head of a small layer whose heads all induct)."""
_INDUCTION_OPTIONS = (
    "induction_heads",
    "head_score",
    "relative_head_score",
    "selection_share",
    "pass_rate",
    "control_share",
    "max_contexts",
    "bos_token_id",
    "induction_seq_len",
)

HEAD_ATTRIBUTION = _HeadAttribution()
DFA = _DFA()
INDUCTION_SCORES = _InductionScores()
INDUCTION_FEATURES = _InductionFeatures()


def peak_dfa(inputs: AnalysisInput, features: list[int]) -> PeakDFA:
    """DFA of ``features`` at their peaks in the corpus: computed once per command, shared by
    the DFA analyzer's tables and the plots drawn from them."""
    key = ("peak_dfa", id(inputs.sae), tuple(features))
    return inputs.corpus.memo(
        key, lambda: dfa_at_peaks(inputs.model, inputs.sae, inputs.corpus, features=features)
    )


def induction_seq_len(inputs: AnalysisInput) -> int:
    """The ``induction_seq_len`` option, else 40 or as long as the model's context allows."""
    given = inputs.options.get("induction_seq_len")
    return int(given) if given is not None else default_seq_len(inputs.model)
