"""Per-feature analyses a dashboard shows beside the DFA: the feature against the induction proxy
(``sla.analysis.proxy_histogram``) and the recursive DFA at its peak (``sla.analysis.rdfa``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Bool, Float, Int
from torch import Tensor

from sae_lens_attn.analysis.proxies import ProxyHistogram, induction_proxy, proxy_histogram
from sae_lens_attn.analysis.recursive_dfa import RDFAResult, rdfa
from sae_lens_attn.backends import UnsupportedModelError
from sae_lens_attn.site import AttnSite, saes_by_layer
from sae_lens_attn.viz.dashboard.data import FeatureData


@dataclass(frozen=True)
class PeakRDFA:
    """The recursive DFA of a feature at its strongest context's peak, or why there is none."""

    result: RDFAResult | None
    """The split (None when ``note`` says why there is none)."""
    note: str
    """What the reader should know: nothing upstream (layer 0), layers without an SAE, or why
    no split was made (the feature never fires; the model's residual stream is not a sum)."""


def induction_histograms(
    acts: Float[Tensor, "rows ctx F"],
    tokens: Int[Tensor, "rows ctx"],
    features: Sequence[int],
    *,
    counted: Bool[Tensor, "rows ctx"] | None = None,
    bins: int = 20,
) -> dict[int, ProxyHistogram]:
    """Each feature's activations against ``induction_proxy(tokens)`` (``acts[..., i]`` is
    feature ``features[i]``)."""
    proxy = induction_proxy(tokens.cpu())
    return {
        int(feature): proxy_histogram(
            acts[..., column].cpu(), proxy, counted=counted, bins=bins, name="induction"
        )
        for column, feature in enumerate(features)
    }


def peak_rdfa(
    model: Any,
    sae: Any,
    upstream_saes: Sequence[Any],
    tokens: Int[Tensor, "rows ctx"],
    data: FeatureData,
    *,
    expand: int = 3,
) -> PeakRDFA:
    """RDFA of ``data.feature`` at the peak of its strongest context, through the SAEs of the
    earlier layers in ``upstream_saes`` (layers without one count as error terms). A model that
    recursive DFA cannot split (``UnsupportedModelError``) gets a note saying why instead.

    Raises:
        ValueError: an upstream SAE is not of an earlier layer, or two share a layer.
    """
    layer = AttnSite.from_sae(sae, model).layer
    upstream = list(saes_by_layer(upstream_saes, model)) if upstream_saes else []
    if any(below >= layer for below in upstream):
        raise ValueError(
            f"upstream SAEs must be of distinct layers below the SAE's layer {layer}, got "
            f"layers {upstream}"
        )
    if not data.contexts:
        return PeakRDFA(None, "The feature never fires on these tokens: nothing to split.")
    context = data.contexts[0]
    row = tokens[context.prompt, : context.position + 1]  # causal: later tokens change nothing
    try:
        with warnings.catch_warnings():  # the result's notes say the same; the page shows them
            warnings.simplefilter("ignore")
            result = rdfa(
                model, [sae, *upstream_saes], row, layer, data.feature, context.position,
                expand=expand,
            )  # fmt: skip
    except UnsupportedModelError as err:  # a model rdfa cannot split: the panel says why
        return PeakRDFA(None, f"No recursive DFA for this model: {err}")
    notes = list(result.notes)
    if layer == 0:
        notes.insert(
            0,
            "Layer 0 has no upstream attention layer: its features read only the embeddings "
            "and biases, so the tree has nothing to recurse into.",
        )
    return PeakRDFA(result, " ".join(notes))
