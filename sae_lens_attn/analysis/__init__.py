"""Analyses of attention SAEs and of the models they read: pure functions over a backend's captures,
and analyzers by name (``register`` / ``get`` / ``names``, extensible through entry points)."""

from sae_lens_attn.analysis.attribution import DFAResult, dfa
from sae_lens_attn.analysis.dfa_peaks import PeakDFA, dfa_at_peaks
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.analysis.induction import induction_scores, repeated_random_tokens
from sae_lens_attn.analysis.induction_heuristics import (
    InductionFeature,
    InductionReport,
    induction_features,
)
from sae_lens_attn.analysis.registry import (
    ENTRY_POINT_GROUP,
    AnalysisInput,
    Analyzer,
    get,
    names,
    register,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AnalysisInput",
    "Analyzer",
    "DFAResult",
    "InductionFeature",
    "InductionReport",
    "PeakDFA",
    "dfa",
    "dfa_at_peaks",
    "get",
    "head_attribution",
    "induction_features",
    "induction_scores",
    "names",
    "register",
    "repeated_random_tokens",
]
