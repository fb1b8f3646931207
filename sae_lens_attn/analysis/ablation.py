"""Feature ablation with the error term kept: each feature's effect on a metric, per prompt.

With an SAE spliced at its layer (``interventions``), editing feature f at prompt i's positions
changes z there by ``Δz = (a'_f − a_f) · d_f``, ``d_f = decode(e_f) − decode(0)`` (``W_dec[f]``,
over ``‖W_dec[f]‖`` for TopK SAEs that rescale by it): a zero ablation is ``z − a_f·W_dec[f]``.
Zeroing the error term sets z to the reconstruction there (``Δz = −(z − decode(a))``). The clean
metric is the model's own: the splice with no edit is the identity.

Two methods (``ABLATION_METHODS``):

- ``"patch"``: real forward passes. The prompt batch is repeated once per feature (as many
  features per pass as ``batch_size`` rows allow) and each replica gets its feature's ``Δz`` at
  each prompt's own positions, so the 24,576 features of a GPT-2 Small layer take
  ``24,576 · batch / batch_size`` passes. A feature whose edit changes nothing (inactive at the
  positions, for ``"zero"``) needs no pass: its delta is 0.
- ``"attribution"``: attribution patching (Nanda; Syed et al.), every feature and the error term
  from one forward and one backward pass of the clean run: ``delta[f, i] ≈ Σ_q ∂metric_i/∂z[i, q]
  · Δz_f[i, q]``, over the positions q of prompt i.

On the embedded default model (layer 1, zero ablation of the 161 features live at the middle of a
repeated span's second copy, 24 prompts), attribution and patching agree at Pearson r = 0.83 over
the (feature, prompt) pairs where a feature fired (``docs/analyzers.md``, "Causal analysis").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.interventions import (
    EDIT_MODES,
    EditMode,
    PromptPositions,
    Source,
    check_aligned,
    check_fixed_decoder,
    decode_like,
    edited_values,
    feature_rows,
    metric_under_deltas,
    metric_values,
    prompt_positions,
    reference_means,
    sae_site,
)
from sae_lens_attn.analysis.metrics import Metric
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.sae_adapter import check_device, compute_dtype
from sae_lens_attn.validation import check_count, check_features

AblationMethod = Literal["patch", "attribution"]
"""How ``feature_ablation`` measures effects: real forward passes, or one backward pass."""
ABLATION_METHODS: tuple[AblationMethod, ...] = get_args(AblationMethod)


@dataclass(frozen=True)
class FeatureAblation:
    """Each feature's effect on a metric, per prompt, with the SAE spliced and its error kept."""

    features: Int[Tensor, " F"]
    """The features, in the order of ``delta``'s rows."""
    clean: Float[Tensor, " batch"]
    """The metric with the SAE spliced and nothing edited (the model's own output)."""
    delta: Float[Tensor, " F batch"]
    """The metric after editing feature f at each prompt's positions, minus ``clean``."""
    error_delta: Float[Tensor, " batch"]
    """The same for the error term zeroed at those positions (z set to the reconstruction)."""
    method: AblationMethod
    """``"patch"`` (measured) or ``"attribution"`` (estimated from one backward pass)."""
    mode: EditMode
    """The edit applied to each feature (``EDIT_MODES``)."""


@torch.no_grad()  # the attribution pass turns gradients on for itself
def feature_ablation(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    metric: Metric,
    positions: Any,
    features: Int[Tensor, " F"] | list[int] | None = None,
    mode: EditMode = "zero",
    method: AblationMethod = "patch",
    *,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    value: float | Tensor | None = None,
    reference: Int[Tensor, " n pos"] | Corpus | None = None,
    source: Source | None = None,
    batch_size: int = 64,
) -> FeatureAblation:
    """Each feature's effect on ``metric`` when edited at each prompt's own ``positions``.

    Args:
        model: a ``HookedTransformer``, a ``TransformerBridge``, a Hugging Face causal LM (plain
            or nnsight), or a backend.
        sae: a hook_z SAE of that model whose decode is the same affine map at every position
            (any ``normalize_activations`` but the run-time ones), on the model's device.
        tokens: the prompts' token ids, or a ``Corpus`` holding them (its capture is shared).
        metric: logits ``[batch, pos, vocab]`` → ``[batch]`` (e.g. ``logit_diff``).
        positions: per prompt, ``Int[b]``, ``Int[b, k]`` or a mask ``Bool[b, pos]``.
        features: the features (default: every feature active at those positions in any prompt).
        mode: the edit (``EDIT_MODES``): ``"zero"``, ``"scale"`` / ``"set"`` (``value``),
            ``"mean"`` (the mean over ``reference``, or ``value`` as means ``[d_sae]``),
            ``"patch"`` (activations of ``source`` at its aligned positions).
        method: ``"patch"`` (forward passes) or ``"attribution"`` (one backward pass).
        attention_mask: 0 at padding; positions there are refused.
        value: the ``"scale"`` factor or ``"set"`` value: a number or ``[d_sae]``.
        reference: token ids (or a ``Corpus``) whose mean activations ``"mean"`` sets.
        source: the other run of ``"patch"``.
        batch_size: rows per forward pass of ``"patch"`` (features per pass: ``batch_size //
            batch``, at least one).

    Returns:
        ``FeatureAblation``: ``features``, ``clean [b]``, ``delta [F, b]``, ``error_delta [b]``.

    Raises:
        ValueError: an SAE of another model or one with run-time normalisation, positions out of
            range or on padding, features past ``d_sae``, an unknown mode or method, a missing
            value, reference or source, a metric that does not return one value per prompt.

    Examples:
        >>> prompts = sla.analysis.ioi_prompts(tokenizer)
        >>> result = feature_ablation(model, sae5, prompts.tokens, prompts.logit_diff(),
        ...                           prompts.word_idx["S2"],
        ...                           attention_mask=prompts.attention_mask)
        >>> result.delta.mean(1).topk(10, largest=False)  # the features the metric needs most
    """
    corpus = corpus_of(model, tokens, attention_mask)
    backend = corpus.backend
    site, convention = sae_site(backend, sae)
    check_fixed_decoder(sae)
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(ABLATION_METHODS)}")
    if mode not in EDIT_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {list(EDIT_MODES)}")
    batch_size = check_count("batch_size", batch_size)
    value = _mode_value(corpus, sae, mode, value, reference, source)
    where = prompt_positions(positions, corpus.tokens.shape, corpus.attention_mask)
    z = corpus.z(sae)
    check_device(sae, z)
    acts = corpus.activations(sae)
    at = (where.rows.to(z.device), where.cols.to(z.device))
    acts_at = acts[at]  # (N, d_sae)
    if features is None:
        chosen = (acts_at != 0).any(0).nonzero().flatten().cpu()
    else:
        chosen = check_features(features, sae.cfg.d_sae)
    index = chosen.to(z.device)
    source_at = None if source is None else _source_acts(corpus, sae, source, where)[:, index]
    dtype = compute_dtype(z, sae.W_dec)
    current = acts_at[:, index].to(dtype)
    change = edited_values(mode, current, value, source_at, index, "features") - current  # (N, F)
    rows = feature_rows(sae, chosen).to(dtype)  # (F, d_in)
    error_at = (z.to(dtype) - decode_like(sae, z, acts).to(dtype)).flatten(-2)[at]  # (N, d_in)
    run = _attribute if method == "attribution" else _patch
    clean, delta, error_delta = run(
        corpus, site, convention, metric, where, change, rows, -error_at, batch_size
    )
    return FeatureAblation(
        features=chosen,
        clean=clean,
        delta=delta,
        error_delta=error_delta,
        method=method,
        mode=mode,
    )


def _mode_value(
    corpus: Corpus,
    sae: SAE[Any],
    mode: EditMode,
    value: float | Tensor | None,
    reference: Int[Tensor, " n pos"] | Corpus | None,
    source: Source | None,
) -> float | Tensor | None:
    """The value ``edited_values`` takes for ``mode``, after checking what was given."""
    if (mode == "patch") != (source is not None):
        raise ValueError(
            f"feature_ablation takes a source (the other run) exactly in mode 'patch'; got mode "
            f"{mode!r} with source={'given' if source is not None else None}"
        )
    if mode == "mean":
        if (reference is None) == (value is None):
            raise ValueError(
                "mode 'mean' needs a reference set: give reference= (token ids or a Corpus) or "
                "value= (mean activations [d_sae]), exactly one of them"
            )
        if reference is not None:
            return reference_means(corpus.backend, sae, reference).acts
        return value
    if reference is not None:
        raise ValueError(f"a reference is used by mode 'mean' only, got mode {mode!r}")
    if mode in ("scale", "set") and value is None:
        raise ValueError(f"mode {mode!r} needs a value (a number or [d_sae]), got none")
    if mode in ("zero", "patch") and value is not None:
        raise ValueError(f"mode {mode!r} takes no value, got {value!r}")
    return value


def _source_acts(
    corpus: Corpus, sae: SAE[Any], source: Source, where: PromptPositions
) -> Float[Tensor, " N d_sae"]:
    """The SAE's activations in the ``source`` run at its positions aligned with ``where``."""
    other = Corpus(corpus.backend, source.tokens, source.attention_mask)
    there = prompt_positions(
        source.positions, other.tokens.shape, source.attention_mask, name="Source.positions"
    )
    check_aligned(where.counts, there.counts, ("positions", "Source.positions"))
    acts = other.activations(sae)
    return acts[there.rows.to(acts.device), there.cols.to(acts.device)]


def _patch(
    corpus: Corpus,
    site: Any,
    convention: Any,
    metric: Metric,
    where: PromptPositions,
    change: Float[Tensor, " N F"],
    rows: Float[Tensor, " F d_in"],
    error_change: Float[Tensor, " N d_in"],
    batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clean metric, and the metric per feature and for the error term, by forward passes."""
    backend, tokens, mask = corpus.backend, corpus.tokens, corpus.attention_mask
    batch = tokens.shape[0]
    with torch.no_grad():
        logits = backend.forward(tokens, attention_mask=mask)
    assert logits is not None
    clean = metric_values(metric, logits, batch).detach().float().cpu()
    moved = (change != 0).any(0).nonzero().flatten()  # features whose edit changes z
    shape = (len(where.rows), site.n_heads, site.d_head)

    def deltas_of(jobs: range) -> Mapping[int, Tensor]:
        parts = []
        for job in jobs:
            if job == moved.numel():  # the last job: the error term
                parts.append(error_change.reshape(shape))
            else:
                f = moved[job]
                parts.append((change[:, f, None] * rows[f]).reshape(shape))
        return {site.layer: torch.stack(parts)}

    measured = metric_under_deltas(
        backend, tokens, mask, metric, where, moved.numel() + 1, deltas_of, batch_size=batch_size
    )
    delta = torch.zeros(change.shape[1], batch)
    delta[moved.cpu()] = measured[:-1] - clean
    return clean, delta, measured[-1] - clean


def _attribute(
    corpus: Corpus,
    site: Any,
    convention: Any,
    metric: Metric,
    where: PromptPositions,
    change: Float[Tensor, " N F"],
    rows: Float[Tensor, " F d_in"],
    error_change: Float[Tensor, " N d_in"],
    batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clean metric, and the first-order estimates ``∂metric/∂z · Δz`` from one backward pass."""
    backend, tokens, mask = corpus.backend, corpus.tokens, corpus.attention_mask
    batch = tokens.shape[0]
    leaves: list[Tensor] = []

    def leaf(z: Tensor) -> Tensor:
        held = z.detach().requires_grad_(True)  # the gradient at z, in any convention
        leaves.append(held)
        return held

    with torch.enable_grad(), backend.splicing({site: leaf}, convention=convention):
        logits = backend.forward(tokens, attention_mask=mask)
        assert logits is not None
        values = metric_values(metric, logits, batch)
        (grad,) = torch.autograd.grad(values.sum(), leaves[-1])
    at = (where.rows.to(grad.device), where.cols.to(grad.device))
    grad_at = grad[at].flatten(-2).to(rows)  # (N, d_in)
    per_entry = (grad_at @ rows.T) * change  # (N, F)
    by_prompt = torch.zeros(batch, change.shape[1], dtype=per_entry.dtype, device=grad.device)
    by_prompt.index_add_(0, at[0], per_entry)
    error = torch.zeros(batch, dtype=per_entry.dtype, device=grad.device)
    error.index_add_(0, at[0], (grad_at * error_change).sum(-1))
    return values.detach().float().cpu(), by_prompt.T.float().cpu(), error.float().cpu()
