"""Analyses of attention SAEs and of the models they read: pure functions over a backend's captures,
and analyzers by name (``register`` / ``get`` / ``names``, extensible through entry points)."""

from sae_lens_attn.analysis.ablation import ABLATION_METHODS, FeatureAblation, feature_ablation
from sae_lens_attn.analysis.attribution import DFAResult, dfa
from sae_lens_attn.analysis.dfa_peaks import PeakDFA, dfa_at_peaks
from sae_lens_attn.analysis.families import (
    FamilyThresholds,
    FeatureFamilies,
    classify_families,
    feature_families,
)
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.analysis.induction import induction_scores, repeated_random_tokens
from sae_lens_attn.analysis.induction_heuristics import (
    InductionFeature,
    InductionReport,
    induction_features,
)
from sae_lens_attn.analysis.interventions import (
    EDIT_MODES,
    Edit,
    ReferenceMeans,
    Source,
    SplicedRun,
    reference_means,
    spliced,
)
from sae_lens_attn.analysis.ioi import IOIPrompts, ioi_prompts
from sae_lens_attn.analysis.logits import FeatureLogits, feature_logits
from sae_lens_attn.analysis.long_prefix import (
    PrefixEvents,
    PrefixInduction,
    prefix_events,
    prefix_induction,
)
from sae_lens_attn.analysis.metrics import Metric, logit_diff
from sae_lens_attn.analysis.patching import (
    DIRECTIONS,
    PATCH_TARGETS,
    ActivationPatching,
    activation_patching,
)
from sae_lens_attn.analysis.polysemantic_heads import (
    HeadFeatures,
    HeadVerdict,
    Polysemanticity,
    head_features,
    polysemanticity,
)
from sae_lens_attn.analysis.proxies import (
    PROXIES,
    ProxyHistogram,
    induction_proxy,
    proxy_histogram,
    proxy_mask,
)
from sae_lens_attn.analysis.recursive_dfa import Contribution, RDFAResult, rdfa
from sae_lens_attn.analysis.registry import (
    ENTRY_POINT_GROUP,
    AnalysisInput,
    Analyzer,
    get,
    names,
    register,
)
from sae_lens_attn.corpus import Corpus, sae_activations

__all__ = [
    "ABLATION_METHODS",
    "DIRECTIONS",
    "EDIT_MODES",
    "ENTRY_POINT_GROUP",
    "PATCH_TARGETS",
    "PROXIES",
    "ActivationPatching",
    "AnalysisInput",
    "Analyzer",
    "Contribution",
    "Corpus",
    "DFAResult",
    "Edit",
    "FamilyThresholds",
    "FeatureAblation",
    "FeatureFamilies",
    "FeatureLogits",
    "HeadFeatures",
    "HeadVerdict",
    "IOIPrompts",
    "InductionFeature",
    "InductionReport",
    "Metric",
    "PeakDFA",
    "Polysemanticity",
    "PrefixEvents",
    "PrefixInduction",
    "ProxyHistogram",
    "RDFAResult",
    "ReferenceMeans",
    "Source",
    "SplicedRun",
    "activation_patching",
    "classify_families",
    "dfa",
    "dfa_at_peaks",
    "feature_ablation",
    "feature_families",
    "feature_logits",
    "get",
    "head_attribution",
    "head_features",
    "induction_features",
    "induction_proxy",
    "induction_scores",
    "ioi_prompts",
    "logit_diff",
    "names",
    "polysemanticity",
    "prefix_events",
    "prefix_induction",
    "proxy_histogram",
    "proxy_mask",
    "rdfa",
    "reference_means",
    "register",
    "repeated_random_tokens",
    "sae_activations",
    "spliced",
]
