"""The residual stream of one prompt split into its parts, and each attention layer as an affine
map of it once its norm scale is frozen: what the recursive DFA (``rdfa``) reads.

For layer l and position s, with x[s] the residual stream entering layer l's attention norm:

    x[s]   = token_embedding[s] + position_embedding[s] + Σ_{l' < l} (attn_out_{l'}[s] + mlp_{l'}[s])
    v_h[s] = (γ ⊙ P x[s] / σ[s]) · W_V[h] + b_V'[h]         (P centres x for LayerNorm)
    attn_out_l[s] = z_l[s] · W_O + b_O

``σ[s]`` is the norm's scale at s (frozen), ``b_V' = b_V + β·W_V`` the value bias of the
value-bias convention (``backend.value_bias``), ``z`` the model's own (``"included"``). Token
embedding, MLP outputs and (where the model adds them to the residual) position embeddings are
differences of captured residuals, so the split is exact by construction; the affine maps are
checked against the values and attention outputs the model computed, and a model whose layers
do not fit them (a norm scaling by ``1 + w``, attention outputs normed before they join the
residual) is refused with the mismatch.

TransformerLens models are read through their hook points, Hugging Face models through forward
hooks on the modules of their architecture row (``HF_ARCHITECTURES``); W_V and W_O are read by
running the values and output-projection modules on unit vectors, so fused and grouped layouts
need no code of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from sae_lens_attn.backends import AttnBackend, expand_kv_heads

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
    """``b_V' = b_V + β·W_V``: the values of a zero residual."""
    W_O: Float[Tensor, " d_in d_model"]
    """Output projection, rows head-major."""
    b_O: Float[Tensor, " d_model"]
    """Output bias (zeros without one)."""
    pattern: Float[Tensor, " n_heads q k"]
    """Attention probabilities."""
    z: Float[Tensor, " pos n_heads d_head"]
    """z as the model computes it (the ``"included"`` convention)."""
    attn_out: Float[Tensor, " pos d_model"]
    """What the attention adds to the residual stream."""


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
        TypeError: a backend other than TransformerLens or nnsight (Hugging Face).
        ValueError: a model whose layers are not the affine maps above (the message says where).
    """
    reader = _READERS.get(backend.name)
    if reader is None:
        raise TypeError(
            f"recursive DFA reads the residual stream of TransformerLens HookedTransformers and "
            f"Hugging Face models (backends {sorted(_READERS)}), not of backend {backend.name!r}"
        )
    sites = [backend.site(layer) for layer in range(top + 1)]
    captures = backend.capture(tokens, sites, pattern=True, values=True, convention="included")
    raw = reader(backend, tokens, top)
    layers = []
    for site in sites:
        got = captures[site.layer]
        assert got.pattern is not None and got.values is not None
        part = raw.layers[site.layer]
        maps = LayerMaps(
            resid=part["resid"],
            norm_scale=part["norm_scale"],
            centres=bool(part["centres"]),
            norm_weight=part["norm_weight"],
            W_V=expand_kv_heads(part["W_V"].transpose(0, 1), site).transpose(0, 1).double(),
            value_bias=backend.value_bias(site).detach().double().cpu(),
            W_O=part["W_O"],
            b_O=part["b_O"],
            pattern=got.pattern[0].double().cpu(),
            z=got.z[0].double().cpu(),
            attn_out=part["attn_out"],
        )
        _check_values(maps, got.values[0].double().cpu(), site.layer)
        if site.layer < top:
            _check_attn_out(maps, site.layer)
        layers.append(maps)
    resid = [maps.resid for maps in layers]
    pos = raw.position_embedding
    mlp = tuple(
        resid[below + 1] - resid[below] - layers[below].attn_out for below in range(top)
    )  # exact by construction
    if not raw.has_mlp:
        largest = max((float(m.abs().max()) for m in mlp), default=0.0)
        if largest > _TOLERANCE * _scale(resid[-1]):
            raise ValueError(
                f"the model is attention-only, yet its residual stream changes by {largest:.3g} "
                "between layers beyond what attention adds: it does not fit recursive DFA"
            )
    return ResidualParts(
        layers=tuple(layers),
        token_embedding=resid[0] - (0 if pos is None else pos),
        position_embedding=pos,
        mlp_out=mlp if raw.has_mlp else None,
    )


@dataclass
class _Raw:
    layers: list[dict[str, Any]]
    position_embedding: Tensor | None
    has_mlp: bool


def _read_transformer_lens(backend: AttnBackend, tokens: Tensor, top: int) -> _Raw:
    model = backend.model
    cfg = model.cfg
    names = ["hook_pos_embed"] if cfg.positional_embedding_type == "standard" else []
    for layer in range(top + 1):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out"]
        if cfg.normalization_type is not None:
            names.append(f"blocks.{layer}.ln1.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=names, stop_at_layer=top + 1, return_type=None
        )
    layers = []
    for layer in range(top + 1):
        block = model.blocks[layer]
        resid = cache[f"blocks.{layer}.hook_resid_pre"][0].double().cpu()
        scale_name = f"blocks.{layer}.ln1.hook_scale"
        scale = cache[scale_name][0, :, 0] if scale_name in cache else torch.ones(len(resid))
        weight = getattr(block.ln1, "w", None)
        layers.append(
            {
                "resid": resid,
                "norm_scale": scale.double().cpu(),
                "centres": cfg.normalization_type in ("LN", "LNPre"),
                "norm_weight": _cpu(torch.ones(cfg.d_model) if weight is None else weight),
                "W_V": _cpu(block.attn.W_V),
                "W_O": _cpu(block.attn.W_O.flatten(0, 1)),
                "b_O": _cpu(block.attn.b_O),
                "attn_out": _cpu(cache[f"blocks.{layer}.hook_attn_out"][0]),
            }
        )
    pos = _cpu(cache["hook_pos_embed"][0]) if "hook_pos_embed" in names else None
    return _Raw(layers, pos, has_mlp=not cfg.attn_only)


class _Stop(Exception):
    """Raised by a hook once every layer needed has run."""


def _read_hugging_face(backend: AttnBackend, tokens: Tensor, top: int) -> _Raw:
    hf: nn.Module = backend.model
    arch: Any = getattr(backend, "arch")  # noqa: B009  (NNsightBackend's architecture row)
    config = getattr(hf, "config")  # noqa: B009
    name = type(hf).__name__
    why = _hf_refusal(arch, config)
    if why is not None:
        raise ValueError(f"recursive DFA cannot split the residual stream of {name}: {why}")
    blocks = cast(nn.ModuleList, hf.get_submodule(arch.layers_path))
    seen: dict[str, Tensor] = {}
    hooks: list[Callable[[], None]] = []

    def keep(key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen[key] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def keep_input(key: str, stop: bool = False) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if stop:
                raise _Stop
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[key] = hidden.detach()

        return hook

    norms = [arch.values_norm(blocks[layer], config) for layer in range(top + 1)]
    with _hooks(hooks):
        for layer in range(top + 1):
            handle = blocks[layer].register_forward_pre_hook(
                keep_input(f"resid.{layer}"), with_kwargs=True
            )
            hooks.append(handle.remove)
            hooks.append(norms[layer].register_forward_hook(keep(f"norm.{layer}")).remove)
            attn = blocks[layer].get_submodule(arch.attn)
            hooks.append(attn.register_forward_hook(keep(f"attn.{layer}")).remove)
        if top + 1 < len(blocks):
            handle = blocks[top + 1].register_forward_pre_hook(
                keep_input("", stop=True), with_kwargs=True
            )
            hooks.append(handle.remove)
        if arch.position_embeddings is not None:
            module = hf.get_submodule(arch.position_embeddings)
            hooks.append(module.register_forward_hook(keep("pos")).remove)
        try:
            with torch.no_grad():
                hf(input_ids=tokens.to(_device(hf)), use_cache=False)
        except _Stop:
            pass
    layers = []
    for layer in range(top + 1):
        resid = _cpu(seen[f"resid.{layer}"][0])
        layers.append(
            {
                "resid": resid,
                **_norm_terms(norms[layer], resid, _cpu(seen[f"norm.{layer}"][0])),
                "W_V": _values_weight(arch, blocks[layer], backend, resid.shape[-1]),
                **_out_proj_terms(blocks[layer].get_submodule(arch.out_proj)),
                "attn_out": _cpu(seen[f"attn.{layer}"][0]),
            }
        )
    pos = seen.get("pos")
    if pos is not None:
        pos = _cpu(pos.expand(tokens.shape[0], *pos.shape[-2:])[0])
    return _Raw(layers, pos, has_mlp=True)


def _hf_refusal(arch: Any, config: Any) -> str | None:
    if not arch.norm_feeds_values(config):
        return (
            "its values do not read a norm of the residual stream that comes before attention "
            "(post-LN, or norms only after the sublayers), so the stream is not a sum of parts"
        )
    if arch.sublayer_norms:
        return "its attention output passes through a norm of its own before joining the residual"
    if arch.values is None or arch.latent_values or arch.values_clip_bound(config) is not None:
        return arch.folded_refusal(config) or "its values are not affine in the residual stream"
    return None


def _norm_terms(norm: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """σ, centring and γ of a LayerNorm- or RMSNorm-like module, from its input and output:
    with ``β = norm(0)``, ``y − β = γ ⊙ P x / σ``, so ``σ = ‖γ ⊙ P x‖ / ‖y − β‖``."""
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        beta = _cpu(norm(torch.zeros(1, x.shape[-1], dtype=dtype, device=_device(norm)))[0])
        shifted = _cpu(norm((x + 1.0).to(dtype=dtype, device=_device(norm))))
    centres = bool(torch.allclose(shifted, y, atol=1e-4, rtol=1e-3))
    weight = getattr(norm, "weight", None)
    gamma = _cpu(torch.ones(x.shape[-1]) if weight is None else weight)
    centred = x - x.mean(-1, keepdim=True) if centres else x
    sigma = (gamma * centred).norm(dim=-1) / (y - beta).norm(dim=-1).clamp_min(1e-30)
    return {"norm_scale": sigma, "centres": centres, "norm_weight": gamma}


def _values_weight(arch: Any, block: nn.Module, backend: AttnBackend, d_model: int) -> Tensor:
    """W_V ``[n_kv_heads, d_model, d_head]``: the values module on unit vectors, less its bias."""
    module = block.get_submodule(arch.values)
    site = backend.site(0)
    param = next(module.parameters())
    eye = torch.eye(d_model, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = module(
            torch.cat([eye, torch.zeros(1, d_model, dtype=param.dtype, device=param.device)])
        )
    linear = _cpu(out[:-1] - out[-1:])
    per_kv = arch.read_values(linear, site.n_kv_heads, site.d_head)  # (d_model, KV, D)
    return per_kv.permute(1, 0, 2)


def _out_proj_terms(module: nn.Module) -> dict[str, Tensor]:
    """W_O ``[d_in, d_model]`` and b_O: the output projection on unit vectors and on zero."""
    param = next(module.parameters())
    d_in = getattr(module, "in_features", None) or param.shape[0]
    eye = torch.eye(d_in, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = module(torch.cat([eye, torch.zeros(1, d_in, dtype=param.dtype, device=param.device)]))
    out = _cpu(out)
    return {"W_O": out[:-1] - out[-1:], "b_O": out[-1]}


def _check_values(maps: LayerMaps, values: Tensor, layer: int) -> None:
    rebuilt = torch.einsum("pm,hmd->phd", normalised(maps, maps.resid), maps.W_V) + maps.value_bias
    error = float((rebuilt - values).abs().max())
    if error > _TOLERANCE * _scale(values):
        raise ValueError(
            f"layer {layer}'s values are not (γ ⊙ P x / σ)·W_V + b_V' of its residual input "
            f"(largest error {error:.3g}): its attention norm is not a LayerNorm or RMSNorm with "
            "gain γ (e.g. it scales by 1 + w), so recursive DFA cannot split it"
        )


def _check_attn_out(maps: LayerMaps, layer: int) -> None:
    rebuilt = maps.z.flatten(-2) @ maps.W_O + maps.b_O
    error = float((rebuilt - maps.attn_out).abs().max())
    if error > _TOLERANCE * _scale(maps.attn_out):
        raise ValueError(
            f"layer {layer}'s attention output is not z·W_O + b_O (largest error {error:.3g}): "
            "it is transformed before it joins the residual stream, so recursive DFA cannot "
            "split it"
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


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _hooks(removers: list[Callable[[], None]]) -> Iterator[None]:
    try:
        yield
    finally:
        for remove in removers:
            remove()


_READERS: dict[str, Callable[[AttnBackend, Tensor, int], _Raw]] = {
    "transformer_lens": _read_transformer_lens,
    "nnsight": _read_hugging_face,
}
"""How each backend's residual stream is read, by backend name."""
