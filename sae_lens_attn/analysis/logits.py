"""Feature logits: the direct effect of each feature's decoder direction on the logits.

For a hook_z SAE at layer L, feature f writes ``W_dec[f]`` into z (heads concatenated
head-major); the attention output projection carries it into the residual stream and the
unembedding reads it out:

    effect_f = W_dec[f] · W_O_cat · W_U          [d_vocab]

with ``W_O_cat`` the ``[n_heads * d_head, d_model]`` output projection of layer L and ``W_U``
the ``[d_model, d_vocab]`` unembedding as the model holds them (``backend.out_proj_weight``,
``backend.unembed``). No final norm is applied and no bias enters: this is the path that skips
every later layer, per unit of ``W_dec[f]`` (an SAE with ``rescale_acts_by_decoder_norm``
writes ``W_dec[f] / ‖W_dec[f]‖`` per unit of activation, which rescales a row, not its order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.backends import backend_for
from sae_lens_attn.sae_adapter import compute_dtype
from sae_lens_attn.site import AttnSite
from sae_lens_attn.validation import check_count, check_features, token_texts, tokenizer_of


@dataclass(frozen=True)
class FeatureLogits:
    """The tokens each feature's direct effect raises and lowers most."""

    features: Int[Tensor, " F"]
    """Feature indices, in the order of the rows."""
    top_ids: Int[Tensor, " F k"]
    """Token ids with the largest effect, largest first."""
    top_values: Float[Tensor, " F k"]
    """Their effect ``W_dec[f] · W_O_cat · W_U[:, id]``."""
    bottom_ids: Int[Tensor, " F k"]
    """Token ids with the smallest (most negative) effect, smallest first."""
    bottom_values: Float[Tensor, " F k"]
    """Their effect."""
    top_tokens: tuple[tuple[str, ...], ...]
    """``top_ids`` as text (``<id>`` without a tokenizer)."""
    bottom_tokens: tuple[tuple[str, ...], ...]
    """``bottom_ids`` as text."""
    layer: int
    """The SAE's layer."""

    def row(self, feature: int) -> int:
        """The row of ``feature``.

        Raises:
            ValueError: ``feature`` is not among ``features``.
        """
        hits = (self.features == int(feature)).nonzero().flatten()
        if not hits.numel():
            raise ValueError(
                f"feature {feature} is not in this result; it holds {self.features.tolist()}"
            )
        return int(hits[0])


@torch.no_grad()
def feature_directions(
    model: Any, sae: SAE[Any], features: Int[Tensor, " F"]
) -> Float[Tensor, " F d_model"]:
    """``W_dec[f] · W_O_cat``: what each feature writes into the residual stream of its layer.

    Raises:
        ValueError: the SAE does not read this model's hook_z.
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    W_O = backend.out_proj_weight(site.layer)  # (H·D, M)
    W_dec = sae.W_dec.detach()[features.to(sae.W_dec.device)]  # (F, H·D)
    dtype = compute_dtype(W_O, W_dec)
    return W_dec.to(W_O.device, dtype) @ W_O.to(dtype)


@torch.no_grad()
def logit_effects(
    model: Any, sae: SAE[Any], features: Int[Tensor, " F"], *, standardise: bool = False
) -> Float[Tensor, " F d_vocab"]:
    """``W_dec[f] · W_O_cat · W_U`` for every token; with ``standardise``, each row minus its mean
    over the vocabulary, divided by its standard deviation (a row that is constant gives zeros).

    Raises:
        ValueError: the model has no unembedding, or the SAE does not read its hook_z.
    """
    backend = backend_for(model)
    W_U = backend.unembed()  # (M, V) first: a model without one fails before any work
    directions = feature_directions(backend, sae, features)
    effects = directions @ W_U.to(directions.device, directions.dtype)
    if not standardise:
        return effects
    centred = effects - effects.mean(-1, keepdim=True)
    std = centred.std(-1, keepdim=True)
    return torch.where(std > 0, centred / std.clamp_min(torch.finfo(std.dtype).tiny), 0.0)


@torch.no_grad()
def feature_logits(
    model: Any,
    sae: SAE[Any],
    features: Int[Tensor, " F"] | list[int] | None = None,
    k: int = 20,
    *,
    tokenizer: Any = None,
    feature_chunk: int = 1024,
) -> FeatureLogits:
    """The ``k`` tokens whose logits each feature raises and lowers most, by its direct effect.

    Args:
        model: a ``HookedTransformer``, a TransformerBridge, a Hugging Face causal LM (plain
            or nnsight), or a backend; it must have an unembedding.
        sae: a SAELens SAE on this model's hook_z.
        features: feature indices (default: all).
        k: tokens per direction, ``1..d_vocab``.
        tokenizer: shows the tokens as text (default: the model's; ids without one).
        feature_chunk: features whose ``[F, d_vocab]`` effects are computed at once.

    Returns:
        A ``FeatureLogits`` whose values are ``W_dec[f] · W_O_cat · W_U`` (module docstring).

    Raises:
        ValueError: the model has no unembedding, the SAE does not read its hook_z, features
            are out of range, or ``k`` is not in ``1..d_vocab``.

    Examples:
        >>> logits = sla.analysis.feature_logits(model, sae, features=[7], k=5)
        >>> logits.top_tokens[0]   # the five tokens feature 7 promotes most
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    feature_idx = check_features(features, sae.cfg.d_sae)
    d_vocab = backend.unembed().shape[-1]
    k = check_count("k", k)
    if k > d_vocab:
        raise ValueError(
            f"k={k} exceeds the model's vocabulary of {d_vocab} tokens (valid: 1..{d_vocab})"
        )
    chunk = check_count("feature_chunk", feature_chunk)
    parts: dict[str, list[Tensor]] = {"top": [], "top_ids": [], "bottom": [], "bottom_ids": []}
    for start in range(0, feature_idx.numel(), chunk):
        effects = logit_effects(backend, sae, feature_idx[start : start + chunk])
        top = effects.topk(k, dim=-1)
        bottom = effects.topk(k, dim=-1, largest=False)
        parts["top"].append(top.values.cpu())
        parts["top_ids"].append(top.indices.cpu())
        parts["bottom"].append(bottom.values.cpu())
        parts["bottom_ids"].append(bottom.indices.cpu())
    out = {name: torch.cat(tensors) for name, tensors in parts.items()}
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(backend)
    shown = torch.cat([out["top_ids"], out["bottom_ids"]]).unique().tolist()
    text = dict(zip(shown, token_texts(tokenizer, shown), strict=True))
    return FeatureLogits(
        features=feature_idx,
        top_ids=out["top_ids"],
        top_values=out["top"],
        bottom_ids=out["bottom_ids"],
        bottom_values=out["bottom"],
        top_tokens=tuple(tuple(text[i] for i in row) for row in out["top_ids"].tolist()),
        bottom_tokens=tuple(tuple(text[i] for i in row) for row in out["bottom_ids"].tolist()),
        layer=site.layer,
    )
