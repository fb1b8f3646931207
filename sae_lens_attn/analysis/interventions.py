"""Interventions on SAE features with the error term kept (DESIGN.md, "Causal analysis").

An SAE spliced at its layer replaces z by ``z' = decode(a') + (z − decode(a))``, with
``a = encode(z)`` and ``a'`` the edited activations: with no edit ``z' = z`` and the model's output
is unchanged. An ``Edit`` changes chosen features (or the error term ``z − decode(a)``) of one SAE
at chosen positions **of each prompt**: prompt i is edited at its own positions only.

Modes (``EDIT_MODES``), for features (``a'``) and for the error term (``e'``):

- ``"zero"``: ``a' = 0`` (the error term: ``e' = 0``, z becomes the SAE's reconstruction).
- ``"scale"``: ``a' = value · a`` (value a number, or one per SAE feature ``[d_sae]``).
- ``"set"``: ``a' = value`` (a number or ``[d_sae]``; for the error term a number or a vector
  ``[d_in]`` / ``[n_heads, d_head]``).
- ``"mean"``: ``a' = value``, the mean over a reference set (``reference_means``): ``.acts``
  ``[d_sae]`` for features, ``.error`` ``[d_in]`` for the error term.
- ``"patch"``: ``a'`` is what another run (``Source``) had at the aligned positions:
  ``positions[i, j]`` of this run takes ``source.positions[i, j]`` of the other.

Every tensor value of one per SAE feature is indexed by feature id (``value[f]``).

Several SAEs splice at once (one per layer); an edit at layer 5 changes the z that layer 6's SAE
encodes, and layer 6's error term is computed from that z, so layer 6 still passes z through
unchanged where it is not edited. Each SAE reads z in its own value-bias convention
(``sae_convention``); a splice changes z only at edited positions (elsewhere z is passed on as
is, bit for bit).

Examples:
    >>> edit = Edit(sae, features=[42], positions=prompts.word_idx["S2"], mode="zero")
    >>> with spliced(model, edits=[edit]) as run:
    ...     logits = run(prompts.tokens, prompts.attention_mask)

``metric_under_deltas`` is the batched engine behind ``feature_ablation`` and
``activation_patching``: it replicates the prompt batch once per job (a feature, a layer, a head)
and adds each job's own change of z at each prompt's own positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.metrics import Metric
from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.sae_adapter import ENCODE_BLOCK, check_device, encode_z, sae_convention
from sae_lens_attn.site import AttnSite, ValueBiasConvention
from sae_lens_attn.validation import check_count, check_features, check_tokens

EditMode = Literal["zero", "scale", "set", "mean", "patch"]
"""How an ``Edit`` changes activations (module docstring)."""
EDIT_MODES: tuple[EditMode, ...] = get_args(EditMode)
ERROR_TERM = "error"
"""``Edit.features`` value that edits the error term ``z − decode(a)`` instead of features."""
RUNTIME_NORMALISATIONS = ("constant_norm_rescale", "layer_norm")
"""SAELens ``normalize_activations`` values applied at run time: ``decode`` reads a scale that
the preceding ``encode`` stored (and deletes it), so every decode here follows its own encode."""
_NEEDS_VALUE: tuple[EditMode, ...] = ("scale", "set", "mean")


class Source(NamedTuple):
    """Another run, whose activations an ``Edit`` in mode ``"patch"`` takes."""

    tokens: Int[Tensor, " batch pos"]
    """Its token ids: one row per prompt of the edited run (lengths may differ)."""
    positions: Any
    """Its positions aligned with the edit's, per prompt: ``Int[b]``, ``Int[b, k]`` or a mask
    ``Bool[b, pos]`` giving each prompt as many positions as the edit gives it (paired in order)."""
    attention_mask: Int[Tensor, " batch pos"] | None = None
    """0 at its padding (default: none)."""


@dataclass(frozen=True, eq=False)
class Edit:
    """One edit of one spliced SAE's activations (or of its error term), per prompt.

    Raises ``ValueError`` at construction for an unknown mode, a missing or superfluous ``value``
    or ``source``, or feature indices out of range; positions are checked against the tokens of
    each run.
    """

    sae: SAE[Any]
    """The hook_z SAE whose activations change (spliced at its own layer)."""
    features: Int[Tensor, " F"] | Sequence[int] | Literal["error"]
    """Feature indices, or ``"error"`` (``ERROR_TERM``) for the error term ``z − decode(a)``."""
    positions: Any
    """Where, per prompt: ``Int[b]`` (one position each), ``Int[b, k]`` (k each), or a mask
    ``Bool[b, pos]``. Prompt i is edited at its own positions only."""
    mode: EditMode = "zero"
    """``EDIT_MODES``: ``"zero"``, ``"scale"``, ``"set"``, ``"mean"`` or ``"patch"``."""
    value: float | Tensor | None = None
    """The factor (``"scale"``), the value (``"set"``), the reference mean (``"mean"``); a number,
    one per SAE feature ``[d_sae]``, or for the error term a vector ``[d_in]``."""
    source: Source | None = None
    """The other run of a ``"patch"`` edit."""

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {self.mode!r}; valid: {list(EDIT_MODES)}")
        if self.mode in _NEEDS_VALUE and self.value is None:
            raise ValueError(f"an edit in mode {self.mode!r} needs a value, got none")
        if self.mode not in _NEEDS_VALUE and self.value is not None:
            raise ValueError(
                f"an edit in mode {self.mode!r} takes no value (only {list(_NEEDS_VALUE)} do), "
                f"got {self.value!r}"
            )
        if (self.mode == "patch") != (self.source is not None):
            raise ValueError(
                "an edit takes a source (the other run) exactly in mode 'patch'; got mode "
                f"{self.mode!r} with source={'given' if self.source is not None else None}"
            )
        if isinstance(self.features, str) and self.features != ERROR_TERM:
            raise ValueError(
                f"Edit.features must be feature indices or {ERROR_TERM!r} (the error term), got "
                f"{self.features!r}"
            )
        if not self.on_error:
            check_features(self.feature_ids, self.sae.cfg.d_sae)

    @property
    def on_error(self) -> bool:
        """Whether this edit changes the error term rather than features."""
        return isinstance(self.features, str)

    @property
    def feature_ids(self) -> Int[Tensor, " F"]:
        """The feature indices as a long tensor (raises for an error-term edit)."""
        if isinstance(self.features, str):
            raise ValueError("an error-term edit has no feature indices")
        return check_features(self.features, self.sae.cfg.d_sae)


class ReferenceMeans(NamedTuple):
    """Mean activations and mean error term of an SAE over the real positions of a reference set:
    the ``value`` of ``"mean"`` edits."""

    acts: Float[Tensor, " d_sae"]
    """Each feature's mean activation."""
    error: Float[Tensor, " d_in"]
    """The mean error term ``z − decode(encode(z))``, heads concatenated."""


class PromptPositions(NamedTuple):
    """Positions given per prompt, flattened prompt-major (prompt 0's first, in their order)."""

    rows: Int[Tensor, " N"]
    """The prompt of each entry."""
    cols: Int[Tensor, " N"]
    """Its position in that prompt."""
    counts: Int[Tensor, " batch"]
    """How many positions each prompt has."""


def check_aligned(
    counts: Int[Tensor, " batch"], other: Int[Tensor, " batch"], names: tuple[str, str]
) -> None:
    """Raise ``ValueError`` unless both give as many prompts, and each prompt as many positions
    (``PromptPositions.counts``): positions aligned one to one, per prompt."""
    if counts.shape != other.shape:
        raise ValueError(
            f"{names[0]} are given for {counts.shape[0]} prompts and {names[1]} for "
            f"{other.shape[0]}: both runs need one row per prompt"
        )
    differ = (counts != other).nonzero().flatten()
    if differ.numel():
        i = int(differ[0])
        raise ValueError(
            f"{names[0]} and {names[1]} must be aligned one to one per prompt, but prompt {i} "
            f"has {int(counts[i])} {names[0]} and {int(other[i])} {names[1]}"
        )


def prompt_positions(
    positions: Any,
    shape: tuple[int, int] | torch.Size,
    attention_mask: Tensor | None = None,
    *,
    name: str = "positions",
) -> PromptPositions:
    """Per-prompt positions ``Int[b]``, ``Int[b, k]`` or ``Bool[b, pos]`` for tokens of ``shape``.

    Raises:
        TypeError: positions that are not integers or booleans.
        ValueError: another batch size, positions out of range, on padding (``attention_mask``
            0 there), or repeated within a prompt. Messages name ``name``.
    """
    batch, n_pos = int(shape[0]), int(shape[1])
    try:
        given = torch.as_tensor(positions).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{name} must be integers [batch] or [batch, k], or a mask [batch, pos], got "
            f"{type(positions).__name__}"
        ) from error
    if given.dtype == torch.bool:
        if tuple(given.shape) != (batch, n_pos):
            raise ValueError(
                f"{name} as a mask must have the tokens' shape [{batch}, {n_pos}], got "
                f"{list(given.shape)}"
            )
        rows, cols = given.nonzero(as_tuple=True)
    else:
        if given.dtype.is_floating_point or given.dtype.is_complex:
            raise TypeError(f"{name} must be integer positions or a bool mask, got {given.dtype}")
        given = given.long()
        given = given[:, None] if given.ndim == 1 else given
        if given.ndim != 2 or given.shape[0] != batch:
            raise ValueError(
                f"{name} must be [batch] or [batch, k] with batch={batch} (one row per prompt), "
                f"or a mask [batch, pos], got shape {list(given.shape)}"
            )
        bad = given[(given < 0) | (given >= n_pos)]
        if bad.numel():
            raise ValueError(
                f"{name} {bad.tolist()[:10]} are out of range for {n_pos} tokens "
                f"(valid: 0..{n_pos - 1})"
            )
        rows = torch.arange(batch).repeat_interleave(given.shape[1])
        cols = given.flatten()
        ordered = given.sort(dim=1).values
        repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().flatten()
        if repeats.numel():
            i = int(repeats[0])
            raise ValueError(
                f"{name} of prompt {i} repeat a position ({given[i].tolist()}): give each "
                "position of a prompt once"
            )
    if attention_mask is not None:
        mask = attention_mask.detach().cpu()
        if tuple(mask.shape) != (batch, n_pos):
            raise ValueError(
                f"attention_mask must have the tokens' shape [{batch}, {n_pos}], got "
                f"{list(mask.shape)}"
            )
        padded = (mask[rows, cols] == 0).nonzero().flatten()
        if padded.numel():
            j = int(padded[0])
            raise ValueError(
                f"{name} put prompt {int(rows[j])} at position {int(cols[j])}, which is padding "
                f"(attention_mask 0); that prompt's real positions are "
                f"{mask[rows[j]].nonzero().flatten().tolist()}"
            )
    counts = torch.bincount(rows, minlength=batch)
    return PromptPositions(rows, cols, counts)


def metric_values(metric: Metric, logits: Tensor, batch: int) -> Float[Tensor, " batch"]:
    """``metric(logits)``, checked to be one floating-point value per prompt.

    Raises:
        ValueError: the metric returned something else than a float tensor of shape ``[batch]``.
    """
    values = metric(logits)
    if (
        not isinstance(values, Tensor)
        or not values.dtype.is_floating_point
        or tuple(values.shape) != (batch,)
    ):
        got = (
            f"a {values.dtype} tensor of shape {list(values.shape)}"
            if isinstance(values, Tensor)
            else type(values).__name__
        )
        raise ValueError(
            f"the metric must return one value per prompt, a float tensor of shape [{batch}] "
            f"(e.g. sla.analysis.logit_diff); it returned {got}"
        )
    return values


def decode_like(sae: SAE[Any], z: Tensor, acts: Tensor) -> Tensor:
    """``sae.decode(acts)`` shaped like z; for an SAE with run-time normalisation, after an
    ``encode`` of z (SAELens's decode reads the scale that encode stored)."""
    if sae.cfg.normalize_activations in RUNTIME_NORMALISATIONS:
        encode_z(sae, z)
    return sae.decode(acts).reshape(z.shape)


def sae_site(backend: AttnBackend, sae: SAE[Any]) -> tuple[AttnSite, ValueBiasConvention]:
    """The site an SAE reads on this model and the value-bias convention it was trained on.

    Raises:
        ValueError: the SAE is not a hook_z SAE of this model (another model's site).
    """
    return AttnSite.from_sae(sae, backend), sae_convention(sae, backend.native_convention)


@torch.no_grad()
def reference_means(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
) -> ReferenceMeans:
    """The SAE's mean activations and mean error term over the real positions of ``tokens``.

    Args:
        model: any model a backend supports (or a backend).
        sae: a hook_z SAE of that model.
        tokens: the reference set's token ids, or a ``Corpus`` holding them.
        attention_mask: 0 at padding, which is left out of the means.

    Returns:
        ``ReferenceMeans``: ``acts [d_sae]`` and ``error [d_in]``, the values of ``"mean"`` edits.
    """
    corpus = corpus_of(model, tokens, attention_mask)
    sae_site(corpus.backend, sae)
    z = corpus.z(sae)
    check_device(sae, z)
    acts = corpus.activations(sae)
    error = (z - decode_like(sae, z, acts).to(z.dtype)).flatten(-2)
    real = corpus.real.to(z.device)
    return ReferenceMeans(acts[real].double().mean(0).float(), error[real].double().mean(0).float())


def edited_values(
    mode: EditMode,
    current: Float[Tensor, " N width"],
    value: float | Tensor | None,
    source: Float[Tensor, " N width"] | None,
    index: Int[Tensor, " width"] | None,
    what: str,
) -> Float[Tensor, " N width"]:
    """What an edit in ``mode`` puts in place of ``current`` (features ``index`` of an SAE, or
    the error term with ``index`` None).

    Raises:
        ValueError: a value of the wrong shape (the message gives the valid shapes).
    """
    if mode == "zero":
        return torch.zeros_like(current)
    if mode == "patch":
        assert source is not None
        return source.to(current)
    assert value is not None
    given = torch.as_tensor(value, dtype=current.dtype, device=current.device)
    if given.ndim == 0:
        wide = given
    elif index is not None and given.ndim == 1:
        if given.shape[0] <= int(index.max()):
            raise ValueError(
                f"the {mode!r} value of {what} must be a number or one value per SAE feature "
                f"[d_sae], indexed by feature id; got shape {list(given.shape)}"
            )
        wide = given[index.to(given.device)]
    elif index is None and given.numel() == current.shape[-1]:
        wide = given.reshape(current.shape[-1])
    else:
        valid = "[d_sae]" if index is not None else f"[{current.shape[-1]}] (d_in)"
        raise ValueError(
            f"the {mode!r} value of {what} must be a number or a tensor {valid}, got shape "
            f"{list(given.shape)}"
        )
    return current * wide if mode == "scale" else wide.expand_as(current).clone()


class _Prepared(NamedTuple):
    edit: Edit
    source: Tensor | None
    """What the other run had at the source positions: ``[N, F]`` or ``[N, d_in]``."""
    source_counts: Tensor | None
    """How many source positions each prompt has."""


class SplicedRun:
    """What ``spliced`` yields: call it on token ids to run the model with the SAEs spliced."""

    def __init__(self, backend: AttnBackend, edits: Sequence[Edit]) -> None:
        self.backend = backend
        self._edits = edits

    def __call__(
        self,
        tokens: Int[Tensor, " batch pos"],
        attention_mask: Int[Tensor, " batch pos"] | None = None,
    ) -> Float[Tensor, " batch pos d_vocab"]:
        """The model's logits on ``tokens`` with the SAEs spliced and the edits applied.

        Raises:
            ValueError: an edit's positions do not fit these tokens (batch, range, padding).
        """
        tokens = check_tokens(tokens, self.backend)
        for edit in self._edits:
            prompt_positions(edit.positions, tokens.shape, attention_mask, name="Edit.positions")
        logits = self.backend.forward(tokens, attention_mask=attention_mask)
        assert logits is not None
        return logits


@contextmanager
def spliced(
    model: Any, saes: SAE[Any] | Sequence[SAE[Any]] = (), edits: Edit | Sequence[Edit] = ()
) -> Iterator[SplicedRun]:
    """Splice SAEs with their error terms kept, applying ``edits`` per prompt, inside the block.

    Args:
        model: a ``HookedTransformer``, a ``TransformerBridge``, a Hugging Face causal LM
            (plain or nnsight), or a backend.
        saes: hook_z SAEs to splice (at most one per layer); the SAEs of ``edits`` are spliced
            too. An SAE without edits leaves the model's output unchanged.
        edits: ``Edit`` values, applied in order per SAE.

    Yields:
        A ``SplicedRun``: ``run(tokens, attention_mask=None)`` returns the logits. On
        TransformerLens models and bridges the splices are hooks, so ``model(tokens)`` inside
        the block is spliced too; on Hugging Face models only the backend's forward is.

    Raises:
        ValueError: an SAE of another model, two SAEs on one layer, an SAE on another device,
            positions that do not fit the tokens.

    Examples:
        >>> edits = [Edit(sae5, [12, 40], prompts.word_idx["S2"]),
        ...          Edit(sae5, "error", prompts.word_idx["S2"], mode="scale", value=0.5)]
        >>> with spliced(model, [sae5, sae6], edits) as run:
        ...     metric(run(prompts.tokens, prompts.attention_mask))
    """
    backend = backend_for(model)
    edit_list = [edits] if isinstance(edits, Edit) else list(edits)
    for edit in edit_list:
        if not isinstance(edit, Edit):
            raise TypeError(f"edits must be Edit values, got {type(edit).__name__}")
    sae_list = [saes] if isinstance(saes, SAE) else list(saes)
    for edit in edit_list:
        if not any(edit.sae is sae for sae in sae_list):
            sae_list.append(edit.sae)
    by_layer: dict[int, tuple[SAE[Any], AttnSite, ValueBiasConvention]] = {}
    for sae in sae_list:
        site, convention = sae_site(backend, sae)
        if site.layer in by_layer:
            raise ValueError(f"two SAEs read layer {site.layer}: splice at most one SAE per layer")
        by_layer[site.layer] = (sae, site, convention)
    prepared = [_prepare(backend, edit) for edit in edit_list]
    with ExitStack() as stack:
        for sae, site, convention in by_layer.values():
            own = [p for p in prepared if p.edit.sae is sae]
            stack.enter_context(backend.splicing({site: _splice(sae, own)}, convention=convention))
        yield SplicedRun(backend, edit_list)


def _prepare(backend: AttnBackend, edit: Edit) -> _Prepared:
    """The edit with, for ``"patch"``, the other run's values at its positions."""
    if edit.source is None:
        return _Prepared(edit, None, None)
    source = edit.source
    corpus = Corpus(backend, source.tokens, source.attention_mask)
    where = prompt_positions(
        source.positions, corpus.tokens.shape, source.attention_mask, name="Source.positions"
    )
    sae_site(backend, edit.sae)
    z = corpus.z(edit.sae)
    check_device(edit.sae, z)
    at = (where.rows.to(z.device), where.cols.to(z.device))
    if edit.on_error:
        error = z - decode_like(edit.sae, z, corpus.activations(edit.sae)).to(z.dtype)
        return _Prepared(edit, error.flatten(-2)[at], where.counts)
    acts = corpus.activations(edit.sae)[at][:, edit.feature_ids.to(z.device)]
    return _Prepared(edit, acts, where.counts)


def _splice(sae: SAE[Any], edits: Sequence[_Prepared]) -> Callable[[Tensor], Tensor]:
    """``z ↦ z'``: z itself where no edit applies, ``decode(a') + e'`` where one does."""

    def replace(z: Float[Tensor, " batch pos n_heads d_head"]) -> Tensor:
        if not edits:
            return z  # decode(a) + (z − decode(a)) is z: pass it on untouched
        check_device(sae, z)
        acts = encode_z(sae, z)
        recon = decode_like(sae, z, acts)
        error = z.to(recon.dtype) - recon
        new_acts, new_error = acts.clone(), error.flatten(-2).clone()
        edited = torch.zeros(z.shape[:2], dtype=torch.bool, device=z.device)
        for edit, source, source_counts in edits:
            where = prompt_positions(edit.positions, z.shape[:2], name="Edit.positions")
            if source_counts is not None:
                check_aligned(where.counts, source_counts, ("Edit.positions", "Source.positions"))
            rows, cols = where.rows.to(z.device), where.cols.to(z.device)
            edited[rows, cols] = True
            if edit.on_error:
                new_error[rows, cols] = edited_values(
                    edit.mode, new_error[rows, cols], edit.value, source, None, "the error term"
                )
            else:
                f = edit.feature_ids.to(z.device)
                grid = (rows[:, None], cols[:, None], f[None])
                new_acts[grid] = edited_values(
                    edit.mode, new_acts[grid], edit.value, source, f, "features"
                )
        new_recon = decode_like(sae, z, new_acts)
        delta = (new_recon - recon) + (new_error - error.flatten(-2)).reshape(z.shape)
        return torch.where(edited[..., None, None], z + delta.to(z.dtype), z)

    return replace


# --- the batched engine of feature_ablation and activation_patching ------------------------------

DeltasOf = Callable[[range], Mapping[int, Float[Tensor, " C N n_heads d_head"]]]
"""For a range of jobs, the change of z each job makes at each layer, at the receiving positions
(``[jobs, N, n_heads, d_head]``, zeros where a job leaves a layer alone)."""


def metric_under_deltas(
    backend: AttnBackend,
    tokens: Int[Tensor, " batch pos"],
    attention_mask: Int[Tensor, " batch pos"] | None,
    metric: Metric,
    where: PromptPositions,
    n_jobs: int,
    deltas_of: DeltasOf,
    *,
    batch_size: int,
) -> Float[Tensor, " n_jobs batch"]:
    """The metric per job and prompt when each job adds its own change of z at ``where``.

    Jobs run ``max(1, batch_size // batch)`` at a time: the prompt batch is repeated once per
    job, and each replica gets its job's change at each prompt's own positions (z as the model
    computes it; a difference of z is the same in every value-bias convention).
    """
    batch = tokens.shape[0]
    per_pass = max(1, check_count("batch_size", batch_size) // batch)
    out = torch.empty(n_jobs, batch)
    for start in range(0, n_jobs, per_pass):
        jobs = range(start, min(n_jobs, start + per_pass))
        replicas = len(jobs)
        deltas = deltas_of(jobs)
        splices = {
            backend.site(layer): _adder(delta, where, batch, replicas)
            for layer, delta in deltas.items()
        }
        mask = None if attention_mask is None else attention_mask.repeat(replicas, 1)
        with torch.no_grad(), backend.splicing(splices, convention=backend.native_convention):
            logits = backend.forward(tokens.repeat(replicas, 1), attention_mask=mask)
        assert logits is not None
        for r in range(replicas):
            rows = slice(r * batch, (r + 1) * batch)
            out[start + r] = metric_values(metric, logits[rows], batch).float().cpu()
    return out


def _adder(
    delta: Float[Tensor, " C N n_heads d_head"], where: PromptPositions, batch: int, replicas: int
) -> Callable[[Tensor], Tensor]:
    def add(z: Tensor) -> Tensor:
        if z.shape[0] != replicas * batch:
            raise RuntimeError(
                f"a pass of {z.shape[0]} rows reached a splice made for {replicas} replicas of "
                f"{batch} prompts"
            )
        offsets = torch.arange(replicas, device=z.device)[:, None] * batch
        rows = (offsets + where.rows.to(z.device)[None]).flatten()
        cols = where.cols.to(z.device).repeat(replicas)
        out = z.clone()
        out[rows, cols] += delta.flatten(0, 1).to(device=z.device, dtype=z.dtype)
        return out

    return add


def check_fixed_decoder(sae: SAE[Any]) -> None:
    """Raise ``ValueError`` unless the SAE decodes with the same affine map at every position
    (no run-time normalisation), so that a feature's change of z is one vector per feature."""
    if sae.cfg.normalize_activations in RUNTIME_NORMALISATIONS:
        raise ValueError(
            f"this SAE normalises z at run time (normalize_activations="
            f"{sae.cfg.normalize_activations!r}), so a feature's decoder change differs per "
            "position; feature_ablation supports SAEs whose decode is the same affine map at "
            f"every position (normalize_activations not in {list(RUNTIME_NORMALISATIONS)}); "
            "the spliced(...) context manager supports every SAE"
        )


@torch.no_grad()
def feature_rows(sae: SAE[Any], features: Int[Tensor, " F"]) -> Float[Tensor, " F d_in"]:
    """``decode(e_f) − decode(0)`` for each feature: the change of z per unit of activation
    (``W_dec[f]``, divided by ``‖W_dec[f]‖`` for TopK SAEs that rescale by it), from SAELens's own
    decode, in blocks of one-hot rows.

    Raises:
        ValueError: an SAE whose decode depends on the input's run-time normalisation.
    """
    check_fixed_decoder(sae)
    d_sae, param = sae.cfg.d_sae, sae.W_dec
    zero = sae.decode(torch.zeros(1, d_sae, dtype=param.dtype, device=param.device)).flatten(1)
    rows = []
    for part in features.to(param.device).split(max(1, ENCODE_BLOCK // d_sae)):
        basis = torch.zeros(part.numel(), d_sae, dtype=param.dtype, device=param.device)
        basis[torch.arange(part.numel(), device=param.device), part] = 1
        rows.append(sae.decode(basis).flatten(1) - zero)
    return torch.cat(rows) if rows else zero[:0]
