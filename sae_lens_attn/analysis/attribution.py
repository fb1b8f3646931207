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

Values are projected onto the encoder first (``[batch, s, n_heads, F]``), features in chunks, so
nothing of shape ``[batch, q, s, n_heads*d_head]`` is ever built. The arithmetic runs in float32
(float64 if the model or SAE is float64), whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.backends import AttnBackend, AttnCapture, backend_for
from sae_lens_attn.site import AttnSite, ValueBiasConvention

LINEAR_ENCODER_ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk")
"""Architectures whose pre-activation is ``(norm(z) − b_dec) W_enc + b_enc``. A BatchTopK SAE is
saved by SAELens as JumpReLU (its inference architecture); ``"batchtopk"`` is the training object."""
RESHAPE_ACTIVATIONS = ("hook_z", "none")
"""``reshape_activations`` values DFA accepts: both read z flattened head-major (``"none"`` is what
SAELens's runner saves for hook_z SAEs)."""
_ENCODE_BLOCK = 2**24
"""Upper bound on ``tokens × d_sae`` per call of the SAE's ``encode``."""


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
    """DFA of some features at some query positions of a token batch.

    ``q`` indexes the requested positions (all positions when none were given); entries at padded
    query positions are zero and ``mask`` is False there.
    """

    pre_act: Float[Tensor, " batch q F"]
    """Encoder pre-activation of each feature (SAELens's ``hook_sae_acts_pre``), from z directly."""
    bias: Float[Tensor, " F"]
    """``c_f = b_enc[f] − b_dec · W_enc[:, f]`` (no b_dec term when the SAE does not subtract it
    from its input): the part of ``pre_act`` no source explains."""
    by_src: Float[Tensor, " batch q s F"]
    """Contribution of each source position, summed over heads (``input_scale`` included)."""
    by_head: Float[Tensor, " batch q n_heads F"]
    """Contribution of each head, summed over source positions (``input_scale`` included)."""
    features: Int[Tensor, " F"]
    """The feature indices, in the order of the last dimension."""
    positions: Int[Tensor, " batch q"]
    """The query position each ``q`` index stands for."""
    mask: Bool[Tensor, " batch q"]
    """True at real (non-padding) query positions."""
    acts: Float[Tensor, " batch q F"]
    """The SAE's own feature activation there (its ``encode``: ReLU, JumpReLU threshold, TopK
    selection over all features, ``activation_scale``)."""
    activation_scale: Float[Tensor, " F"]
    """Factor between pre-activation and activation: ``‖W_dec[f]‖`` for TopK/BatchTopK SAEs with
    ``rescale_acts_by_decoder_norm`` (a selected feature's activation is ``scale · pre_act``), else 1."""
    input_scale: Float[Tensor, " batch q"]
    """The per-token factor ``n[q]`` of the SAE's input normalisation (1 without one)."""


@dataclass(frozen=True)
class Attribution:
    """What the DFA kernel computes: per (prompt, query index, feature), one query position."""

    pre_act: Float[Tensor, " batch q F"]
    """Encoder pre-activation at the query position."""
    bias: Float[Tensor, " F"]
    """``c_f``: the part of ``pre_act`` no source explains."""
    by_src: Float[Tensor, " batch q s F"]
    """Contribution of each source position, summed over heads."""
    by_head: Float[Tensor, " batch q n_heads F"]
    """Contribution of each head, summed over source positions."""
    activation_scale: Float[Tensor, " F"]
    """``DFAResult.activation_scale``."""
    input_scale: Float[Tensor, " batch pos"]
    """``n`` at every position of the batch (gather it at the query positions)."""


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
    tokens: Int[Tensor, " batch pos"],
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
        tokens: token ids.
        features: feature indices (default: all).
        positions: query positions per row, ``[batch]`` or ``[batch, q]`` (default: all).
        attention_mask: 0 at padding; padding is never attributed.
        feature_chunk: features computed at once; bounds memory for large dictionaries.

    Returns:
        A ``DFAResult`` whose ``by_src.sum(2) + bias`` equals ``pre_act``.

    Raises:
        ValueError: the SAE is not a hook_z SAE of this model, has an unsupported architecture,
            normalisation or reshaping, or lives on another device than the model's activations.

    Example:
        >>> acts = sla.analysis.dfa(model, sae, tokens, features=[12, 99], positions=peaks)
        >>> acts.by_src[0, 0, :, 0]   # how much each source position drove feature 12
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    _check_sae(sae)
    feature_idx = _features(features, sae.cfg.d_sae)
    query = _positions(positions, tokens)
    mask = _query_mask(attention_mask, tokens, query)

    capture = dfa_capture(backend, sae, site, tokens, attention_mask)
    assert capture.pattern is not None and capture.values is not None
    check_device(sae, capture.z)
    out = attribute(
        capture.pattern,
        capture.values,
        capture.z_flat,
        sae,
        site,
        feature_idx,
        query,
        feature_chunk=feature_chunk,
    )
    rows = torch.arange(tokens.shape[0])[:, None]
    acts = feature_acts(sae, capture.z[rows, query], feature_idx).to(out.pre_act.dtype)
    keep = mask.to(out.pre_act.device)[..., None]
    return DFAResult(
        pre_act=_zero_unless(keep, out.pre_act),
        bias=out.bias,
        by_src=_zero_unless(keep[..., None], out.by_src),
        by_head=_zero_unless(keep[..., None], out.by_head),
        features=feature_idx,
        positions=query,
        mask=mask,
        acts=_zero_unless(keep, acts),
        activation_scale=out.activation_scale,
        input_scale=out.input_scale[rows, query],
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
    feature_chunk: int = 1024,
) -> Attribution:
    """The DFA kernel on captured tensors: ``dfa`` and ``dfa_at_peaks`` both run it.

    Args:
        pattern: attention probabilities (zero at padded sources).
        values: values expanded to query heads, in the SAE's value-bias convention.
        z: flattened z in that convention, the SAE's input.
        sae: the SAE (checked by the caller: ``_check_sae``, ``check_device``).
        site: its attention site.
        features: feature indices.
        query: query positions shared by all features ``[batch, q]``, or one set per feature
            ``[batch, q, F]`` (e.g. each feature's peak).
        feature_chunk: features computed at once.
    """
    dtype = compute_dtype(pattern, values, z, sae.W_enc)
    pattern_by_query = pattern.to(dtype).permute(0, 2, 1, 3).contiguous()  # (B, Q, H, S)
    values, z = values.to(dtype), z.to(dtype)
    terms = encoder_terms(sae, features, dtype)
    scale = terms.normalisation.scale(z)  # (B, T)
    query = query.to(z.device)
    rows = torch.arange(z.shape[0], device=z.device).view(-1, *[1] * (query.ndim - 1))
    shared = query.ndim == 2
    rows_at_query = pattern_by_query[rows, query] if shared else None  # (B, Q, H, S)
    parts: dict[str, list[Tensor]] = {"pre_act": [], "by_src": [], "by_head": []}
    for start in range(0, features.numel(), feature_chunk):
        chunk = slice(start, start + feature_chunk)
        w = terms.weight[:, chunk]  # (d_in, F)
        q = query if shared else query[..., chunk]
        pre = pre_activation(terms, z, scale, chunk)  # (B, T, F)
        parts["pre_act"].append(pre[rows, q] if shared else pre.gather(1, q))
        # v_h[s] · W[h-block, f], contracted with the pattern rows of the query positions
        projected = torch.einsum("bshd,hdf->bshf", values, w.unflatten(0, (site.n_heads, -1)))
        if rows_at_query is not None:
            by_src, by_head = _contract_shared(rows_at_query, projected)
            n_q = scale[rows, q][..., None, None]  # (B, Q, 1, 1)
        else:
            by_src, by_head = _contract_per_feature(pattern_by_query[rows, q], projected)
            n_q = scale[rows, q][:, :, None, :]  # (B, Q, 1, F)
        parts["by_src"].append(by_src * n_q)  # n[q] scales a whole pattern row
        parts["by_head"].append(by_head * n_q)
    out = {name: torch.cat(tensors, dim=-1) for name, tensors in parts.items()}
    return Attribution(
        pre_act=out["pre_act"],
        bias=terms.bias,
        by_src=out["by_src"],
        by_head=out["by_head"],
        activation_scale=terms.activation_scale,
        input_scale=scale,
    )


def _contract_shared(
    rows_at_q: Float[Tensor, " batch q n_heads s"], projected: Float[Tensor, " batch s n_heads F"]
) -> tuple[Float[Tensor, " batch q s F"], Float[Tensor, " batch q n_heads F"]]:
    by_src = torch.einsum("bqhs,bshf->bqsf", rows_at_q, projected)
    by_head = torch.einsum("bqhs,bshf->bqhf", rows_at_q, projected)
    return by_src, by_head


def _contract_per_feature(
    rows_at_q: Float[Tensor, " batch q F n_heads s"], projected: Float[Tensor, " batch s n_heads F"]
) -> tuple[Float[Tensor, " batch q s F"], Float[Tensor, " batch q n_heads F"]]:
    # DFA_f[q_f, h, s] for every (prompt, feature): an elementwise product, no matmul needed.
    per_head_src = rows_at_q * projected.permute(0, 3, 2, 1)[:, None]  # (B, Q, F, H, S)
    return per_head_src.sum(3).transpose(2, 3), per_head_src.sum(4).transpose(2, 3)


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


def pre_activation(
    terms: EncoderTerms,
    z: Float[Tensor, " *batch d_in"],
    scale: Float[Tensor, " *batch"],
    chunk: slice = slice(None),
) -> Float[Tensor, " *batch F"]:
    """``n · (z · weight) + bias`` for the features in ``chunk``: SAELens's ``hook_sae_acts_pre``."""
    return scale[..., None] * (z @ terms.weight[:, chunk]) + terms.bias[chunk]


def feature_acts(
    sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"], features: Int[Tensor, " F"]
) -> Float[Tensor, " *batch F"]:
    """The SAE's own activations of ``features`` (its ``encode``), in blocks of tokens.

    A BatchTopK training SAE selects over each block, not over the whole batch.
    """
    flat = z.flatten(0, -3)  # (N, H, D)
    block = max(1, _ENCODE_BLOCK // sae.cfg.d_sae)
    acts = [encode_z(sae, part)[:, features] for part in flat.split(block)]
    return torch.cat(acts).unflatten(0, z.shape[:-2])


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or a wider dtype if one of ``tensors`` has it: half-precision models included."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_device(sae: SAE[Any], activations: Tensor) -> None:
    """Raise ``ValueError`` unless the SAE's parameters are on the activations' device."""
    device = sae.W_enc.device
    if device != activations.device:
        raise ValueError(
            f"the SAE's parameters are on {device} but the model's activations are on "
            f"{activations.device}: move the SAE there with sae.to({str(activations.device)!r})"
        )


def dfa_capture(
    backend: AttnBackend,
    sae: SAE[Any],
    site: AttnSite,
    tokens: Int[Tensor, " batch pos"],
    attention_mask: Int[Tensor, " batch pos"] | None = None,
) -> AttnCapture:
    """z, patterns and values for DFA: in the SAE's value-bias convention, with no attention
    to padded source positions."""
    capture = backend.capture(
        tokens,
        [site],
        pattern=True,
        values=True,
        convention=sae_convention(sae, backend.native_convention),
        attention_mask=attention_mask,
    )[site.layer]
    if attention_mask is not None and capture.pattern is not None:
        keep = attention_mask[:, None, None, :].to(capture.pattern.device).bool()
        capture = capture._replace(pattern=_zero_unless(keep, capture.pattern))
    return capture


def check_tokens(tokens: Tensor) -> None:
    """Raise ``ValueError`` unless ``tokens`` is a non-empty ``[batch, pos]`` tensor."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}"
        )


def encode_z(
    sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"]
) -> Float[Tensor, " *batch d_sae"]:
    """Feature activations of z, whether or not the SAE reshapes hook_z itself."""
    reshapes = getattr(sae, "hook_z_reshaping_mode", False)
    return sae.encode((z if reshapes else z.flatten(-2)).to(sae.dtype))


def sae_convention(sae: SAE[Any], default: ValueBiasConvention) -> ValueBiasConvention:
    """The value-bias convention an SAE was trained on (its metadata, else ``default``)."""
    return sae.cfg.metadata.get("value_bias_convention", None) or default


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


def _zero_unless(keep: Tensor, values: Tensor) -> Tensor:
    """``values`` where ``keep``, else 0 (also where ``values`` is inf or NaN)."""
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _b_enc(sae: SAE[Any]) -> Tensor:
    b_enc = getattr(sae, "b_enc", None)
    return torch.zeros(sae.cfg.d_sae, device=sae.W_enc.device) if b_enc is None else b_enc.detach()


def _features(features: Tensor | list[int] | None, d_sae: int) -> Tensor:
    if features is None:
        return torch.arange(d_sae)
    idx = torch.as_tensor(features, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError("features is empty: give at least one feature index, or None for all")
    bad = idx[(idx < 0) | (idx >= d_sae)]
    if bad.numel():
        raise ValueError(
            f"feature indices {bad.tolist()} are out of range: the SAE has d_sae={d_sae} (valid: 0..{d_sae - 1})"
        )
    return idx


def _positions(positions: Tensor | None, tokens: Tensor) -> Tensor:
    check_tokens(tokens)
    batch, n_pos = tokens.shape
    if positions is None:
        return torch.arange(n_pos).expand(batch, n_pos)
    query = torch.as_tensor(positions, dtype=torch.long)
    query = query[:, None] if query.ndim == 1 else query
    if query.ndim != 2 or query.shape[0] != batch:
        raise ValueError(
            f"positions must be [batch] or [batch, q] with batch={batch}, got shape {tuple(query.shape)}"
        )
    bad = query[(query < 0) | (query >= n_pos)]
    if bad.numel():
        raise ValueError(
            f"positions {bad.tolist()} are out of range for {n_pos} tokens (valid: 0..{n_pos - 1})"
        )
    return query


def _query_mask(attention_mask: Tensor | None, tokens: Tensor, query: Tensor) -> Tensor:
    if attention_mask is None:
        return torch.ones(query.shape, dtype=torch.bool)
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens {tuple(tokens.shape)}"
        )
    return attention_mask.bool().gather(1, query)
