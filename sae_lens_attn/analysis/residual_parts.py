"""The residual stream of one prompt split into its parts, and each attention layer as an affine
map of it once its norm scale is frozen: what the recursive DFA (``rdfa``) reads.

For layer l and position s, with x[s] the residual stream entering layer l's attention norm:

    x[s]   = token_embedding[s] + position_embedding[s] + Σ_{l' < l} (attn_out_{l'}[s] + mlp_{l'}[s])
    v_h[s] = (γ ⊙ P x[s] / σ[s]) · W_V[h] + b_V'[h]         (P centres x for LayerNorm)
    attn_out_l[s] = z_l[s] · W_O + b_O

``σ[s]`` is the norm's scale at s (frozen), ``b_V'`` what z holds of the value bias
(``backend.value_bias``), ``z`` the model's own. The backend reads the stream
(``AttnBackend.capture_residual``: the residual entering each layer, its attention norm's scale,
each attention output and the position embeddings, with z, patterns and values from the same
pass) and the weights (``attn_norm``, ``values_weight``, ``out_proj_weight``, ``out_proj_bias``);
this module assembles and checks them, whatever the backend. Token embedding and MLP outputs are
differences of captured residuals, so the split is exact by construction; the affine maps are
checked against the values and attention outputs the model computed, and a model whose layers do
not fit them (a norm scaling by ``1 + w``, attention outputs normed before they join the
residual) is refused with the mismatch (``UnsupportedModelError``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae_lens_attn.backends import AttnBackend, ResidualCapture

_TOLERANCE = 1e-3
"""Largest relative error of the affine maps against the model's own values and outputs."""


@dataclass(frozen=True)
class LayerMaps:
    """One attention layer on one prompt, as affine maps of its residual input."""

    resid: Float[Tensor, " pos d_model"]
    """x: the residual stream entering the layer's attention norm."""
    norm_scale: Float[Tensor, " pos"]
    """σ: the norm's scale at each position (1 without a norm)."""
    centres: bool
    """Whether the norm subtracts the mean over ``d_model`` (LayerNorm) first."""
    norm_weight: Float[Tensor, " d_model"]
    """γ: the norm's gain (ones without one)."""
    W_V: Float[Tensor, " n_heads d_model d_head"]
    """Value weights per query head (grouped KV heads expanded)."""
    value_bias: Float[Tensor, " n_heads d_head"]
    """``b_V' = b_V + β·W_V`` as z holds it: the values of a zero residual."""
    W_O: Float[Tensor, " d_in d_model"]
    """Output projection, rows head-major."""
    b_O: Float[Tensor, " d_model"]
    """Output bias (zeros without one)."""
    pattern: Float[Tensor, " n_heads q k"]
    """Attention probabilities."""
    z: Float[Tensor, " pos n_heads d_head"]
    """z as the model computes it."""
    attn_out: Float[Tensor, " pos d_model"] | None
    """What the attention adds to the residual stream (``None`` at the top layer, whose output
    no part reads)."""


@dataclass(frozen=True)
class ResidualParts:
    """The parts of the residual stream of one prompt, up to a top layer."""

    layers: tuple[LayerMaps, ...]
    """Layers ``0..top``."""
    token_embedding: Float[Tensor, " pos d_model"]
    position_embedding: Float[Tensor, " pos d_model"] | None
    """None where positions do not enter the residual stream (rotary, ALiBi, shortformer)."""
    mlp_out: tuple[Float[Tensor, " pos d_model"], ...] | None
    """Each layer's MLP output below ``top``; None for attention-only models."""


def read_residual_parts(
    backend: AttnBackend, tokens: Int[Tensor, "1 pos"], top: int
) -> ResidualParts:
    """The residual parts of one prompt up to layer ``top`` (module docstring), float64.

    Raises:
        UnsupportedModelError: the backend does not read the residual stream, or the model's
            is not a sum of the parts above (the message says where, and what would serve).
    """
    read = backend.capture_residual(tokens, top)
    layers = tuple(_layer_maps(backend, read, layer) for layer in range(top + 1))
    for layer, maps in enumerate(layers):
        values = read.attention[layer].values
        assert values is not None  # capture_residual captures them
        _check_values(backend, maps, _cpu(values[0]), layer)
        if maps.attn_out is not None:
            _check_attn_out(backend, maps, layer)
    resid = [maps.resid for maps in layers]
    mlp = tuple(
        resid[below + 1] - resid[below] - _attn_out(layers[below]) for below in range(top)
    )  # exact by construction
    if not backend.has_mlp:
        largest = max((float(m.abs().max()) for m in mlp), default=0.0)
        if largest > _TOLERANCE * _scale(resid[-1]):
            raise backend.residual_unsupported(
                f"it has no MLPs, yet its residual stream changes by {largest:.3g} between "
                "layers beyond what attention adds"
            )
    pos = None if read.position_embedding is None else _cpu(read.position_embedding[0])
    return ResidualParts(
        layers=layers,
        token_embedding=resid[0] - (0 if pos is None else pos),
        position_embedding=pos,
        mlp_out=mlp if backend.has_mlp else None,
    )


def _layer_maps(backend: AttnBackend, read: ResidualCapture, layer: int) -> LayerMaps:
    site = backend.site(layer)
    got = read.attention[layer]
    assert got.pattern is not None  # capture_residual captures it
    resid = _cpu(read.resid_pre[layer][0])
    norm = backend.attn_norm(layer)
    return LayerMaps(
        resid=resid,
        norm_scale=_cpu(read.norm_scale[layer][0]),
        centres=norm is not None and norm.centres,
        norm_weight=torch.ones_like(resid[0]) if norm is None else _cpu(norm.weight),
        W_V=_cpu(backend.values_weight(layer)),
        value_bias=_cpu(backend.value_bias(site)),
        W_O=_cpu(backend.out_proj_weight(layer)),
        b_O=_cpu(backend.out_proj_bias(layer)),
        pattern=_cpu(got.pattern[0]),
        z=_cpu(got.z[0]),
        attn_out=_cpu(read.attn_out[layer][0]) if layer < len(read.attn_out) else None,
    )


def _attn_out(maps: LayerMaps) -> Tensor:
    assert maps.attn_out is not None  # read below the top layer
    return maps.attn_out


def _check_values(backend: AttnBackend, maps: LayerMaps, values: Tensor, layer: int) -> None:
    rebuilt = torch.einsum("pm,hmd->phd", normalised(maps, maps.resid), maps.W_V) + maps.value_bias
    error = float((rebuilt - values).abs().max())
    if error > _TOLERANCE * _scale(values):
        raise backend.residual_unsupported(
            f"layer {layer}'s values are not (γ ⊙ P x / σ)·W_V + b_V' of its residual input "
            f"(largest error {error:.3g}): its attention norm is not a LayerNorm or RMSNorm with "
            "gain γ (e.g. it scales by 1 + w)"
        )


def _check_attn_out(backend: AttnBackend, maps: LayerMaps, layer: int) -> None:
    rebuilt = maps.z.flatten(-2) @ maps.W_O + maps.b_O
    error = float((rebuilt - _attn_out(maps)).abs().max())
    if error > _TOLERANCE * _scale(_attn_out(maps)):
        raise backend.residual_unsupported(
            f"layer {layer}'s attention output is not z·W_O + b_O (largest error {error:.3g}): "
            "it is transformed before it joins the residual stream"
        )


def normalised(maps: LayerMaps, x: Float[Tensor, "*pos d_model"]) -> Float[Tensor, "*pos d_model"]:
    """``γ ⊙ P x / σ`` with the layer's frozen scale: linear in x (σ broadcast over positions)."""
    centred = x - x.mean(-1, keepdim=True) if maps.centres else x
    return maps.norm_weight * centred / maps.norm_scale[..., None]


def _cpu(tensor: Tensor) -> Tensor:
    """A detached float64 copy on the CPU (one prompt's worth: the arithmetic stays exact)."""
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _scale(tensor: Tensor) -> float:
    return max(float(tensor.abs().max()), 1.0)
