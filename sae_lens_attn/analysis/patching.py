"""Activation patching between a clean and a corrupted run: noising and denoising, per layer
(and head), of the attention output, of z, or of SAE features.

The receiving run (clean for ``"noising"``, corrupt for ``"denoising"``) takes the target
activation of the giving run at aligned positions: position ``positions[i, j]`` of prompt i in the
receiver takes position ``source_positions[i, j]`` of prompt i in the giver. The two runs may
have different lengths (IOI's corruptions shift positions; right-padded rows with attention
masks): an alignment, e.g. from the IOI prompts' ``word_idx``, says which positions match.

Targets (``PATCH_TARGETS``), each patched at one layer at a time:

- ``"attn_out"``: the attention output ``Σ_h z_h W_O^h + b_O``. It is patched through z: all heads'
  z at the position take the giver's (z as the model computes it, value biases included). b_O
  is the same in both runs, so the attention output there becomes exactly the giver's; the same
  code runs on every backend (TransformerLens, TransformerBridge, Hugging Face through nnsight).
- ``"z"``: one head's z at a time: ``patched [layers, n_heads, batch]``.
- ``"features"``: all SAE features at the position, with the receiver's error term kept:
  ``z' = decode(a_giver) + (z_receiver − decode(a_receiver))`` (one SAE per layer, ``sae``).

Each (layer, head) is one job; jobs run batched (``batch_size`` rows per pass).

Examples:
    >>> # Kissane et al.'s noising of the attention output of layers 5 and 6 at S2
    >>> clean = sla.analysis.ioi_prompts(tokenizer)
    >>> corrupt = clean.corrupt("flip_names")
    >>> metric = sla.analysis.logit_diff(clean.word_idx["end"], clean.io_ids, clean.s_ids)
    >>> on_corrupt = sla.analysis.logit_diff(corrupt.word_idx["end"], clean.io_ids, clean.s_ids)
    >>> result = activation_patching(
    ...     model, clean.tokens, corrupt.tokens, (metric, on_corrupt), layers=[5, 6],
    ...     positions=clean.word_idx["S2"], source_positions=corrupt.word_idx["S2"],
    ...     clean_attention_mask=clean.attention_mask,
    ...     corrupt_attention_mask=corrupt.attention_mask)
    >>> result.patched  # [2, n_prompts]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.interventions import (
    PromptPositions,
    check_aligned,
    decode_like,
    metric_under_deltas,
    metric_values,
    prompt_positions,
    sae_site,
)
from sae_lens_attn.analysis.metrics import Metric
from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.corpus import real_positions
from sae_lens_attn.sae_adapter import check_device, encode_z
from sae_lens_attn.site import AttnSite, ValueBiasConvention, as_integer, saes_by_layer
from sae_lens_attn.validation import check_count, check_tokens

PatchTarget = Literal["attn_out", "z", "features"]
"""What ``activation_patching`` patches (module docstring)."""
PATCH_TARGETS: tuple[PatchTarget, ...] = get_args(PatchTarget)
Direction = Literal["noising", "denoising"]
"""``"noising"``: the clean run receives the corrupt run's activations; ``"denoising"``: the
corrupt run receives the clean run's."""
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)


@dataclass(frozen=True)
class ActivationPatching:
    """The metric of the clean, the corrupt and each patched run, per prompt."""

    clean: Float[Tensor, " batch"]
    """The metric of the clean run (the clean metric)."""
    corrupt: Float[Tensor, " batch"]
    """The metric of the corrupt run (the corrupt metric)."""
    patched: Float[Tensor, " layers batch"] | Float[Tensor, " layers n_heads batch"]
    """The metric of the receiving run with one layer's target (``"z"``: one head's) patched:
    ``[len(layers), batch]``, for ``"z"`` ``[len(layers), n_heads, batch]``."""
    layers: Int[Tensor, " layers"]
    """The layers, in the order of ``patched``."""
    target: PatchTarget
    """``"attn_out"``, ``"z"`` or ``"features"``."""
    direction: Direction
    """``"noising"`` (the clean run receives) or ``"denoising"`` (the corrupt run receives)."""


class _Run(NamedTuple):
    tokens: Int[Tensor, " batch pos"]
    mask: Int[Tensor, " batch pos"] | None
    metric: Metric
    name: str


def activation_patching(
    model: Any,
    clean_tokens: Int[Tensor, " batch pos"],
    corrupt_tokens: Int[Tensor, " batch pos"],
    metric: Metric | tuple[Metric, Metric],
    layers: int | Sequence[int],
    target: PatchTarget = "attn_out",
    positions: Any = None,
    source_positions: Any = None,
    direction: Direction = "noising",
    sae: SAE[Any] | Sequence[SAE[Any]] | Mapping[int, SAE[Any]] | None = None,
    *,
    clean_attention_mask: Int[Tensor, " batch pos"] | None = None,
    corrupt_attention_mask: Int[Tensor, " batch pos"] | None = None,
    batch_size: int = 64,
) -> ActivationPatching:
    """Noising or denoising of ``target`` at each of ``layers``, at positions aligned per prompt.

    Args:
        model: a ``HookedTransformer``, a ``TransformerBridge``, a Hugging Face causal LM (plain
            or nnsight), or a backend.
        clean_tokens: the clean prompts ``[batch, pos]``.
        corrupt_tokens: the corrupted prompts, one per clean prompt (``[batch, pos']``).
        metric: logits ``[batch, pos, vocab]`` → ``[batch]``, for both runs; or a pair
            ``(on_clean, on_corrupt)`` when the runs' positions differ (a metric reads fixed
            positions, so one metric cannot read both). A patched run is scored by the
            receiver's metric.
        layers: a layer or layers.
        target: ``"attn_out"``, ``"z"`` or ``"features"`` (module docstring).
        positions: the receiving run's positions per prompt (``Int[b]``, ``Int[b, k]``, a mask
            ``Bool[b, pos]``); default every real position, when both runs have the same lengths.
        source_positions: the giving run's positions, aligned one to one with ``positions`` per
            prompt; default ``positions``, when both runs have the same lengths.
        direction: ``"noising"`` (the clean run receives) or ``"denoising"`` (the corrupt run).
        sae: for ``"features"``: one hook_z SAE per layer of ``layers`` (an SAE, several, or a
            mapping layer → SAE).
        clean_attention_mask: 0 at the clean prompts' padding.
        corrupt_attention_mask: 0 at the corrupt prompts' padding.
        batch_size: rows per forward pass (jobs per pass: ``batch_size // batch``, at least one).

    Returns:
        ``ActivationPatching``: ``clean``, ``corrupt [b]`` and ``patched [len(layers), b]``
        (``"z"``: ``[len(layers), n_heads, b]``).

    Raises:
        ValueError: runs of different lengths without an alignment (or with one metric),
            positions out of range, on padding or not aligned one to one, an unknown target or
            direction, layers out of range, a missing SAE (``"features"``) or one of another
            model, a metric that does not return one value per prompt.
    """
    backend = backend_for(model)
    if target not in PATCH_TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {list(PATCH_TARGETS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {list(DIRECTIONS)}")
    batch_size = check_count("batch_size", batch_size)
    clean_tokens = check_tokens(clean_tokens, backend)
    corrupt_tokens = check_tokens(corrupt_tokens, backend)
    if clean_tokens.shape[0] != corrupt_tokens.shape[0]:
        raise ValueError(
            f"one corrupt prompt per clean prompt is needed: got {clean_tokens.shape[0]} clean "
            f"and {corrupt_tokens.shape[0]} corrupt prompts"
        )
    layer_list = _layers(backend, layers)
    same = _same_lengths(clean_tokens, clean_attention_mask, corrupt_tokens, corrupt_attention_mask)
    on_clean, on_corrupt = _metrics(metric, same)
    clean = _Run(clean_tokens, clean_attention_mask, on_clean, "clean")
    corrupt = _Run(corrupt_tokens, corrupt_attention_mask, on_corrupt, "corrupt")
    receiver, giver = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    where, there = _alignment(receiver, giver, positions, source_positions, same)
    saes = _saes(backend, sae, layer_list) if target == "features" else {}

    batch = clean_tokens.shape[0]
    reads = _reads(backend, target, layer_list, saes)
    seen = {run.name: _read(backend, run, batch, reads) for run in (clean, corrupt)}
    deltas = _deltas(
        target, layer_list, saes, seen[receiver.name][1], seen[giver.name][1], where, there
    )
    jobs = list(deltas)

    def deltas_of(chunk: range) -> dict[int, Tensor]:
        layers_here = sorted({jobs[j][0] for j in chunk})
        return {
            layer: torch.stack(
                [
                    deltas[jobs[j]] if jobs[j][0] == layer else torch.zeros_like(deltas[jobs[j]])
                    for j in chunk
                ]
            )
            for layer in layers_here
        }

    patched = metric_under_deltas(
        backend,
        receiver.tokens,
        receiver.mask,
        receiver.metric,
        where,
        len(jobs),
        deltas_of,
        batch_size=batch_size,
    )
    if target == "z":
        patched = patched.reshape(len(layer_list), -1, batch)
    return ActivationPatching(
        clean=seen["clean"][0],
        corrupt=seen["corrupt"][0],
        patched=patched,
        layers=torch.tensor(layer_list, dtype=torch.long),
        target=target,
        direction=direction,
    )


def _layers(backend: AttnBackend, layers: int | Sequence[int]) -> list[int]:
    as_int = as_integer(layers)
    given: list[Any] = [as_int] if as_int is not None else list(layers)  # type: ignore[arg-type]
    if not given:
        raise ValueError(f"no layers given: give at least one in 0..{backend.n_layers - 1}")
    checked = [backend.site(layer).layer for layer in given]
    if len(set(checked)) != len(checked):
        raise ValueError(f"layers repeat: {checked}; give each layer once")
    return checked


def _same_lengths(
    clean: Tensor, clean_mask: Tensor | None, corrupt: Tensor, corrupt_mask: Tensor | None
) -> bool:
    """Whether every clean prompt has its real tokens where its corrupt prompt has them."""
    if clean.shape != corrupt.shape:
        return False
    return bool(
        torch.equal(
            real_positions(clean_mask, clean).cpu(), real_positions(corrupt_mask, corrupt).cpu()
        )
    )


def _metrics(metric: Metric | tuple[Metric, Metric], same: bool) -> tuple[Metric, Metric]:
    if isinstance(metric, tuple):
        if len(metric) != 2 or not all(callable(m) for m in metric):
            raise ValueError(
                "metric must be one metric, or a pair (on_clean, on_corrupt) of metrics; got a "
                f"tuple of {len(metric)}"
            )
        return metric[0], metric[1]
    if not callable(metric):
        raise TypeError(f"metric must be callable (logits -> [batch]), got {type(metric).__name__}")
    if not same:
        raise ValueError(
            "the clean and corrupt prompts differ in length, so one metric cannot read both runs "
            "at the same positions: give metric=(on_clean, on_corrupt), each reading its own "
            "run's positions (e.g. logit_diff(corrupt.word_idx['end'], clean.io_ids, "
            "clean.s_ids) on the corrupt run)"
        )
    return metric, metric


def _alignment(
    receiver: _Run, giver: _Run, positions: Any, source_positions: Any, same: bool
) -> tuple[PromptPositions, PromptPositions]:
    """The receiving and giving positions, checked and aligned one to one per prompt."""
    if positions is None and source_positions is not None:
        raise ValueError(
            "source_positions were given without positions: give the receiving run's positions "
            "too (aligned one to one with source_positions)"
        )
    if not same and source_positions is None:
        raise ValueError(
            f"the clean prompts {list(receiver.tokens.shape)} and the corrupt prompts "
            f"{list(giver.tokens.shape)} differ in length (or padding), so positions do not "
            "align by index: give positions (receiving run) and source_positions (giving run), "
            "aligned per prompt, e.g. from the IOI prompts' word_idx"
        )
    if positions is None:
        positions = real_positions(receiver.mask, receiver.tokens).cpu()
    if source_positions is None:
        source_positions = positions
    run = f"the receiving ({receiver.name}) run"
    where = prompt_positions(
        positions, receiver.tokens.shape, receiver.mask, name=f"positions (in {run})"
    )
    there = prompt_positions(
        source_positions,
        giver.tokens.shape,
        giver.mask,
        name=f"source_positions (in the giving ({giver.name}) run)",
    )
    check_aligned(where.counts, there.counts, ("positions", "source_positions"))
    return where, there


def _saes(
    backend: AttnBackend,
    sae: SAE[Any] | Sequence[SAE[Any]] | Mapping[int, SAE[Any]] | None,
    layers: list[int],
) -> dict[int, SAE[Any]]:
    if sae is None:
        raise ValueError("target 'features' needs sae=: one hook_z SAE per patched layer")
    by_layer = saes_by_layer(sae, backend)
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise ValueError(
            f"target 'features' needs an SAE at every patched layer; none reads layers {missing} "
            f"(the SAEs read layers {sorted(by_layer)})"
        )
    return by_layer


ReadKey = tuple[ValueBiasConvention, int]
"""z of one layer in one value-bias convention."""


def _reads(
    backend: AttnBackend, target: PatchTarget, layers: list[int], saes: dict[int, SAE[Any]]
) -> dict[ValueBiasConvention, list[AttnSite]]:
    """The sites each run's pass captures, by convention: z as the model computes it, or for
    ``"features"`` each SAE's own convention."""
    wanted: dict[ValueBiasConvention, list[AttnSite]] = {}
    for layer in layers:
        if target == "features":
            site, convention = sae_site(backend, saes[layer])
        else:
            site, convention = backend.site(layer), backend.native_convention
        wanted.setdefault(convention, []).append(site)
    return wanted


@torch.no_grad()
def _read(
    backend: AttnBackend,
    run: _Run,
    batch: int,
    reads: dict[ValueBiasConvention, list[AttnSite]],
) -> tuple[Tensor, dict[ReadKey, Tensor]]:
    """One pass of ``run``: its metric, and z at the sites of ``reads``."""
    with ExitStack() as stack:
        captures = {
            convention: stack.enter_context(backend.capturing(sites, convention=convention))
            for convention, sites in reads.items()
        }
        logits = backend.forward(run.tokens, attention_mask=run.mask)
    assert logits is not None
    values = metric_values(run.metric, logits, batch).detach().float().cpu()
    z: dict[ReadKey, Tensor] = {
        (convention, site.layer): captures[convention][site.layer].z
        for convention, sites in reads.items()
        for site in sites
    }
    return values, z


JobKey = tuple[int, int | None]
"""A job: its layer, and its head for target ``"z"``."""


@torch.no_grad()
def _deltas(
    target: PatchTarget,
    layers: list[int],
    saes: dict[int, SAE[Any]],
    mine: dict[ReadKey, Tensor],
    theirs: dict[ReadKey, Tensor],
    where: PromptPositions,
    there: PromptPositions,
) -> dict[JobKey, Float[Tensor, " N n_heads d_head"]]:
    """Each job's change of the receiver's z at ``where``: the giver's target at ``there`` minus
    the receiver's own (a difference of z, the same in every value-bias convention)."""
    out: dict[JobKey, Tensor] = {}
    for layer in layers:
        key = next(key for key in mine if key[1] == layer)
        own, given = mine[key], theirs[key]
        if target == "features":  # decode(a_giver) + (z − decode(a)): the features' change
            own, given = _reconstruction(saes[layer], own), _reconstruction(saes[layer], given)
        change = _at(given, there) - _at(own, where).to(given.dtype)
        if target != "z":
            out[layer, None] = change
            continue
        for head in range(change.shape[1]):
            one = torch.zeros_like(change)
            one[:, head] = change[:, head]
            out[layer, head] = one
    return out


def _at(z: Tensor, where: PromptPositions) -> Tensor:
    return z[where.rows.to(z.device), where.cols.to(z.device)]


def _reconstruction(sae: SAE[Any], z: Tensor) -> Float[Tensor, " batch pos n_heads d_head"]:
    """The SAE's reconstruction of z (its features, without the error term)."""
    check_device(sae, z)
    return decode_like(sae, z, encode_z(sae, z))
