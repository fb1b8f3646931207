"""Analyzers of what features read and write: feature logits, feature families, head
polysemanticity and proxy histograms.

Options (``AnalysisInput.options``): ``features`` / ``top`` (the package's feature policy), ``k``
(tokens per direction of ``feature_logits``, default 20), ``head_k`` (top features per head,
default 10), ``confidence`` (default 0.5), ``n_contexts`` (default 20) and any field of
``FamilyThresholds`` (``logit_z``, ``min_share``, ...); for ``proxy_histogram``, ``proxy``
(a built-in proxy of ``proxies``, default ``"induction"``) and ``bins`` (default 20).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sae_lens_attn.analysis.analyzers import NEEDS_DFA, NEEDS_Z, chosen_features
from sae_lens_attn.analysis.families import FAMILIES, FamilyThresholds, feature_families
from sae_lens_attn.analysis.logits import feature_logits
from sae_lens_attn.analysis.polysemantic_heads import polysemanticity
from sae_lens_attn.analysis.proxies import proxy_histogram, proxy_mask
from sae_lens_attn.analysis.registry import AnalysisInput, Table
from sae_lens_attn.corpus import CaptureExtra


@dataclass(frozen=True)
class _FeatureLogits:
    description: str = "tokens each feature's direct effect (W_dec·W_O·W_U) raises and lowers most"
    needs: frozenset[CaptureExtra] = NEEDS_Z

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        result = feature_logits(
            inputs.model,
            inputs.sae,
            chosen_features(inputs),
            k=int(inputs.options.get("k", 20)),
            tokenizer=inputs.tokenizer,
        )
        rows: Table = []
        for row, feature in enumerate(result.features.tolist()):
            for direction, ids, values, texts in (
                ("top", result.top_ids, result.top_values, result.top_tokens),
                ("bottom", result.bottom_ids, result.bottom_values, result.bottom_tokens),
            ):
                for rank, (token, value) in enumerate(
                    zip(ids[row].tolist(), values[row].tolist(), strict=True)
                ):
                    rows.append(
                        {
                            "feature": feature,
                            "direction": direction,
                            "rank": rank,
                            "token_id": token,
                            "token": texts[row][rank],
                            "value": float(value),
                        }
                    )
        return {"feature_logits": rows}


@dataclass(frozen=True)
class _FeatureFamilies:
    description: str = "family of each feature from its top DFA source and logit effect"
    needs: frozenset[CaptureExtra] = NEEDS_DFA

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        result = feature_families(
            inputs.model,
            inputs.sae,
            inputs.corpus,
            chosen_features(inputs),
            thresholds=_thresholds(inputs),
            n_contexts=int(inputs.options.get("n_contexts", 20)),
            tokenizer=inputs.tokenizer,
        )
        rows: Table = []
        for column, feature in enumerate(result.features.tolist()):
            row = {
                "feature": feature,
                "label": result.labels[feature],
                "confidence": result.confidence(feature),
                "contexts": int(result.contexts[column]),
            }
            row |= {f"share_{name}": float(result.shares[name][column]) for name in FAMILIES}
            rows.append(row)
        counts = [{"label": label, "features": n} for label, n in result.counts().items()]
        return {"feature_families": rows, "family_counts": counts}


@dataclass(frozen=True)
class _Polysemanticity:
    description: str = "whether each head's top features span more than one family"
    needs: frozenset[CaptureExtra] = NEEDS_DFA

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        confidence = float(inputs.options.get("confidence", 0.5))
        result = polysemanticity(
            inputs.model,
            inputs.sae,
            inputs.corpus,
            k=int(inputs.options.get("head_k", 10)),
            confidence=confidence,
            thresholds=_thresholds(inputs),
            n_contexts=int(inputs.options.get("n_contexts", 20)),
            tokenizer=inputs.tokenizer,
        )
        tops: Table = []
        for top in result.head_features:
            assert top.labels is not None and top.confidences is not None
            for head, features in enumerate(top.features.tolist()):
                for rank, feature in enumerate(features):
                    tops.append(
                        {
                            "layer": top.layer,
                            "head": head,
                            "rank": rank,
                            "feature": feature,
                            "share": float(top.shares[head, rank]),
                            "label": top.labels[head][rank],
                            "confidence": top.confidences[head][rank],
                        }
                    )
        verdicts = [
            {
                "layer": v.layer,
                "head": v.head,
                "verdict": v.verdict,
                "families": " ".join(v.families),
            }
            for v in result.verdicts
        ]
        summary = {
            "heads": len(result.verdicts),
            "polysemantic": result.count("polysemantic"),
            "monosemantic": result.count("monosemantic"),
            "undetermined": result.count("undetermined"),
            "fraction_polysemantic": result.fraction_polysemantic,
            "fraction_determined": result.fraction_determined,
            "k": result.k,
            "confidence": confidence,
        }
        return {"head_features": tops, "head_verdicts": verdicts, "polysemanticity": [summary]}


@dataclass(frozen=True)
class _ProxyHistogram:
    description: str = (
        "each feature's activation histogram stacked by a proxy (default: induction) and its "
        "expected value per bin (Kissane et al.'s Figure 2)"
    )
    needs: frozenset[CaptureExtra] = NEEDS_Z

    @torch.no_grad()
    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        name = str(inputs.options.get("proxy", "induction"))
        proxy = proxy_mask(name, inputs.tokens)  # an unknown name fails before any model pass
        features = chosen_features(inputs)
        counted = None if inputs.attention_mask is None else inputs.attention_mask.bool()
        acts = inputs.corpus.activations(inputs.sae)[..., features]  # (B, pos, F)
        bins, summary = [], []
        for column, feature in enumerate(features):
            hist = proxy_histogram(
                acts[..., column],
                proxy.to(acts.device),
                counted=None if counted is None else counted.to(acts.device),
                bins=int(inputs.options.get("bins", 20)),
                name=name,
            )
            bins += [{"feature": feature, "proxy": name} | row for row in hist.rows()]
            summary.append(
                {
                    "feature": feature,
                    "proxy": name,
                    "fires": bool(hist.counts_true.sum() + hist.counts_false.sum()),
                    "active": int(hist.counts_true.sum() + hist.counts_false.sum()),
                    "proxy_tokens": int(hist.counts_true.sum()) + hist.inactive_true,
                    "base_rate": hist.base_rate,
                    "specificity": hist.specificity,
                    "expected_share": hist.expected_share,
                    "sensitivity": hist.sensitivity,
                }
            )
        return {"proxy_histogram": bins, "proxy_summary": summary}


def _thresholds(inputs: AnalysisInput) -> FamilyThresholds:
    names = {f.name for f in fields(FamilyThresholds)}
    return FamilyThresholds(**{k: v for k, v in inputs.options.items() if k in names})


FEATURE_LOGITS = _FeatureLogits()
FEATURE_FAMILIES = _FeatureFamilies()
POLYSEMANTICITY = _Polysemanticity()
PROXY_HISTOGRAM = _ProxyHistogram()
