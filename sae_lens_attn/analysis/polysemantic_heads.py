"""Head polysemanticity: do a head's top features span more than one family?

For each head of an SAE's layer, its top-k features are those with the largest head-attribution
share to it (``sla.analysis.head_attribution``), among the features that fire on the tokens.
Each of them has a family label (``sla.analysis.feature_families``); a label counts when its
confidence (the share of the feature's contexts fitting that family) is at least
``confidence``. A head is:

- ``polysemantic``: its counted labels name at least two families;
- ``monosemantic``: they name exactly one;
- ``undetermined``: none of its top features has a counted label.

``fraction_polysemantic`` is the polysemantic heads over all heads of all the SAEs given (one
per layer: a release): undetermined heads count as not polysemantic, so it is a lower bound,
as in Kissane et al.'s "at least 90% of GPT-2 Small's heads".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.families import (
    FAMILIES,
    FamilyThresholds,
    FeatureFamilies,
    feature_families,
    peak_activations,
    usable_positions,
)
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.backends import backend_for
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.sae_adapter import sae_convention
from sae_lens_attn.site import AttnSite, saes_by_layer
from sae_lens_attn.validation import check_count, check_features, tokenizer_of

Verdict = Literal["polysemantic", "monosemantic", "undetermined"]
UNLABELLED = "unlabelled"
"""Label shown for a top feature that the given ``FeatureFamilies`` does not cover."""


@dataclass(frozen=True)
class HeadFeatures:
    """Each head's top features by head-attribution share, for one SAE."""

    layer: int
    """The SAE's layer."""
    features: Int[Tensor, " n_heads k"]
    """Feature indices per head, largest share first."""
    shares: Float[Tensor, " n_heads k"]
    """Their head-attribution share to the head."""
    labels: tuple[tuple[str, ...], ...] | None
    """Their family labels, when families were given (``unlabelled`` for a feature they lack)."""
    confidences: tuple[tuple[float, ...], ...] | None
    """The confidence of each label (NaN where it is not a family)."""


@dataclass(frozen=True)
class HeadVerdict:
    """Whether one head is polysemantic."""

    layer: int
    """Layer of the head."""
    head: int
    """The head."""
    verdict: Verdict
    """See the module docstring."""
    families: tuple[str, ...]
    """The distinct families its top features' counted labels name, in ``FAMILIES`` order."""


@dataclass(frozen=True)
class Polysemanticity:
    """Head verdicts over one or more SAEs (a release), and the fraction of polysemantic heads."""

    verdicts: tuple[HeadVerdict, ...]
    """One per head of every SAE, by layer then head."""
    head_features: tuple[HeadFeatures, ...]
    """Each SAE's top features per head, with labels."""
    families: tuple[FeatureFamilies, ...]
    """Each SAE's family labels of those top features."""
    confidence: float
    """Least label confidence that counts."""
    k: int
    """Top features per head asked for."""

    def count(self, verdict: Verdict) -> int:
        """Number of heads with ``verdict``."""
        return sum(v.verdict == verdict for v in self.verdicts)

    @property
    def fraction_polysemantic(self) -> float:
        """Polysemantic heads over all heads, in [0, 1] (a lower bound: see the module)."""
        return self.count("polysemantic") / len(self.verdicts)

    @property
    def fraction_determined(self) -> float:
        """Heads with a verdict other than ``undetermined``, over all heads."""
        return 1 - self.count("undetermined") / len(self.verdicts)


@torch.no_grad()
def head_features(
    sae: SAE[Any],
    model: Any = None,
    k: int = 10,
    *,
    families: FeatureFamilies | None = None,
    candidates: Int[Tensor, " C"] | Sequence[int] | None = None,
) -> HeadFeatures:
    """Each head's ``k`` features with the largest head-attribution share.

    Args:
        sae: a hook_z SAE.
        model: only needed when the SAE's metadata lacks its head structure.
        k: features per head (fewer when there are fewer candidates).
        families: family labels to attach (``sla.analysis.feature_families``).
        candidates: the features to choose from (default: all), e.g. those that fire.

    Raises:
        ValueError: ``k`` < 1 or candidates out of range or empty.
    """
    k = check_count("k", k)
    site = AttnSite.from_sae(sae, model)
    pool = check_features(candidates, sae.cfg.d_sae)
    shares = head_attribution(sae, model)[pool].T  # (H, C)
    top = shares.topk(min(k, pool.numel()), dim=-1)
    found = HeadFeatures(site.layer, pool[top.indices], top.values, None, None)
    return found if families is None else with_labels(found, families)


def with_labels(top: HeadFeatures, families: FeatureFamilies) -> HeadFeatures:
    """``top`` with the family label and confidence of each of its features."""
    rows = top.features.tolist()
    labels = tuple(tuple(families.labels.get(f, UNLABELLED) for f in row) for row in rows)
    confidences = tuple(
        tuple(families.confidence(f) if f in families.labels else float("nan") for f in row)
        for row in rows
    )
    return dataclasses.replace(top, labels=labels, confidences=confidences)


def head_verdict(
    labels: Sequence[str], confidences: Sequence[float], confidence: float = 0.5
) -> tuple[Verdict, tuple[str, ...]]:
    """A head's verdict and families from its top features' labels and their confidences."""
    counted = {
        label
        for label, value in zip(labels, confidences, strict=True)
        if label in FAMILIES and value >= confidence
    }
    families = tuple(name for name in FAMILIES if name in counted)
    verdict: Verdict = (
        "undetermined" if not families else "monosemantic" if len(families) == 1 else "polysemantic"
    )
    return verdict, families


@torch.no_grad()
def polysemanticity(
    model: Any,
    sae: SAE[Any] | Sequence[SAE[Any]],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    *,
    k: int = 10,
    confidence: float = 0.5,
    thresholds: FamilyThresholds | None = None,
    n_contexts: int = 20,
    tokenizer: Any = None,
    ignore_tokens: Sequence[int] | None = None,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    batch_size: int = 16,
) -> Polysemanticity:
    """Which heads are polysemantic: their top-k features' family labels (module docstring).

    Args:
        model: any model a backend supports, with an unembedding.
        sae: a hook_z SAE, or one per layer (a release): the fraction is over all their heads.
        tokens: contexts ``[batch, pos]`` from the model's distribution, or a ``Corpus`` of
            them (one capture of every SAE's layer, one encode per SAE, shared).
        k: top features per head.
        confidence: least label confidence that counts, in [0, 1].
        thresholds: the family tests' thresholds (default: ``FamilyThresholds()``).
        n_contexts: max-activating contexts per feature.
        tokenizer: finds special tokens and successors (default: the model's).
        ignore_tokens: token ids that are never a query nor a top source (default: the
            tokenizer's special tokens); a feature that fires only there does not fire.
        attention_mask: 0 at padding.
        batch_size: prompts per forward pass.

    Returns:
        A ``Polysemanticity`` with one verdict per head and ``fraction_polysemantic``.

    Raises:
        ValueError: no SAEs, two SAEs on one layer, ``confidence`` outside [0, 1], or what
            ``feature_families`` refuses.
    """
    if not 0 <= confidence <= 1:
        raise ValueError(f"confidence must lie in [0, 1], got {confidence!r}")
    k = check_count("k", k)
    backend = backend_for(model)
    by_layer = saes_by_layer(sae, backend)
    sites = {layer: AttnSite.from_sae(one, backend) for layer, one in by_layer.items()}
    corpus = corpus_of(backend, tokens, attention_mask, batch_size=batch_size)
    first = next(iter(by_layer.values()))
    corpus.capture_many(sites.values(), sae_convention(first, backend.native_convention))
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(backend)
    usable = usable_positions(
        corpus.tokens, tokenizer=tokenizer, ignore_tokens=ignore_tokens,
        attention_mask=corpus.attention_mask,
    )  # fmt: skip
    options: dict[str, Any] = {
        "thresholds": thresholds, "n_contexts": n_contexts, "tokenizer": tokenizer,
        "ignore_tokens": ignore_tokens,
    }  # fmt: skip
    verdicts: list[HeadVerdict] = []
    tops: list[HeadFeatures] = []
    labelled: list[FeatureFamilies] = []
    for layer, one in by_layer.items():
        site = sites[layer]
        every = torch.arange(one.cfg.d_sae)
        peak_acts, _ = peak_activations(corpus, one, every, usable)
        fire = every[(peak_acts > 0).any(0)]
        if not fire.numel():
            raise ValueError(
                f"no feature of the SAE at {site.hook_name} fires on the given tokens, so no "
                "head has top features to label; give tokens from the model's distribution"
            )
        top = head_features(one, backend, k, candidates=fire)
        families = feature_families(
            backend, one, corpus, top.features.flatten().unique(), **options
        )
        top = with_labels(top, families)
        assert top.labels is not None and top.confidences is not None
        for head in range(site.n_heads):
            verdict, names = head_verdict(top.labels[head], top.confidences[head], confidence)
            verdicts.append(HeadVerdict(site.layer, head, verdict, names))
        tops.append(top)
        labelled.append(families)
    return Polysemanticity(tuple(verdicts), tuple(tops), tuple(labelled), confidence, k)
