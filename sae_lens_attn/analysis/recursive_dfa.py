"""Recursive direct feature attribution (RDFA): a feature's pre-activation split over the parts of
the residual stream at every source position, recursing into upstream attention SAE features.

For an attention SAE feature f of layer L at query position q (DFA, DESIGN.md):

    pre_f[q] = Σ_{h,s} n[q] · A_h[q,s] · (v_h[s] · w_h) + c_f           (w_h = W[h-block, f])

With the pattern A, the SAE's input scale n[q] and the norm scale σ[s] frozen, ``v_h[s]`` is
affine in the residual stream x[s] (``residual_parts``): ``v_h[s] = (γ ⊙ P x[s] / σ[s])·W_V[h]
(+ b_V'[h] where z holds the value bias)``. So ``pre_f[q] = Σ_s x[s]·u_s + value bias + c_f`` with
``u_s = P(γ ⊙ Σ_h n[q] A_h[q,s] W_V[h] w_h) / σ[s]``, and every additive part of x[s] gets the
contribution ``part · u_s``: the token and position embeddings, each earlier layer's MLP output,
and each earlier layer's attention output ``z·W_O + b_O``, with z split through its SAE by
SAELens's own encode and decode:

    z[s] − [folded] b_V' = decode(a[s]) + err[s],    decode(a[s]) = Σ_g part_g[s] + dec_bias[s]

(``a`` the SAE's activations, ``err`` what it does not reconstruct). Decode is affine in ``a`` at
each position (its output normalisation frozen at the encode, as SAELens freezes it), so feature
g's part read by ``r_s = u_s·W_Oᵀ`` is ``a_g[s] · ∂(decode(a)[s]·r_s)/∂a_g[s]``, one
vector-Jacobian product of decode per node and layer, and ``dec_bias[s]·r_s`` (the decoder bias,
with any output normalisation) is what decode adds beyond its features. A layer without an SAE
contributes its whole attention output as one error term, and the result says so.

A feature row equals ``pre_g[s] · m`` with ``m = value / pre_g[s]`` (``o[s]·W_dec[g]·W_O·u_s``
where the activation of an active feature is its pre-activation, times ``‖W_dec[g]‖`` for TopK
SAEs that rescale by it). Expanding it runs the same split for feature g at position s of its own
layer; its children are that split times ``m``, so a row's children plus its ``children_bias``
(``m · c_g``) equal its value.

Invariant (exact up to float error, with A, n and σ frozen): the top-level contributions plus
``bias`` equal ``pre_act``, SAELens's ``hook_sae_acts_pre`` on the model's own forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.attribution import dfa
from sae_lens_attn.analysis.residual_parts import LayerMaps, ResidualParts, read_residual_parts
from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.sae_adapter import encode_z, sae_convention
from sae_lens_attn.site import saes_by_layer
from sae_lens_attn.validation import (
    as_integer,
    check_count,
    check_features,
    check_tokens,
    token_text,
)

ContributionKind = Literal[
    "token_embedding",
    "position_embedding",
    "feature",
    "sae_error",
    "sae_decoder_bias",
    "attention_bias",
    "mlp",
    "value_bias",
]
"""What a contribution is a part of (module docstring)."""
_TOLERANCE = 1e-3
"""Relative mismatch between the split and DFA's pre-activation that is reported as a bug."""


@dataclass(frozen=True)
class Contribution:
    """One part of the residual stream read by one attention node of the tree."""

    kind: ContributionKind
    value: float
    """Its share of the parent's pre-activation (of ``pre_act`` at the top level)."""
    layer: int | None
    """The layer whose output it is (feature, error, biases, MLP); for ``value_bias``, the
    layer whose values carry it; ``None`` for embeddings."""
    position: int
    """The source position whose value it is part of."""
    feature: int | None = None
    """The upstream SAE feature, for ``kind == "feature"``."""
    activation: float | None = None
    """That feature's activation at ``position``."""
    children: tuple[Contribution, ...] = ()
    """For an expanded feature: its own RDFA, scaled so that it sums to ``value``."""
    children_bias: float = 0.0
    """For an expanded feature: the scaled encoder bias; ``Σ children.value + children_bias ==
    value``."""


@dataclass(frozen=True)
class RDFAResult:
    """RDFA of one feature at one position of one prompt."""

    layer: int
    feature: int
    position: int
    prompt: int
    """Row of the token batch."""
    pre_act: float
    """The feature's pre-activation there (SAELens's ``hook_sae_acts_pre``)."""
    bias: float
    """``c_f = b_enc[f] − b_dec · W_enc[:, f]``: the part no source explains."""
    activation: float
    """The SAE's activation of the feature there."""
    contributions: tuple[Contribution, ...]
    """Every part, largest magnitude first; ``Σ value + bias == pre_act``."""
    notes: tuple[str, ...]
    """What the split could not do as asked (layers without an SAE)."""
    tokens: tuple[int, ...]
    """The prompt's token ids up to ``position``."""

    def totals(self) -> dict[str, float]:
        """Top-level contributions summed per kind (and per layer for layered kinds)."""
        out: dict[str, float] = {}
        for row in self.contributions:
            key = row.kind if row.layer is None else f"{row.kind}@{row.layer}"
            out[key] = out.get(key, 0.0) + row.value
        return out

    def rows(self, tokenizer: Any = None) -> list[dict[str, Any]]:
        """The tree flattened depth-first, one record per contribution: ``id`` (dotted path),
        ``parent`` (``""`` at the top), ``depth``, the fields, and the source token."""
        records: list[dict[str, Any]] = []

        def visit(items: Sequence[Contribution], parent: str, depth: int) -> None:
            for index, row in enumerate(items):
                ident = f"{parent}.{index}" if parent else str(index)
                token = self.tokens[row.position]
                records.append(
                    {
                        "id": ident,
                        "parent": parent,
                        "depth": depth,
                        "kind": row.kind,
                        "layer": row.layer,
                        "position": row.position,
                        "token": token_text(tokenizer, token),
                        "feature": row.feature,
                        "activation": row.activation,
                        "value": row.value,
                        "children_bias": row.children_bias if row.children else None,
                    }
                )
                visit(row.children, ident, depth + 1)

        visit(self.contributions, "", 0)
        return records


@torch.no_grad()
def rdfa(
    model: Any,
    saes: Mapping[int, SAE[Any]] | Sequence[SAE[Any]] | SAE[Any],
    tokens: Int[Tensor, " pos"] | Int[Tensor, "batch pos"],
    layer: int,
    feature: int,
    position: int,
    *,
    prompt: int = 0,
    expand: int = 3,
    depth: int | None = None,
) -> RDFAResult:
    """Split a feature's pre-activation over every upstream part of the residual stream.

    Args:
        model: a HookedTransformer, a TransformerBridge, or a Hugging Face causal LM (plain
            or nnsight) whose layers are pre-norm (module ``residual_parts``).
        saes: hook_z SAEs of this model: one per layer (a list, or a mapping layer → SAE); the
            layer ``layer`` must have one. An earlier layer without one counts its whole
            attention output as an error term (the result's ``notes`` say so).
        tokens: a prompt ``[pos]``, or a batch ``[batch, pos]`` with ``prompt`` naming the row.
        layer: the feature's layer.
        feature: the feature index.
        position: the query position.
        prompt: the row of ``tokens``.
        expand: upstream features expanded per node, largest magnitude first (0: none).
        depth: levels of expansion at most (default: down to layer 0).

    Returns:
        An ``RDFAResult`` whose top-level values plus ``bias`` equal ``pre_act``.

    Raises:
        ValueError: no SAE for ``layer``, two SAEs for one layer, an SAE of another model,
            bad tokens, feature or position.
        UnsupportedModelError: a model whose residual stream is not a sum of parts, or a
            backend that does not read it (the message names the backend and what serves).

    Examples:
        >>> result = sla.analysis.rdfa(model, [sae0, sae1], tokens, layer=1, feature=253, position=40)
        >>> sum(row.value for row in result.contributions) + result.bias   # == result.pre_act
    """
    backend = backend_for(model)
    row = _prompt_row(tokens, model, prompt)
    by_layer = saes_by_layer(saes, backend)
    site = backend.site(layer)
    if site.layer not in by_layer:
        raise ValueError(
            f"rdfa needs the SAE of layer {site.layer}, whose feature it splits; got SAEs for "
            f"layers {sorted(by_layer)}"
        )
    target = by_layer[site.layer]
    feature = int(check_features([feature], target.cfg.d_sae)[0])
    position = _position(position, row.shape[1])
    expand = check_count("expand", expand, minimum=0)
    max_depth = None if depth is None else check_count("depth", depth, minimum=0)

    parts = read_residual_parts(backend, row, site.layer)
    missing = [below for below in range(site.layer) if below not in by_layer]
    notes = ()
    if missing:
        notes = (
            f"no SAE for layer(s) {missing}: each of their attention outputs (z·W_O + b_O) "
            "counts as one sae_error term",
        )
        warnings.warn(f"rdfa: {notes[0]}", stacklevel=2)
    upstream = {
        below: _decomposition(parts.layers[below], sae, backend)
        for below, sae in by_layer.items()
        if below < site.layer
    }
    nodes = _evaluate_nodes(
        backend, by_layer, row, parts, upstream, (site.layer, feature, position), expand, max_depth
    )
    root = nodes[site.layer, feature, position]
    contributions = _tree(nodes, (site.layer, feature, position), 0, max_depth)
    return RDFAResult(
        layer=site.layer,
        feature=feature,
        position=position,
        prompt=prompt,
        pre_act=root.pre_act,
        bias=root.bias,
        activation=root.activation,
        contributions=contributions,
        notes=notes,
        tokens=tuple(row[0, : position + 1].tolist()),
    )


@dataclass(frozen=True)
class _Decomposition:
    """One upstream layer's z through its SAE at every position, by SAELens's own encode and
    decode: ``z − shift = recon + error``."""

    acts: Float[Tensor, " pos d_sae"]
    """The SAE's activations (``encode``)."""
    recon: Float[Tensor, " pos d_in"]
    """``decode(acts)``."""
    error: Float[Tensor, " pos d_in"]
    shift: Float[Tensor, " d_in"]
    """``b_V'`` (flattened) where the SAE reads folded z, else 0: z = z_sae + shift."""
    pullback: Callable[[Tensor], Tensor]
    """``r [pos, d_in] ↦ ∂(Σ_s decode(acts)[s]·r[s]) / ∂acts [pos, d_sae]`` (the SAE's device
    and dtype): feature g adds ``acts[s, g] · that[s, g]`` to ``recon[s]·r[s]``."""


def _decomposition(maps: LayerMaps, sae: SAE[Any], backend: AttnBackend) -> _Decomposition:
    folded = sae_convention(sae, backend.native_convention) == "folded"
    shift = maps.value_bias.flatten() if folded else torch.zeros(maps.W_O.shape[0]).double()
    z = maps.z - shift.view(maps.z.shape[-2:])  # (pos, H, D): what the SAE reads
    acts = encode_z(sae, z.to(sae.W_dec.device)).detach()  # sets decode's output normalisation
    leaf = acts.clone().requires_grad_(True)
    with torch.enable_grad():
        recon = sae.decode(leaf).reshape(len(z), -1)  # (pos, d_in), in that normalisation

    def pullback(r: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(recon, leaf, grad_outputs=r.to(recon), retain_graph=True)
        return grad

    recon_cpu = recon.detach().cpu().double()
    return _Decomposition(
        acts=acts.cpu().double(),
        recon=recon_cpu,
        error=z.flatten(-2) - recon_cpu,
        shift=shift,
        pullback=pullback,
    )


@dataclass(frozen=True)
class _Node:
    pre_act: float
    bias: float
    activation: float
    rows: tuple[Contribution, ...]
    """The node's contributions, children not yet attached."""
    expanded: tuple[int, ...]
    """Indices of the feature rows whose own RDFA is computed."""


Key = tuple[int, int, int]
"""(layer, feature, position)."""


def _evaluate_nodes(
    backend: AttnBackend,
    saes: Mapping[int, SAE[Any]],
    row: Tensor,
    parts: ResidualParts,
    upstream: Mapping[int, _Decomposition],
    root: Key,
    expand: int,
    max_depth: int | None,
) -> dict[Key, _Node]:
    """Every node of the tree, layer by layer from the top: one DFA pass per layer."""
    wanted: dict[int, dict[tuple[int, int], int]] = {root[0]: {(root[1], root[2]): 0}}
    nodes: dict[Key, _Node] = {}
    for layer in range(root[0], -1, -1):
        keys = wanted.get(layer)
        if not keys:
            continue
        sae = saes[layer]
        features = sorted({f for f, _ in keys})
        positions = sorted({p for _, p in keys})
        result = dfa(backend, sae, row, features=features, positions=torch.tensor([positions]))
        for (feature, position), level in keys.items():
            column, query = features.index(feature), positions.index(position)
            rows = _split(
                parts,
                upstream,
                layer,
                _encoder_column(sae, feature, parts.layers[layer]),
                _input_scale(result.input_scale[0, query], column),
                position,
                sae_convention(sae, backend.native_convention) == "included",
            )
            pre, bias = float(result.pre_act[0, query, column]), float(result.bias[column])
            _check_sum(rows, bias, pre, (layer, feature, position))
            ranked = sorted(
                (i for i, r in enumerate(rows) if r.kind == "feature"),
                key=lambda i: -abs(rows[i].value),
            )
            expanded = tuple(ranked[:expand]) if max_depth is None or level < max_depth else ()
            nodes[layer, feature, position] = _Node(
                pre, bias, float(result.acts[0, query, column]), rows, expanded
            )
            for i in expanded:
                child = rows[i]
                assert child.layer is not None and child.feature is not None
                level_of = wanted.setdefault(child.layer, {})
                key = (child.feature, child.position)
                level_of[key] = min(level_of.get(key, level + 1), level + 1)
    return nodes


def _input_scale(at_query: Tensor, column: int) -> float:
    """``n[q]`` from ``DFAResult.input_scale``, per query (``[q]``) or per query and feature."""
    return float(at_query[column] if at_query.ndim else at_query)


def _encoder_column(
    sae: SAE[Any], feature: int, maps: LayerMaps
) -> Float[Tensor, " n_heads d_head"]:
    """``w``: the feature's encoder column as DFA applies it (centred under ``layer_norm``)."""
    column = sae.W_enc.detach()[:, feature].cpu().double()
    if sae.cfg.normalize_activations == "layer_norm":
        column = column - column.mean()
    return column.view(maps.z.shape[-2:])


def _split(
    parts: ResidualParts,
    upstream: Mapping[int, _Decomposition],
    layer: int,
    w: Float[Tensor, " n_heads d_head"],
    input_scale: float,
    position: int,
    includes_value_bias: bool,
) -> tuple[Contribution, ...]:
    """The contributions of one node (module docstring), largest magnitude first."""
    maps = parts.layers[layer]
    n_src = position + 1
    coef = input_scale * maps.pattern[:, position, :n_src]  # (H, S)
    read = torch.einsum("hmd,hd->hm", maps.W_V, w) * maps.norm_weight  # γ ⊙ W_V[h] w_h
    u = torch.einsum("hs,hm->sm", coef, read) / maps.norm_scale[:n_src, None]
    if maps.centres:
        u = u - u.mean(-1, keepdim=True)
    rows: list[Contribution] = []

    def per_source(kind: ContributionKind, values: Tensor, at: int | None) -> None:
        rows.extend(Contribution(kind, float(v), at, s) for s, v in enumerate(values.tolist()))

    if includes_value_bias:  # b_V'[h] · w_h, weighted by each source's attention
        per_source("value_bias", ((maps.value_bias * w).sum(-1)[:, None] * coef).sum(0), layer)

    per_source("token_embedding", (parts.token_embedding[:n_src] * u).sum(-1), None)
    if parts.position_embedding is not None:
        per_source("position_embedding", (parts.position_embedding[:n_src] * u).sum(-1), None)
    for below in range(layer):
        if parts.mlp_out is not None:
            per_source("mlp", (parts.mlp_out[below][:n_src] * u).sum(-1), below)
        lower = parts.layers[below]
        split = upstream.get(below)
        if split is None:
            assert lower.attn_out is not None  # read below the top layer
            per_source("sae_error", (lower.attn_out[:n_src] * u).sum(-1), below)
            continue
        r = u @ lower.W_O.T  # (S, d_in): what a unit of z at s contributes
        per_source("attention_bias", u @ lower.b_O + r @ split.shift, below)
        per_source("sae_error", (split.error[:n_src] * r).sum(-1), below)
        reads = torch.zeros_like(split.recon)
        reads[:n_src] = r
        grad = split.pullback(reads)  # (pos, d_sae)
        src, feats = split.acts[:n_src].nonzero(as_tuple=True)
        acts = split.acts[src, feats]
        values = acts * grad[src.to(grad.device), feats.to(grad.device)].cpu().double()
        features = torch.zeros(n_src, dtype=values.dtype).index_add_(0, src, values)
        # what decode adds beyond its features: its bias, with any output normalisation
        per_source("sae_decoder_bias", (split.recon[:n_src] * r).sum(-1) - features, below)
        for s, g, a, v in zip(
            src.tolist(), feats.tolist(), acts.tolist(), values.tolist(), strict=True
        ):
            rows.append(Contribution("feature", v, below, s, g, a))
    return tuple(sorted(rows, key=lambda r: -abs(r.value)))


def _check_sum(rows: Sequence[Contribution], bias: float, pre: float, key: Key) -> None:
    total = sum(r.value for r in rows) + bias
    if abs(total - pre) > _TOLERANCE * max(1.0, abs(pre)):
        raise RuntimeError(
            f"rdfa's split of layer {key[0]} feature {key[1]} at position {key[2]} sums to "
            f"{total:.6g} but DFA's pre-activation is {pre:.6g}: please report this model"
        )


def _tree(
    nodes: Mapping[Key, _Node], key: Key, level: int, max_depth: int | None
) -> tuple[Contribution, ...]:
    node = nodes[key]
    out = []
    for index, row in enumerate(node.rows):
        children: tuple[Contribution, ...] = ()
        children_bias = 0.0
        if index in node.expanded and (max_depth is None or level < max_depth):
            assert row.layer is not None and row.feature is not None
            child = (row.layer, row.feature, row.position)
            pre = nodes[child].pre_act
            m = row.value / pre if pre else 0.0  # the row per unit of the child's pre-activation
            children = tuple(_scaled(c, m) for c in _tree(nodes, child, level + 1, max_depth))
            children_bias = m * nodes[child].bias
        out.append(replace(row, children=children, children_bias=children_bias))
    return tuple(out)


def _scaled(row: Contribution, factor: float) -> Contribution:
    return replace(
        row,
        value=row.value * factor,
        children=tuple(_scaled(c, factor) for c in row.children),
        children_bias=row.children_bias * factor,
    )


def _prompt_row(tokens: Any, model: Any, prompt: int) -> Int[Tensor, "1 pos"]:
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    tokens = check_tokens(tokens, model)
    index = as_integer(prompt)
    if index is None or not 0 <= index < tokens.shape[0]:
        raise ValueError(
            f"prompt must be a row of tokens in 0..{tokens.shape[0] - 1}, got {prompt!r}"
        )
    return tokens[index : index + 1]


def _position(position: Any, n_pos: int) -> int:
    index = as_integer(position)
    if index is None or not 0 <= index < n_pos:
        raise ValueError(
            f"position must be a query position in 0..{n_pos - 1} of the prompt, got {position!r}"
        )
    return index
