"""Feature families: what each feature reads (its top DFA source) and writes (its logit effect).

For each feature, over its max-activating contexts (its peak in each of the ``n_contexts``
prompts where that peak is largest; it must fire there), the context's top source ``s*`` is the
usable source ``s ≤ q`` with the largest positive DFA contribution at the peak ``q``
(``sources.top_source``: special tokens such as BOS, an attention sink, are never a query nor a
top source); a context without one fits no family. With ``t`` the token ids, ``d = q − s*`` the
distance of the top source and ``z[f, id]`` the feature's standardised logit effect
(``W_dec[f] · W_O_cat · W_U`` minus its mean over the vocabulary, over its standard deviation),
a context fits:

- ``induction``: ``1 ≤ s* < q`` and ``t[s* − 1] == t[q]`` (the source is the token after an
  earlier occurrence of the current token; ``sources.follows_earlier_copy``, the same test as the
  induction behaviour heuristic);
- ``duplicate_token``: ``s* < q`` and ``t[s*] == t[q]`` (an earlier occurrence of the current
  token);
- ``successor``: ``s* < q`` and ``z[f, succ(t[s*])] ≥ logit_z``, where ``succ`` is the next item
  of a number, letter, weekday or month sequence (``sequences.successor_text``) and a single token;
- ``copying``: ``s* < q`` and ``z[f, t[s*]] ≥ logit_z`` (moves an earlier token to the query and
  raises its logit: name movers);
- ``suppression``: ``s* < q`` and ``z[f, t[s*]] ≤ −logit_z`` (lowers it);
- ``local_context``: ``d ≤ local_window``, a clause (``s* = q`` included: the query reads itself);
- ``long_range_context``: neither induction nor duplicate token, and either the top source lies
  beyond the clause (``d > local_window``), or it holds less than ``spread_top_share`` of the
  positive attribution while sources beyond ``local_window`` hold at least ``far_share`` of it.

The families that name what a head moves from a source to the query (induction, duplicate token,
successor, copying, suppression) need a source before the query: a head attending to the query
itself reads the current token, which the residual stream already holds, so a feature whose top
source is the query is local context, not a name mover.

A family's share is the fraction of the feature's contexts that fit it (families overlap: an
induction feature usually copies too). The label is the first family in ``FAMILIES`` order
(most specific first) whose share is at least ``min_share``; ``unclassified`` when none is or
the feature has fewer than ``min_contexts`` contexts; ``never_fires`` when it has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import NO_QUERY
from sae_lens_attn.analysis.dfa_peaks import dfa_at_peaks
from sae_lens_attn.analysis.logits import logit_effects
from sae_lens_attn.analysis.sequences import successor_ids
from sae_lens_attn.analysis.sources import NO_SOURCE, follows_earlier_copy, top_source
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.validation import (
    check_count,
    check_features,
    special_token_ids,
    tokenizer_of,
)

FAMILIES = (
    "induction",
    "duplicate_token",
    "successor",
    "copying",
    "suppression",
    "local_context",
    "long_range_context",
)
"""The families, most specific first: the order in which they claim a label."""
UNCLASSIFIED = "unclassified"
"""Label of a feature that fires but fits no family at ``min_share`` (or has too few contexts)."""
NEVER_FIRES = "never_fires"
"""Label of a feature that fires in none of the given contexts (nothing is attributed)."""
LABELS = (*FAMILIES, UNCLASSIFIED, NEVER_FIRES)
"""Every label ``feature_families`` gives."""


@dataclass(frozen=True)
class FamilyThresholds:
    """The thresholds of the family tests (module docstring), with their defaults."""

    local_window: int = 10
    """A top source at most this many positions before the query is local context (0: the query
    itself); farther ones are long-range. Clause-scale: an English clause is 7 to 10 words, about
    10 to 13 BPE tokens, and in code, the stretches of a line between punctuation and brackets of
    the standard library's ``random.py`` under the embedded model's tokenizer are 6 tokens long in
    the median and 10 at the 75th percentile (a whole line: 18 in the median)."""
    far_share: float = 0.5
    """Long-range spread: least share of the positive attribution from sources beyond
    ``local_window``."""
    spread_top_share: float = 0.3
    """Long-range spread: the top source holds less than this share of the positive
    attribution."""
    logit_z: float = 3.0
    """Standardised logit effect (in standard deviations over the vocabulary) that counts as
    raising (``≥ logit_z``) or lowering (``≤ −logit_z``) a token's logit."""
    min_share: float = 0.5
    """Least share of a feature's contexts that a family needs to label it."""
    min_contexts: int = 3
    """Fewest contexts a feature needs to be labelled with a family."""

    def __post_init__(self) -> None:
        check_count("local_window", self.local_window, minimum=0)
        check_count("min_contexts", self.min_contexts)
        for name in ("far_share", "spread_top_share", "min_share"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"FamilyThresholds.{name} must lie in [0, 1], got {value!r}")
        if not self.logit_z > 0:
            raise ValueError(f"FamilyThresholds.logit_z must be > 0, got {self.logit_z!r}")


@dataclass(frozen=True)
class FeatureFamilies:
    """Family shares and labels of some features."""

    features: Int[Tensor, " F"]
    """Feature indices, in the order of the share tensors."""
    labels: dict[int, str]
    """Feature → its label (one of ``LABELS``)."""
    shares: dict[str, Float[Tensor, " F"]]
    """Family → share of each feature's contexts that fit it (NaN without contexts)."""
    contexts: Int[Tensor, " F"]
    """Contexts examined per feature (0: it never fires)."""
    thresholds: FamilyThresholds = field(default_factory=FamilyThresholds)
    """The thresholds used."""

    def confidence(self, feature: int) -> float:
        """Share of ``feature``'s contexts that fit its label's family (NaN when unlabelled)."""
        label = self.labels[int(feature)]
        if label not in FAMILIES:
            return float("nan")
        column = int((self.features == int(feature)).nonzero()[0])
        return float(self.shares[label][column])

    def counts(self) -> dict[str, int]:
        """Number of features per label, every label present."""
        labels = list(self.labels.values())
        return {label: labels.count(label) for label in LABELS}


def context_fits(
    tokens: Int[Tensor, " C pos"],
    query: Int[Tensor, " C F"],
    by_src: Float[Tensor, " C pos F"],
    logit_z: Float[Tensor, " F d_vocab"],
    *,
    successors: Int[Tensor, " d_vocab"] | None = None,
    sources: Bool[Tensor, " C pos"] | None = None,
    thresholds: FamilyThresholds | None = None,
) -> Bool[Tensor, " C F n_families"]:
    """Which families each context fits (module docstring), in ``FAMILIES`` order.

    Args:
        tokens: the token ids of each context row.
        query: the query (peak) position of each (row, feature).
        by_src: DFA by source at that query, per feature.
        logit_z: each feature's standardised logit effect per token.
        successors: successor id per token id, −1 where none (default: none).
        sources: True where a position may be a query or a top source (default: all): a
            context whose query is not fits no family.
        thresholds: the thresholds (default: ``FamilyThresholds()``).
    """
    th = thresholds or FamilyThresholds()
    n_rows, n_pos = tokens.shape
    n_features = query.shape[1]
    device = by_src.device
    tokens, query = tokens.to(device), query.to(device)
    sources = torch.ones_like(tokens, dtype=torch.bool) if sources is None else sources.to(device)
    top, best = top_source(by_src, query, sources)  # (C, F): s*, NO_SOURCE where none
    has_source = top != NO_SOURCE
    at_top = top.clamp(min=0)
    earlier = has_source & (top < query)  # s* < q: a source other than the query itself
    distance = query - top
    s = torch.arange(n_pos, device=device)[None, :, None]
    allowed = sources[:, :, None] & (s <= query[:, None, :])  # (C, P, F)
    positive = by_src.float().nan_to_num().clamp(min=0) * allowed
    total = positive.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    top_share = best.clamp(min=0) / total
    far = (positive * ((query[:, None, :] - s) > th.local_window)).sum(1) / total

    at = tokens.gather(1, query.clamp(min=0))  # t[q]
    source = tokens.gather(1, at_top)  # t[s*]
    column = torch.arange(n_features, device=device).expand(n_rows, n_features)
    logit_z = logit_z.to(device).float()
    source_z = logit_z[column, source]
    table = (
        torch.full((logit_z.shape[1],), -1, dtype=torch.long, device=device)
        if successors is None
        else successors.to(device)
    )
    following = table[source]
    following_z = logit_z[column, following.clamp(min=0)]
    induction = follows_earlier_copy(tokens, query, top)
    duplicate = earlier & (source == at)
    spread = (top_share < th.spread_top_share) & (far >= th.far_share)
    fits = {
        "induction": induction,
        "duplicate_token": duplicate,
        "successor": earlier & (following >= 0) & (following_z >= th.logit_z),
        "copying": earlier & (source_z >= th.logit_z),
        "suppression": earlier & (source_z <= -th.logit_z),
        "local_context": distance <= th.local_window,
        "long_range_context": ~induction & ~duplicate & ((distance > th.local_window) | spread),
    }
    return torch.stack([fits[name] & has_source for name in FAMILIES], dim=-1)


def label_features(
    fit_counts: Int[Tensor, " F n_families"],
    contexts: Int[Tensor, " F"],
    features: Int[Tensor, " F"],
    thresholds: FamilyThresholds | None = None,
) -> FeatureFamilies:
    """Shares and labels from the number of contexts fitting each family (module docstring)."""
    th = thresholds or FamilyThresholds()
    counts = fit_counts.double().cpu()
    n = contexts.cpu()
    shares = torch.where(n[:, None] > 0, counts / n.clamp(min=1)[:, None], float("nan"))
    labels: dict[int, str] = {}
    for row, feature in enumerate(features.tolist()):
        passing = [name for j, name in enumerate(FAMILIES) if shares[row, j] >= th.min_share]
        if n[row] == 0:
            labels[feature] = NEVER_FIRES
        elif n[row] < th.min_contexts or not passing:
            labels[feature] = UNCLASSIFIED
        else:
            labels[feature] = passing[0]
    return FeatureFamilies(
        features=features.cpu(),
        labels=labels,
        shares={name: shares[:, j].float() for j, name in enumerate(FAMILIES)},
        contexts=n.long(),
        thresholds=th,
    )


def classify_families(
    tokens: Int[Tensor, " C pos"],
    query: Int[Tensor, " C F"],
    by_src: Float[Tensor, " C pos F"],
    logit_z: Float[Tensor, " F d_vocab"],
    *,
    valid: Bool[Tensor, " C F"] | None = None,
    features: Int[Tensor, " F"] | None = None,
    successors: Int[Tensor, " d_vocab"] | None = None,
    sources: Bool[Tensor, " C pos"] | None = None,
    thresholds: FamilyThresholds | None = None,
) -> FeatureFamilies:
    """The pure classifier: families of features from DFA at their peak contexts and their logit
    table (``context_fits``, then ``label_features``).

    Args:
        tokens, query, by_src, logit_z, successors, sources, thresholds: as ``context_fits``.
        valid: True where (row, feature) is one of the feature's contexts (default: all).
        features: the feature index of each column (default: 0..F-1).
    """
    fits = context_fits(
        tokens, query, by_src, logit_z, successors=successors, sources=sources,
        thresholds=thresholds,
    )  # fmt: skip
    valid = torch.ones(query.shape, dtype=torch.bool) if valid is None else valid
    valid = valid.to(fits.device)
    counts = (fits & valid[..., None]).sum(0)
    features = torch.arange(query.shape[1]) if features is None else features
    return label_features(counts, valid.sum(0), features, thresholds)


@torch.no_grad()
def feature_families(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    features: Int[Tensor, " F"] | Sequence[int] | None = None,
    *,
    thresholds: FamilyThresholds | None = None,
    n_contexts: int = 20,
    tokenizer: Any = None,
    ignore_tokens: Sequence[int] | None = None,
    successors: Int[Tensor, " d_vocab"] | None = None,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    batch_size: int = 16,
    feature_chunk: int = 256,
) -> FeatureFamilies:
    """Label each feature with its family, from DFA at its max-activating contexts and its
    direct logit effect (module docstring).

    Args:
        model: any model a backend supports, with an unembedding.
        sae: a hook_z SAE of the model with a linear encoder (DFA needs one).
        tokens: contexts ``[batch, pos]`` from the model's distribution, or a ``Corpus`` of
            them (its capture and encode are shared).
        features: feature indices (default: all).
        thresholds: the family tests' thresholds (default: ``FamilyThresholds()``).
        n_contexts: max-activating contexts per feature, one per prompt at its peak.
        tokenizer: finds special tokens and successors (default: the model's).
        ignore_tokens: token ids that are never a query nor a top source (default: the
            tokenizer's special tokens, such as BOS).
        successors: successor id per token id, −1 where none (default: ``successor_ids``).
        attention_mask: 0 at padding, which is never a query nor a source.
        batch_size: prompts per forward pass.
        feature_chunk: features classified at once (bounds the ``[F, d_vocab]`` logit table).

    Returns:
        A ``FeatureFamilies``; features that never fire are labelled ``never_fires`` with no
        contexts, never attributed to any position.

    Raises:
        ValueError: bad tokens or features, an SAE DFA refuses, or a model without an
            unembedding.
    """
    batch_size = check_count("batch_size", batch_size)
    corpus = corpus_of(model, tokens, attention_mask, batch_size=batch_size)
    backend, tokens = corpus.backend, corpus.tokens
    corpus.site_of(sae)  # the SAE reads this model's hook_z
    feature_idx = check_features(features, sae.cfg.d_sae)
    n_contexts = check_count("n_contexts", n_contexts)
    feature_chunk = check_count("feature_chunk", feature_chunk)
    thresholds = thresholds or FamilyThresholds()
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(backend)
    d_vocab = backend.unembed().shape[-1]  # a model without an unembedding fails here
    if successors is None:
        successors = successor_ids(tokenizer, d_vocab)
    usable = usable_positions(
        tokens, tokenizer=tokenizer, ignore_tokens=ignore_tokens,
        attention_mask=corpus.attention_mask,
    )  # fmt: skip
    peak_acts, peaks = peak_activations(corpus, sae, feature_idx, usable)
    chosen = _max_activating(peak_acts, n_contexts)  # (N, F)
    counts = torch.zeros(feature_idx.numel(), len(FAMILIES), dtype=torch.long)
    for start in range(0, feature_idx.numel(), feature_chunk):
        cols = slice(start, start + feature_chunk)
        rows = chosen[:, cols].any(1).nonzero().flatten()
        if not rows.numel():
            continue
        logit_z = logit_effects(backend, sae, feature_idx[cols], standardise=True)
        at = torch.where(chosen[:, cols], peaks[:, cols], NO_QUERY)  # only chosen contexts
        peak = dfa_at_peaks(backend, sae, corpus, feature_idx[cols], peaks=at)  # one kernel call
        fits = context_fits(
            tokens[rows], peaks[rows, cols], peak.by_src[rows.to(peak.by_src.device)], logit_z,
            successors=successors, sources=usable[rows], thresholds=thresholds,
        )  # fmt: skip
        counts[cols] += (fits.cpu() & chosen[rows, cols][..., None]).sum(0)
    return label_features(counts, chosen.sum(0), feature_idx, thresholds)


def usable_positions(
    tokens: Int[Tensor, " N pos"],
    *,
    tokenizer: Any = None,
    ignore_tokens: Sequence[int] | None = None,
    attention_mask: Int[Tensor, " N pos"] | None = None,
) -> Bool[Tensor, " N pos"]:
    """True where a position may be a query or a top source: not one of ``ignore_tokens``
    (default: the tokenizer's special tokens) and not padding."""
    ignored = special_token_ids(tokenizer) if ignore_tokens is None else list(ignore_tokens)
    usable = ~torch.isin(tokens.cpu(), torch.tensor(ignored, dtype=torch.long))
    if attention_mask is not None:
        usable &= attention_mask.cpu().bool()
    return usable


def peak_activations(
    corpus: Corpus, sae: SAE[Any], features: Int[Tensor, " F"], usable: Bool[Tensor, " N pos"]
) -> tuple[Float[Tensor, " N F"], Int[Tensor, " N F"]]:
    """Each (prompt, feature)'s largest activation at a usable position, and that position
    (−inf and 0 in a prompt without usable positions), from the corpus's one encode."""
    acts = corpus.activations(sae)[..., features.to(corpus.tokens.device)].float().cpu()
    best = acts.masked_fill(~usable[..., None], float("-inf")).max(1)
    return best.values, best.indices


def _max_activating(peak_acts: Float[Tensor, " N F"], n_contexts: int) -> Bool[Tensor, " N F"]:
    """True at the ``n_contexts`` prompts with each feature's largest peaks, where it fires."""
    top = peak_acts.topk(min(n_contexts, peak_acts.shape[0]), dim=0)
    chosen = torch.zeros_like(peak_acts, dtype=torch.bool)
    chosen.scatter_(0, top.indices, top.values > 0)
    return chosen
