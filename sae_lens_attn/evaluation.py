"""``evaluate``: how well an attention SAE reconstructs z, and what splicing it costs the model.

Definitions (DESIGN.md; SAELens's ``run_evals`` where it measures the same thing):

- Counted positions: real tokens (attention mask 1) that are not in ``exclude_tokens``.
- ``l0``: mean number of non-zero features per counted position; ``dead_fraction``: share of
  features never non-zero at any counted position.
- ``mse``: mean over counted positions of ``‖z − ẑ‖²`` (summed over the ``n_heads*d_head``
  dimensions); ``explained_variance``: ``1 − mse / (E‖z‖² − ‖E z‖²)``, z in the SAE's convention.
- Loss recovered, ``(CE_abl − CE_sae) / (CE_abl − CE_clean)`` (NaN when the ablation does not
  change the loss), in two variants that count different positions:

  - ``loss_recovered_paper``, as Kissane et al. compute it (``get_recons_loss`` in
    ``ckkissane/attention-output-saes``, ``common/utils.py``): the reconstruction spliced at
    *every* position, BOS included; CE the mean next-token loss over every prediction
    (TransformerLens's ``return_type="loss"``), here every one whose target is a real token.
  - ``loss_recovered_saelens``, as SAELens's ``run_evals`` computes its ``ce_loss_score``
    (``get_recons_loss`` in ``sae_lens/evals.py``): the reconstruction spliced only at counted
    positions (other positions keep their z); CE over the predictions *made at* counted
    positions (special tokens excluded: BOS, EOS, padding, separator ids by default).

  In both, ``CE_abl`` zero-ablates z at every position *in the SAE's value-bias convention*:
  for a ``"folded"`` SAE the layer then writes ``b_O + Σ_h b_V,h W_O,h`` (what zero-ablating
  hook_z does on a TransformerLens ``from_pretrained`` model, as in Kissane et al.), for an
  ``"included"`` SAE just ``b_O``. The two variants coincide when no position is excluded.
  ``ce_clean_paper``, ``ce_sae_paper``, ``ce_zero_ablation_paper`` are the paper variant's CEs.
- ``ce_clean``, ``ce_sae``, ``ce_zero_ablation``, ``ce_mean_ablation``,
  ``loss_recovered_{zero,mean}``, ``delta_ce`` (``CE_sae − CE_clean``) and ``kl`` count the
  SAELens positions by default, the paper's with ``exclude_from_loss=False``;
  ``ce_mean_ablation`` sets z at every position to the mean z over the counted positions.
- ``kl``: mean over those positions of KL(clean ‖ with SAE) of the next-token distributions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.backends.base import check_convention
from sae_lens_attn.corpus import Corpus
from sae_lens_attn.sae_adapter import encode_z, sae_convention
from sae_lens_attn.site import AttnSite, ValueBiasConvention
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.validation import check_count, check_tokens, special_token_ids, tokenizer_of

METRIC_NAMES = (
    "l0",
    "dead_fraction",
    "explained_variance",
    "mse",
    "loss_recovered_paper",
    "loss_recovered_saelens",
    "ce_clean",
    "ce_sae",
    "ce_zero_ablation",
    "ce_mean_ablation",
    "loss_recovered_zero",
    "loss_recovered_mean",
    "delta_ce",
    "kl",
    "ce_clean_paper",
    "ce_sae_paper",
    "ce_zero_ablation_paper",
    "n_tokens",
    "n_predictions",
    "n_predictions_paper",
)
"""The keys of an ``Evaluation`` seen as a mapping, in table order."""

Batch = Int[Tensor, " batch ctx"] | tuple[Int[Tensor, " batch ctx"], Int[Tensor, " batch ctx"]]

_PAPER, _SAELENS = "paper", "saelens"
"""The two ways of counting positions in the losses (see the module docstring)."""


@dataclass(frozen=True)
class Evaluation(Mapping[str, float]):
    """Metrics of one SAE on one token set; a mapping from ``METRIC_NAMES`` to numbers."""

    l0: float
    """Mean number of active features per counted position."""
    dead_fraction: float
    """Share of features never active on the counted positions."""
    explained_variance: float
    """``1 − mse / Var(z)`` (SAELens's definition)."""
    mse: float
    """Mean squared reconstruction error per position, summed over dimensions."""
    loss_recovered_paper: float
    """Kissane et al.'s loss recovered: zero ablation, the reconstruction spliced at every
    position and every prediction counted (BOS included); NaN when ablation changes nothing."""
    loss_recovered_saelens: float
    """SAELens's ``run_evals`` ``ce_loss_score``: zero ablation, the reconstruction spliced and
    predictions counted at non-excluded positions only (special tokens excluded)."""
    ce_clean: float
    """Cross-entropy of the unmodified model (SAELens positions unless
    ``exclude_from_loss=False``)."""
    ce_sae: float
    """Cross-entropy with the SAE reconstruction spliced in (same positions as ``ce_clean``)."""
    ce_zero_ablation: float
    """Cross-entropy with z zeroed (in the SAE's value-bias convention)."""
    ce_mean_ablation: float
    """Cross-entropy with z replaced by its mean over the counted positions."""
    loss_recovered_zero: float
    """``(CE_zero − CE_sae) / (CE_zero − CE_clean)`` of the CEs above (by default equal to
    ``loss_recovered_saelens``, with ``exclude_from_loss=False`` to ``loss_recovered_paper``)."""
    loss_recovered_mean: float
    """``(CE_mean − CE_sae) / (CE_mean − CE_clean)``; NaN when mean ablation changes nothing."""
    delta_ce: float
    """``CE_sae − CE_clean``."""
    kl: float
    """Mean KL(clean ‖ with SAE) of the next-token distributions, at the positions of
    ``ce_clean``."""
    ce_clean_paper: float
    """Cross-entropy of the unmodified model over every prediction (the paper's positions)."""
    ce_sae_paper: float
    """Cross-entropy with the reconstruction spliced at every position, every prediction."""
    ce_zero_ablation_paper: float
    """Cross-entropy with z zeroed at every position, every prediction."""
    n_tokens: int
    """Counted positions."""
    n_predictions: int
    """Predictions ``ce_clean``, ``ce_sae``, ``ce_zero_ablation`` and ``ce_mean_ablation``
    average over."""
    n_predictions_paper: int
    """Predictions the paper variant averages over: every one whose target is a real token."""
    feature_density: Float[Tensor, " d_sae"]
    """Share of counted positions at which each feature is active."""
    hook_name: str
    """The site evaluated, ``blocks.L.attn.hook_z``."""
    convention: ValueBiasConvention
    """Value-bias convention of the z the SAE read and the ablations used."""

    def __getitem__(self, key: str) -> float:
        if key not in METRIC_NAMES:
            raise KeyError(f"{key!r} is not a metric; valid: {list(METRIC_NAMES)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(METRIC_NAMES)

    def __len__(self) -> int:
        return len(METRIC_NAMES)

    def as_dict(self) -> dict[str, Any]:
        """Every field but the densities, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "feature_density"}


@dataclass
class _Sums:
    """Running sums over batches (float64 on the CPU)."""

    d_in: int
    d_sae: int
    n_tokens: int = 0
    active: float = 0.0
    sq: float = 0.0
    residual: float = 0.0
    kl: float = 0.0
    n_kl: int = 0

    def __post_init__(self) -> None:
        self.sum_z = torch.zeros(self.d_in, dtype=torch.float64)
        self.fired = torch.zeros(self.d_sae, dtype=torch.float64)
        self.ce: dict[str, dict[str, float]] = {
            positions: dict.fromkeys(("clean", "sae", "zero", "mean"), 0.0)
            for positions in (_PAPER, _SAELENS)
        }
        self.n_predictions: dict[str, int] = dict.fromkeys((_PAPER, _SAELENS), 0)


@torch.no_grad()
def evaluate(
    model: Any,
    sae: Any,
    tokens_or_dataset: Any,
    *,
    tokenizer: Any = None,
    context_size: int | None = None,
    batch_size: int = 8,
    exclude_tokens: Sequence[int] | None = None,
    exclude_from_loss: bool = True,
    convention: ValueBiasConvention | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a hook_z SAE on ``model``: sparsity, reconstruction, and spliced-in losses.

    Args:
        model: any model a backend supports (HookedTransformer, Hugging Face causal LM, plain or
            nnsight-wrapped, ``sla.hooked`` facade) or a backend.
        sae: a SAELens SAE on a hook_z site of ``model``.
        tokens_or_dataset: ``[rows, ctx]`` token ids; a ``(tokens, attention_mask)`` pair
            (0 marks padding); ``TokenBatches``; a Hugging Face ``datasets.Dataset`` with a
            ``tokens`` or ``input_ids`` column (and optionally ``attention_mask``) or a ``text``
            column; or a list of strings. Text is cut into BOS-led contexts of ``context_size``.
        tokenizer: for text (default: the model's).
        context_size: tokens per context. Token rows longer than this are cut to their first
            ``context_size`` tokens (as SAELens's store reads them); shorter rows are an error.
            Required for text; default for tokens: their width.
        batch_size: contexts per forward pass.
        exclude_tokens: token ids not counted (default: the tokenizer's BOS, EOS, padding and
            separator ids, as ``run_evals`` excludes them; none without a tokenizer).
        exclude_from_loss: leave excluded positions out of ``ce_*``, ``loss_recovered_zero``,
            ``loss_recovered_mean``, ``delta_ce`` and ``kl`` too (the SAE is not spliced there
            and their predictions do not count, as in ``run_evals``); with False those count
            every position, as the paper does. ``loss_recovered_paper`` and
            ``loss_recovered_saelens`` (and ``*_paper``) do not depend on it.
        convention: value-bias convention of z (default: the SAE's metadata, else the
            backend's ``native_convention``).
        progress: show a progress bar.

    Returns:
        An ``Evaluation``: a mapping with the keys ``METRIC_NAMES``.

    Raises:
        ValueError: the SAE does not fit the model, the data is too short for the context size
            or holds no countable token, or an argument is out of range.

    Examples:
        >>> metrics = sla.evaluate(model, sae, tokens)
        >>> metrics["l0"], metrics["loss_recovered_paper"], metrics["loss_recovered_saelens"]
    """
    backend = backend_for(model)
    site = AttnSite.from_sae(sae, backend)
    convention = check_convention(convention or sae_convention(sae, backend.native_convention))
    batch_size = check_count("batch_size", batch_size)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(backend)
    batches = token_batches(
        tokens_or_dataset, tokenizer=tokenizer, context_size=context_size, batch_size=batch_size
    )
    for tokens, _ in batches:
        check_tokens(tokens, backend)
    excluded = torch.tensor(
        list(exclude_tokens) if exclude_tokens is not None else special_token_ids(tokenizer),
        dtype=torch.long,
    )
    device = next(backend.model.parameters()).device
    sums = _Sums(site.d_in, sae.cfg.d_sae)
    spliced = _Spliced(backend, sae, site, convention)
    total = 2 * len(batches)
    bar = tqdm(total=total, desc=f"evaluate {site.hook_name}", unit="batch", disable=not progress)
    with bar:
        for batch in _on_device(batches, device, excluded):
            _sae_statistics(spliced, batch, sums)
            bar.update()
        if sums.n_tokens == 0:
            raise ValueError(
                f"no position can be counted: every token is padding or in exclude_tokens="
                f"{excluded.tolist()}"
            )
        mean_z = (sums.sum_z / sums.n_tokens).to(device)
        kl_at = _SAELENS if exclude_from_loss else _PAPER
        for batch in _on_device(batches, device, excluded):
            _losses(spliced, batch, mean_z, kl_at, sums)
            bar.update()
    return _result(sums, site, convention, kl_at)


def token_batches(
    data: Any, *, tokenizer: Any, context_size: int | None, batch_size: int
) -> list[tuple[Int[Tensor, " batch ctx"], Int[Tensor, " batch ctx"]]]:
    """``(tokens, attention_mask)`` batches of ``context_size`` columns from any accepted input
    (see ``evaluate``).

    Raises:
        ValueError: the input is empty, of an unknown kind, or shorter than ``context_size``.
        TypeError: the token ids are not integers.
    """
    if context_size is not None:
        context_size = check_count("context_size", context_size, minimum=2)
    batch_size = check_count("batch_size", batch_size)
    if isinstance(data, TokenBatches):
        data = data.tokens
    if _is_texts(data):
        texts = list(data["text"]) if not isinstance(data, list | tuple) else list(data)
        if context_size is None or tokenizer is None:
            raise ValueError(
                "text needs context_size= and a tokenizer (the model has none: pass tokenizer=)"
            )
        try:
            data = TokenBatches.from_texts(
                tokenizer, texts, context_size=context_size, batch_size=batch_size
            ).tokens
        except ValueError as err:
            raise ValueError(
                f"the dataset is too short for context_size={context_size}: {err}"
            ) from None
    tokens, mask = _tokens_and_mask(data)
    check_tokens(tokens)
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens.shape)}"
        )
    width = context_size or tokens.shape[1]
    if tokens.shape[1] < width:
        raise ValueError(
            f"the dataset is too short for context_size={width}: its rows hold "
            f"{tokens.shape[1]} tokens; give a smaller context_size or longer rows"
        )
    tokens, mask = tokens[:, :width].long(), mask[:, :width].long()
    return list(zip(tokens.split(batch_size), mask.split(batch_size), strict=True))


def _is_texts(data: Any) -> bool:
    if isinstance(data, list | tuple):
        return bool(data) and all(isinstance(item, str) for item in data)
    columns = getattr(data, "column_names", None)
    return columns is not None and "text" in columns and not {"tokens", "input_ids"} & set(columns)


def _tokens_and_mask(data: Any) -> tuple[Tensor, Tensor]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Tensor):
        return data, torch.ones_like(data)
    columns = getattr(data, "column_names", None)
    if columns is not None:
        column = next((c for c in ("tokens", "input_ids") if c in columns), None)
        if column is None:
            raise ValueError(
                f"the dataset has columns {list(columns)}; expected one of "
                "'tokens', 'input_ids' or 'text'"
            )
        dataset: Any = data
        tokens = torch.as_tensor(list(dataset[column]))
        mask = dataset["attention_mask"] if "attention_mask" in columns else None
        return tokens, torch.ones_like(tokens) if mask is None else torch.as_tensor(list(mask))
    if isinstance(data, Iterable):
        rows = list(data)
        if rows and all(isinstance(r, Tensor) and r.ndim == 2 for r in rows):
            tokens = torch.cat(rows)
            return tokens, torch.ones_like(tokens)
    raise ValueError(
        f"cannot evaluate on a {type(data).__name__}; expected token ids [rows, ctx], a "
        "(tokens, attention_mask) pair, TokenBatches, a datasets.Dataset or a list of strings"
    )


class _Spliced(NamedTuple):
    """The SAE, the model it is spliced into, where, and in which value-bias convention."""

    backend: AttnBackend
    sae: Any
    site: AttnSite
    convention: ValueBiasConvention


class _Batch(NamedTuple):
    tokens: Int[Tensor, " batch pos"]
    mask: Int[Tensor, " batch pos"]
    counted: Bool[Tensor, " batch pos"]
    """Real positions whose token is not excluded."""


def _on_device(
    batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, excluded: Tensor
) -> Iterator[_Batch]:
    """Each ``(tokens, mask)`` on ``device``, with the positions whose tokens are counted."""
    for tokens, mask in batches:
        tokens, mask = tokens.to(device), mask.to(device)
        yield _Batch(tokens, mask, mask.bool() & ~torch.isin(tokens, excluded.to(device)))


def _sae_statistics(spliced: _Spliced, batch: _Batch, sums: _Sums) -> None:
    backend, sae, site, convention = spliced
    tokens, mask, counted = batch
    corpus = Corpus(backend, tokens, _or_none(mask), batch_size=tokens.shape[0])
    z = corpus.capture(site, convention).z  # (B, T, H, D)
    acts = encode_z(sae, z)  # (B, T, F), in the convention asked for (maybe not the SAE's own)
    z_hat = sae.decode(acts).reshape(z.shape)
    acts, x = acts[counted], z.flatten(-2)[counted].double()
    x_hat = z_hat.flatten(-2)[counted].double()
    active = acts != 0
    sums.n_tokens += x.shape[0]
    sums.active += active.sum().item()
    sums.fired += active.sum(0).double().cpu()
    sums.sum_z += x.sum(0).cpu()
    sums.sq += x.pow(2).sum().item()
    sums.residual += (x - x_hat).pow(2).sum().item()


def _losses(spliced: _Spliced, batch: _Batch, mean_z: Tensor, kl_at: str, sums: _Sums) -> None:
    """Clean, spliced and ablated losses on one batch, counted both ways: at every real position
    (the paper's) and at ``counted`` positions (SAELens's); KL at the ``kl_at`` ones."""
    backend, sae, site, convention = spliced
    tokens, mask, counted = batch
    real = mask.bool()
    where = {_SAELENS: counted, _PAPER: real}

    def reconstruct_at(at: Tensor) -> Any:
        def replace(z: Tensor) -> Tensor:
            z_hat = sae.decode(encode_z(sae, z)).reshape(z.shape).to(z.dtype)
            return torch.where(at[..., None, None], z_hat, z)

        return replace

    def mean(z: Tensor) -> Tensor:
        return mean_z.to(z.dtype).reshape(z.shape[-2:]).expand_as(z)

    runs: dict[str, Any] = {
        "clean": None,
        f"sae_{_SAELENS}": reconstruct_at(counted),
        "zero": torch.zeros_like,
        "mean": mean,
    }
    if not torch.equal(counted, real):  # else the SAE splices the same positions both ways
        runs[f"sae_{_PAPER}"] = reconstruct_at(real)
    logits: dict[str, Tensor] = {}
    for name, replace in runs.items():
        if replace is None:
            out = backend.forward(tokens, attention_mask=_or_none(mask))
        else:
            with backend.splicing({site: replace}, convention=convention):
                out = backend.forward(tokens, attention_mask=_or_none(mask))
        assert out is not None
        logits[name] = out.float()
    logits.setdefault(f"sae_{_PAPER}", logits[f"sae_{_SAELENS}"])

    for positions, at in where.items():
        predicts = at[:, :-1] & real[:, 1:]  # made at a counted position, of a real token
        targets = tokens[:, 1:][predicts]
        for name in ("clean", "sae", "zero", "mean"):
            out = logits[f"sae_{positions}" if name == "sae" else name]
            ce = F.cross_entropy(out[:, :-1][predicts], targets, reduction="sum")
            sums.ce[positions][name] += ce.item()
        sums.n_predictions[positions] += int(predicts.sum())
    at = where[kl_at]
    log_clean = logits["clean"][at].log_softmax(-1)
    log_sae = logits[f"sae_{kl_at}"][at].log_softmax(-1)
    sums.kl += (log_clean.exp() * (log_clean - log_sae)).sum().item()
    sums.n_kl += int(at.sum())


def _result(sums: _Sums, site: AttnSite, convention: ValueBiasConvention, main: str) -> Evaluation:
    """The metrics; ``main`` names the positions of ``ce_*``, ``loss_recovered_{zero,mean}``."""
    n = sums.n_tokens
    mse = sums.residual / n
    variance = sums.sq / n - (sums.sum_z / n).pow(2).sum().item()
    explained = (1.0 if mse < 1e-10 else 0.0) if variance < 1e-10 else 1.0 - mse / variance
    if sums.n_predictions[main] == 0:
        raise ValueError(
            "no prediction can be counted: every context has fewer than two countable tokens"
        )
    ce = {
        positions: {
            name: total / sums.n_predictions[positions]
            if sums.n_predictions[positions]
            else math.nan
            for name, total in totals.items()
        }
        for positions, totals in sums.ce.items()
    }
    paper, saelens, chosen = ce[_PAPER], ce[_SAELENS], ce[main]
    return Evaluation(
        l0=sums.active / n,
        dead_fraction=(sums.fired == 0).double().mean().item(),
        explained_variance=explained,
        mse=mse,
        loss_recovered_paper=_recovered(paper["zero"], paper["sae"], paper["clean"]),
        loss_recovered_saelens=_recovered(saelens["zero"], saelens["sae"], saelens["clean"]),
        ce_clean=chosen["clean"],
        ce_sae=chosen["sae"],
        ce_zero_ablation=chosen["zero"],
        ce_mean_ablation=chosen["mean"],
        loss_recovered_zero=_recovered(chosen["zero"], chosen["sae"], chosen["clean"]),
        loss_recovered_mean=_recovered(chosen["mean"], chosen["sae"], chosen["clean"]),
        delta_ce=chosen["sae"] - chosen["clean"],
        kl=sums.kl / sums.n_kl,
        ce_clean_paper=paper["clean"],
        ce_sae_paper=paper["sae"],
        ce_zero_ablation_paper=paper["zero"],
        n_tokens=n,
        n_predictions=sums.n_predictions[main],
        n_predictions_paper=sums.n_predictions[_PAPER],
        feature_density=(sums.fired / n).float(),
        hook_name=site.hook_name,
        convention=convention,
    )


def _recovered(ablated: float, with_sae: float, clean: float) -> float:
    return math.nan if ablated == clean else (ablated - with_sae) / (ablated - clean)


def _or_none(mask: Tensor) -> Tensor | None:
    """No mask when nothing is padded: the models' unmasked path, as ``run_evals`` runs it."""
    return None if bool(mask.all()) else mask
