"""Direct feature attribution (DFA): a feature's pre-activation split over source positions and heads.

For layer L, query q, source s, head h and feature f (DESIGN.md):

    DFA_f[q, h, s] = n[q] · A_h[q, s] · (v_h[s] · W[h-block, f])
    c_f            = b_enc[f] − b_dec · W_enc[:, f]     (no b_dec term if not apply_b_dec_to_input)
    Σ_{h,s} DFA_f[q, h, s] + c_f = pre_f[q]            (SAELens's ``hook_sae_acts_pre``)

``n[q]`` and ``W`` carry the SAE's ``normalize_activations``, which SAELens applies to z before
subtracting b_dec. Each supported value is a per-token factor times an optional centring, both
frozen at the statistics of the token's own z, so the split stays exact:

- ``"none"``: ``n[q] = 1``, ``W = W_enc``.
- ``"constant_norm_rescale"``: ``n[q] = √d_in / ‖z[q]‖``, ``W = W_enc``.
- ``"layer_norm"``: ``n[q] = 1 / (std(z[q]) + 1e-5)`` (unbiased std, SAELens's eps) and
  ``W = W_enc − mean_i W_enc[i, :]``: centring z is the linear map ``z ↦ z − mean(z)``, whose
  adjoint centres each encoder column, so head h's block reads ``v_h`` through the centred column.
- ``"expected_average_only_in"``, ``"covariance_whitening"``: SAELens applies these outside the
  SAE (its activation scaler, during training) and folds them into the weights when training
  ends; an SAE that still carries the flag encodes raw z without them, and so does DFA
  (``n[q] = 1``, ``W = W_enc``): ``pre_act`` is that SAE's own ``hook_sae_acts_pre``.

Any other value is refused.

Activations: ``acts`` is the SAE's own ``encode``. In terms of ``pre_act``: standard SAEs give
``relu(pre)``; JumpReLU (BatchTopK as SAELens saves it) ``relu(pre) · [pre > threshold]``; TopK
``activation_scale · pre`` for the k features with the largest ``activation_scale · pre`` among
all ``d_sae`` (after ReLU), else 0, where ``activation_scale = ‖W_dec[f]‖`` with
``rescale_acts_by_decoder_norm`` and 1 without (``hook_sae_acts_pre`` is before that scaling);
a BatchTopK training SAE selects over the batch.

One kernel, ``attribute``, serves both entry points: ``dfa`` (the same query positions for every
feature) and ``dfa_at_peaks`` (each feature at its own query, usually its peak). Values are
projected onto the encoder's head-blocks with batched matmuls ``[h, F, d_head] @ [h, d_head, s]``
and multiplied by the queries' pattern rows, then summed over heads (by source) and over sources
(by head); nothing of shape ``[batch, q, s, n_heads*d_head]`` or ``[batch, q, s, n_heads, F]`` is
ever built. With a query per feature, each prompt's (query, feature) entries are sorted by how
far back their query attends and projected in chunks over those sources only, so causal
attention costs about half a ``[tokens × d_in] @ [d_in × F]`` matmul of projection (less when
peaks sit early). Pre-activations are computed at the query positions only. The arithmetic runs
in float32 (float64 if the model or SAE is float64), whatever the model's dtype.

Entries without a query (a feature that never fires in a prompt, under ``dfa_at_peaks``) have
position −1, ``fired`` and ``mask`` False and NaN in every value: nothing is attributed to any
position. Entries at padded query positions have ``mask`` False and zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.backends import AttnCapture
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.sae_adapter import check_device, compute_dtype, feature_acts
from sae_lens_attn.site import AttnSite
from sae_lens_attn.validation import check_count, check_features, check_positions

LINEAR_ENCODER_ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk")
"""Architectures whose pre-activation is ``(norm(z) − b_dec) W_enc + b_enc``. A BatchTopK SAE is
saved by SAELens as JumpReLU (its inference architecture); ``"batchtopk"`` is the training object."""
RESHAPE_ACTIVATIONS = ("hook_z", "none")
"""``reshape_activations`` values DFA accepts: both read z flattened head-major (``"none"`` is what
SAELens's runner saves for hook_z SAEs)."""
NO_QUERY = -1
"""Query position of an entry that has none (a feature that never fires in the prompt)."""


@dataclass(frozen=True)
class InputNormalisation:
    """How DFA applies one ``normalize_activations`` value: z ↦ n(z) · (z − [centres]·mean(z))."""

    scale: Callable[[Float[Tensor, " *tokens d_in"]], Float[Tensor, " *tokens"]]
    """The per-token factor n(z), computed from each token's own z."""
    centres: bool
    """Whether z's mean over ``d_in`` is subtracted first (then encoder columns are centred)."""


def _unit(z: Tensor) -> Tensor:
    return torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)


def _constant_norm(z: Tensor) -> Tensor:
    return z.shape[-1] ** 0.5 / z.norm(dim=-1)


def _layer_norm(z: Tensor) -> Tensor:
    return 1 / (z.std(dim=-1) + 1e-5)  # SAELens `run_time_activation_ln_in`, eps=1e-5


NORMALISATIONS: dict[str, InputNormalisation] = {
    "none": InputNormalisation(_unit, centres=False),
    "expected_average_only_in": InputNormalisation(_unit, centres=False),
    "covariance_whitening": InputNormalisation(_unit, centres=False),
    "constant_norm_rescale": InputNormalisation(_constant_norm, centres=False),
    "layer_norm": InputNormalisation(_layer_norm, centres=True),
}
"""Each ``normalize_activations`` value DFA supports (module docstring), by name."""


@dataclass(frozen=True)
class DFAResult:
    """DFA of some features at some query positions of a token batch (``dfa``, ``dfa_at_peaks``).

    Every entry ``[prompt, q, feature]`` stands for one query position: ``positions`` says which.
    ``dfa`` gives every feature the same positions (``q`` indexes the requested ones, all by
    default); ``dfa_at_peaks`` gives each feature its own peak (``q`` = 1). Entries at padded
    positions are zero with ``mask`` False; entries without a position (``positions`` −1: the
    feature never fires in the prompt) are NaN with ``mask`` and ``fired`` False.
    """

    pre_act: Float[Tensor, " batch q F"]
    """Encoder pre-activation of each feature (SAELens's ``hook_sae_acts_pre``), from z directly."""
    bias: Float[Tensor, " F"]
    """``c_f = b_enc[f] − b_dec · W_enc[:, f]`` (no b_dec term when the SAE does not subtract it
    from its input): the part of ``pre_act`` no source explains."""
    by_src: Float[Tensor, " batch q s F"]
    """Contribution of each source position, summed over heads (``input_scale`` included);
    ``by_src.sum(2) + bias == pre_act``."""
    by_head: Float[Tensor, " batch q n_heads F"]
    """Contribution of each head, summed over source positions (``input_scale`` included)."""
    features: Int[Tensor, " F"]
    """The feature indices, in the order of the last dimension."""
    positions: Int[Tensor, " batch q F"]
    """The query position of each entry (−1 where there is none)."""
    mask: Bool[Tensor, " batch q F"]
    """True where the entry is attributed: a real (non-padding) query position."""
    acts: Float[Tensor, " batch q F"]
    """The SAE's own feature activation there (its ``encode``: ReLU, JumpReLU threshold, TopK
    selection over all features, ``activation_scale``)."""
    fired: Bool[Tensor, " batch q F"]
    """True where that activation is positive: the feature fires at the query position."""
    activation_scale: Float[Tensor, " F"]
    """Factor between pre-activation and activation: ``‖W_dec[f]‖`` for TopK/BatchTopK SAEs with
    ``rescale_acts_by_decoder_norm`` (a selected feature's activation is ``scale · pre_act``), else 1."""
    input_scale: Float[Tensor, " batch q F"]
    """The per-token factor ``n[q]`` of the SAE's input normalisation (1 without one)."""


@dataclass(frozen=True)
class EncoderTerms:
    """The affine encoder of some features as DFA splits it: ``pre = n · (z · weight) + bias``."""

    weight: Float[Tensor, " d_in F"]
    """``W_enc[:, features]``, columns centred when the input normalisation centres z."""
    bias: Float[Tensor, " F"]
    """``c_f = b_enc[f] − [apply_b_dec_to_input] · b_dec · W_enc[:, f]``."""
    activation_scale: Float[Tensor, " F"]
    """``DFAResult.activation_scale``."""
    normalisation: InputNormalisation
    """The SAE's input normalisation."""


@torch.no_grad()
def dfa(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    features: Int[Tensor, " F"] | list[int] | None = None,
    positions: Int[Tensor, " batch"] | Int[Tensor, " batch q"] | None = None,
    *,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    feature_chunk: int = 1024,
) -> DFAResult:
    """DFA by source position and by head for a hook_z SAE, on either backend.

    Args:
        model: a ``HookedTransformer``, a Hugging Face causal LM (plain or nnsight), or a backend.
        sae: a SAELens SAE on this model's hook_z, of a linear-encoder architecture (standard,
            TopK, JumpReLU, BatchTopK), any ``apply_b_dec_to_input``, a supported
            ``normalize_activations`` (module docstring), on the model's device.
        tokens: token ids, or a ``Corpus`` holding them (its capture is shared).
        features: feature indices (default: all).
        positions: query positions per row, ``[batch]`` or ``[batch, q]`` (default: all).
        attention_mask: 0 at padding; padding is never attributed.
        feature_chunk: features computed at once; bounds memory for large dictionaries.

    Returns:
        A ``DFAResult`` whose ``by_src.sum(2) + bias`` equals ``pre_act``.

    Raises:
        ValueError: the SAE is not a hook_z SAE of this model, has an unsupported architecture,
            normalisation or reshaping, or lives on another device than the model's activations;
            bad tokens, features, positions or attention mask.

    Examples:
        >>> acts = sla.analysis.dfa(model, sae, tokens, features=[12, 99], positions=peaks)
        >>> acts.by_src[0, 0, :, 0]   # how much each source position drove feature 12
    """
    corpus = corpus_of(model, tokens, attention_mask)
    feature_idx = check_features(features, sae.cfg.d_sae)
    query = check_positions(positions, corpus.tokens)
    feature_chunk = check_count("feature_chunk", feature_chunk)
    site, capture = dfa_capture(corpus, sae)
    return attribute(
        *kernel_inputs(capture),
        sae,
        site,
        feature_idx,
        query,
        real=corpus.real,
        feature_chunk=feature_chunk,
    )


def attribute(
    pattern: Float[Tensor, " batch n_heads pos s"],
    values: Float[Tensor, " batch s n_heads d_head"],
    z: Float[Tensor, " batch pos d_in"],
    sae: SAE[Any],
    site: AttnSite,
    features: Int[Tensor, " F"],
    query: Int[Tensor, " batch q"] | Int[Tensor, " batch q F"],
    *,
    acts: Float[Tensor, " batch pos F"] | None = None,
    real: Bool[Tensor, " batch pos"] | None = None,
    feature_chunk: int = 256,
) -> DFAResult:
    """The DFA kernel on captured tensors: ``dfa`` and ``dfa_at_peaks`` both run it.

    Args:
        pattern: attention probabilities (zero at padded sources).
        values: values expanded to query heads, in the SAE's value-bias convention.
        z: flattened z in that convention, the SAE's input.
        sae: the SAE (checked by the caller: ``_check_sae``, ``check_device``).
        site: its attention site.
        features: feature indices.
        query: query positions shared by all features ``[batch, q]``, or one per feature
            ``[batch, q, F]`` (e.g. each feature's peak; −1 for none).
        acts: the SAE's activations of ``features`` at every position, if already computed
            (else its ``encode`` runs at the query positions).
        real: True at real (non-padding) positions (default: all).
        feature_chunk: features (with ``[batch, q]`` queries) or one prompt's entries (with
            ``[batch, q, F]`` queries) computed at once.
    """
    feature_chunk = check_count("feature_chunk", feature_chunk)
    batch, n_pos = z.shape[:2]
    dtype = compute_dtype(pattern, values, z, sae.W_enc)
    device = z.device
    z = z.to(dtype)
    terms = encoder_terms(sae, features, dtype)
    n_features = features.numel()
    shared = query.ndim == 2
    query = query.to(device)
    per_feature = query[..., None].expand(*query.shape, n_features) if shared else query
    has_query = per_feature >= 0
    at = per_feature.clamp(min=0)  # (B, Q, F)
    rows = torch.arange(batch, device=device)[:, None, None]
    scale = terms.normalisation.scale(z)  # (B, T)
    scale_at = scale[rows, at]  # (B, Q, F)
    real = torch.ones(batch, n_pos, dtype=torch.bool, device=device) if real is None else real
    mask = real.to(device)[rows, at] & has_query

    weight_rows = terms.weight.T.contiguous()  # (F, d_in): each feature's encoder column
    contract = _shared_queries if shared else _own_queries
    by_src, by_head, dot = contract(
        pattern.to(dtype), values.to(dtype), z, weight_rows, query, site, feature_chunk
    )
    if terms.normalisation.scale is not _unit:  # n[q] scales a whole pattern row
        by_src.mul_(scale_at[:, :, None])
        by_head.mul_(scale_at[:, :, None])
        dot.mul_(scale_at)
    pre_act = dot.add_(terms.bias)

    at_query = _acts_at(sae, z, site, features, acts, at, shared).to(dtype)
    for values_at, keep in (
        (pre_act, mask),
        (at_query, mask),
        (scale_at, mask),
        (by_src, mask[:, :, None]),
        (by_head, mask[:, :, None]),
    ):
        _blank(values_at, keep, has_query if keep.ndim == 3 else has_query[:, :, None])
    return DFAResult(
        pre_act=pre_act,
        bias=terms.bias,
        by_src=by_src,
        by_head=by_head,
        features=features,
        positions=per_feature if shared else torch.where(has_query, per_feature, NO_QUERY),
        mask=mask,
        acts=at_query,
        fired=mask & (at_query > 0),
        activation_scale=terms.activation_scale,
        input_scale=scale_at,
    )


def kernel_inputs(
    capture: AttnCapture,
) -> tuple[
    Float[Tensor, " batch n_heads pos s"],
    Float[Tensor, " batch s n_heads d_head"],
    Float[Tensor, " batch pos d_in"],
]:
    """The pattern, values and flattened z of a ``dfa_capture``: ``attribute``'s first three
    arguments."""
    assert capture.pattern is not None and capture.values is not None  # dfa_capture asks both
    return capture.pattern, capture.values, capture.z_flat


def _shared_queries(
    pattern: Float[Tensor, " batch n_heads pos s"],
    values: Float[Tensor, " batch s n_heads d_head"],
    z: Float[Tensor, " batch pos d_in"],
    weight_rows: Float[Tensor, " F d_in"],
    query: Int[Tensor, " batch q"],
    site: AttnSite,
    feature_chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """by_src, by_head and ``z[q] · W`` (unscaled) when every feature has the same queries.

    Per feature chunk, one batched matmul ``[H, F, D] @ [H, D, B·S]`` projects the values onto
    the head-blocks; the pattern rows of the queries are then contracted with it."""
    batch, n_pos = z.shape[:2]
    n_q, n_features = query.shape[1], weight_rows.shape[0]
    values_by_head = values.permute(2, 3, 0, 1).reshape(site.n_heads, site.d_head, -1)
    values_by_head = values_by_head.contiguous()  # (H, D, B·S)
    rows = torch.arange(batch, device=z.device)[:, None]
    rows_at_query = pattern.permute(0, 2, 1, 3)[rows, query]  # (B, Q, H, S)
    by_src = z.new_empty(batch, n_q, n_pos, n_features)
    by_head = z.new_empty(batch, n_q, site.n_heads, n_features)
    for start in range(0, n_features, feature_chunk):
        chunk = slice(start, start + feature_chunk)
        by_block = weight_rows[chunk].view(-1, site.n_heads, site.d_head).transpose(0, 1)
        projected = torch.bmm(by_block.contiguous(), values_by_head)  # v_h[s] · W[h-block, f]
        projected = projected.unflatten(2, (batch, n_pos))  # (H, F, B, S)
        by_src[..., chunk] = torch.einsum("bqhs,hfbs->bqsf", rows_at_query, projected)
        by_head[..., chunk] = torch.einsum("bqhs,hfbs->bqhf", rows_at_query, projected)
    return by_src, by_head, z[rows, query] @ weight_rows.T


def _own_queries(
    pattern: Float[Tensor, " batch n_heads pos s"],
    values: Float[Tensor, " batch s n_heads d_head"],
    z: Float[Tensor, " batch pos d_in"],
    weight_rows: Float[Tensor, " F d_in"],
    query: Int[Tensor, " batch q F"],
    site: AttnSite,
    feature_chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """by_src, by_head and ``z[q_f] · W[:, f]`` (unscaled) when each feature has its own queries.

    Per prompt, the entries (query, feature) are sorted by how far back their query attends
    and taken in chunks. A chunk needs only the sources up to the farthest one its queries
    attend to (under causal attention, up to its last query): values are projected onto the
    chunk's encoder columns over those sources only, ``[H, F, D] @ [H, D, s]``, and multiplied
    by the chunk's pattern rows. by_src and by_head come back as (non-contiguous) views of
    entry-major buffers, so each feature's row is contiguous."""
    batch, n_heads, _, n_src = pattern.shape
    n_q, n_features = query.shape[1:]
    values_by_prompt = values.permute(0, 2, 3, 1).contiguous()  # (B, H, D, S)
    sources = torch.arange(n_src, device=pattern.device)
    reach = torch.where((pattern != 0).any(1), sources, -1).amax(-1) + 1  # (B, T): sources read
    entries = query.flatten(1)  # (B, Q·F): entry j·F + f holds its query position
    by_src = z.new_zeros(batch, entries.shape[1], n_src)
    by_head = z.new_zeros(batch, entries.shape[1], n_heads)
    dot = z.new_zeros(batch, entries.shape[1])
    for b in range(batch):
        real = (entries[b] >= 0).nonzero().flatten()
        if not real.numel():  # no feature has a query in this prompt
            continue
        needs = reach[b, entries[b, real]]
        order = needs.argsort(stable=True)
        for chunk, chunk_needs in zip(
            real[order].split(feature_chunk), needs[order].split(feature_chunk), strict=True
        ):
            at = entries[b, chunk]  # the chunk's queries
            width = int(chunk_needs[-1])  # sources they attend to: 0..width-1
            weight = weight_rows.index_select(0, chunk % n_features)  # (E, d_in)
            by_block = weight.view(-1, n_heads, site.d_head).transpose(0, 1)  # (H, E, D)
            projected = torch.bmm(by_block, values_by_prompt[b, :, :, :width])  # (H, E, s)
            rows = pattern[b, :, :, :width].index_select(1, at)  # (H, E, s): A_h[q_e, s]
            rows.mul_(projected)  # DFA_e[h, s]
            by_src[b, :, :width].index_copy_(0, chunk, rows.sum(0))
            by_head[b].index_copy_(0, chunk, rows.sum(-1).T)
            dot[b].index_copy_(0, chunk, (z[b].index_select(0, at) * weight).sum(-1))
    by_src = by_src.view(batch, n_q, n_features, n_src).transpose(2, 3)
    by_head = by_head.view(batch, n_q, n_features, n_heads).transpose(2, 3)
    return by_src, by_head, dot.view(batch, n_q, n_features)


def _acts_at(
    sae: SAE[Any],
    z: Tensor,
    site: AttnSite,
    features: Tensor,
    acts: Tensor | None,
    at: Tensor,
    shared: bool,
) -> Tensor:
    """The SAE's activations of ``features`` at each entry's query position ``at``."""
    rows = torch.arange(z.shape[0], device=z.device)[:, None]
    if acts is not None:
        return acts.to(z.device).gather(1, at)
    z_heads = z.unflatten(-1, (site.n_heads, site.d_head))
    if shared:
        return feature_acts(sae, z_heads[rows, at[..., 0]], features)  # only the queried tokens
    return feature_acts(sae, z_heads, features).gather(1, at)


def _blank(values: Tensor, keep: Tensor, has_query: Tensor) -> None:
    """In place: 0 where ``keep`` is False, NaN where there is no query at all."""
    if not keep.all():
        values.masked_fill_(~keep, 0.0)
    if not has_query.all():
        values.masked_fill_(~has_query, float("nan"))


def encoder_terms(sae: SAE[Any], features: Int[Tensor, " F"], dtype: torch.dtype) -> EncoderTerms:
    """The affine part of ``sae``'s encoder on ``features``, as DFA splits it (module docstring)."""
    normalisation = NORMALISATIONS[_check_normalisation(sae)]
    W_enc = sae.W_enc.detach()[:, features].to(dtype)
    bias = _b_enc(sae)[features].to(dtype)
    if sae.cfg.apply_b_dec_to_input:
        bias = bias - sae.b_dec.detach().to(dtype) @ W_enc
    weight = W_enc - W_enc.mean(0) if normalisation.centres else W_enc
    activation_scale = torch.ones_like(bias)
    if sae.cfg.architecture() in ("topk", "batchtopk") and getattr(
        sae.cfg, "rescale_acts_by_decoder_norm", False
    ):
        activation_scale = sae.W_dec.detach()[features].to(dtype).norm(dim=-1)
    return EncoderTerms(weight, bias, activation_scale, normalisation)


def dfa_capture(corpus: Corpus, sae: SAE[Any]) -> tuple[AttnSite, AttnCapture]:
    """The SAE's site, and z, patterns and values there for DFA: in the SAE's value-bias
    convention, with no attention to padded source positions (the corpus's one capture).

    Raises:
        ValueError: the SAE is not a hook_z SAE DFA supports, or its parameters are not on the
            device of the model's activations.
    """
    site, convention = corpus.site_of(sae)
    _check_sae(sae)
    capture = corpus.capture(site, convention, pattern=True, values=True)
    check_device(sae, capture.z)
    return site, capture


def _check_sae(sae: SAE[Any]) -> None:
    architecture = sae.cfg.architecture()
    if architecture not in LINEAR_ENCODER_ARCHITECTURES:
        raise ValueError(
            f"DFA needs a linear encoder pre-activation; SAE architecture {architecture!r} is not "
            f"supported (supported: {list(LINEAR_ENCODER_ARCHITECTURES)})"
        )
    reshape = sae.cfg.reshape_activations
    if reshape not in RESHAPE_ACTIVATIONS:
        raise ValueError(
            f"DFA reads z flattened head-major; SAE reshape_activations={reshape!r} is not "
            f"supported (valid: {list(RESHAPE_ACTIVATIONS)})"
        )
    _check_normalisation(sae)


def _check_normalisation(sae: SAE[Any]) -> str:
    value = sae.cfg.normalize_activations
    if value not in NORMALISATIONS:
        raise ValueError(
            f"DFA cannot split the pre-activation exactly under normalize_activations={value!r} "
            f"(supported: {list(NORMALISATIONS)})"
        )
    return value


def _b_enc(sae: SAE[Any]) -> Tensor:
    b_enc = getattr(sae, "b_enc", None)
    return torch.zeros(sae.cfg.d_sae, device=sae.W_enc.device) if b_enc is None else b_enc.detach()
