"""The metrics a published attention SAE reports, measured on tokens or given by the publisher.

Definitions (as SAELens's ``run_evals`` computes the first two, so the numbers written to a
release's ``l0`` and ``variance_explained`` are the ones SAELens's benchmark checks):

- ``l0``: mean over tokens of the number of non-zero features.
- ``explained_variance``: ``1 − E‖z − ẑ‖² / (E‖z‖² − ‖E z‖²)`` over all tokens, z flattened.
- ``ce_loss_recovered``: ``(CE_abl − CE_sae) / (CE_abl − CE_clean)``, the reconstruction spliced
  at every position and, for CE_abl, z set to zero (in the SAE's value-bias convention), as in
  Kissane et al.; CE is the mean next-token loss over all positions.
- ``dead_pct``: percentage of features never active on the tokens.

``measure`` is ``sae_lens_attn.evaluation.evaluate`` with the excluded tokens left out of l0,
explained variance and densities only (``exclude_from_loss=False``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae_lens_attn.config.metadata import read_attention_metadata
from sae_lens_attn.evaluation import evaluate
from sae_lens_attn.validation import check_tokens

REPORTED_METRICS = ("l0", "ce_loss_recovered", "dead_pct", "explained_variance")
"""Metric names of the model card's table, and the keys a caller's metrics mapping may use."""

LOG_SPARSITY_EPS = 1e-10
"""SAELens's ``sparsity.safetensors`` holds ``log10(feature density + 1e-10)``."""


@dataclass(frozen=True)
class SAEMetrics:
    """Quality numbers of one SAE; ``None`` where nothing was measured or given."""

    l0: float | None = None
    """Mean number of active features per token."""
    ce_loss_recovered: float | None = None
    """Fraction of the zero-ablation CE increase the reconstruction recovers."""
    dead_pct: float | None = None
    """Percentage of features never active on the evaluation tokens."""
    explained_variance: float | None = None
    """Explained variance of the reconstruction of z (SAELens's definition)."""
    n_tokens: int | None = None
    """Number of tokens measured on; ``None`` for numbers given by the publisher."""
    source: str = "given by the publisher"
    """Where the numbers come from, as shown on the model card."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, sae_id: str = "") -> SAEMetrics:
        """Numbers given by the publisher, keyed by names in ``REPORTED_METRICS``.

        Raises:
            ValueError: an unknown name (the message lists the valid ones) or a non-finite value.
        """
        unknown = sorted(set(values) - set(REPORTED_METRICS))
        if unknown:
            raise ValueError(
                f"unknown metrics {unknown} for SAE {sae_id!r}; valid: {list(REPORTED_METRICS)}"
            )
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"metric {name!r} of SAE {sae_id!r} must be a finite number, got {value!r}"
                )
            checked[name] = float(value)
        return cls(**checked)

    def as_dict(self) -> dict[str, float | None]:
        """The reported metrics by name (``None`` where unknown)."""
        return {name: getattr(self, name) for name in REPORTED_METRICS}


def read_metrics_file(path: str | Path) -> dict[str, dict[str, float]]:
    """Publisher-given metrics from a JSON file ``{sae_id: {name: number}}`` (``publish --metrics``),
    names in ``REPORTED_METRICS``, or the ``evaluation.json`` that ``evaluate --out`` writes.

    Raises:
        FileNotFoundError: the file does not exist (named).
        ValueError: the file is not valid JSON, not of that shape, or holds an unknown name or a
            non-finite value; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist")
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"metrics file {str(path)!r} is not valid JSON: {err}") from None
    shape = f"{{sae_id: {{{', '.join(REPORTED_METRICS)}}}}}"
    if isinstance(given, list):  # evaluation.json of ``sae-lens-attn evaluate --out``
        given = _from_evaluation_rows(given, path)
    if not isinstance(given, dict):
        raise ValueError(
            f"metrics file {str(path)!r} must hold a JSON object {shape}, got "
            f"{type(given).__name__}"
        )
    for sae_id, values in given.items():
        if not isinstance(values, dict):
            raise ValueError(
                f"metrics file {str(path)!r}: the entry of SAE {sae_id!r} must be an object "
                f"{{name: number}} ({shape}), got {values!r}"
            )
        try:
            SAEMetrics.from_mapping(values, sae_id=sae_id)
        except ValueError as err:
            raise ValueError(f"metrics file {str(path)!r}: {err}") from None
    return given


EVALUATION_KEYS = {
    "l0": "l0",
    "ce_loss_recovered": "loss_recovered_paper",
    "dead_pct": "dead_pct",
    "explained_variance": "explained_variance",
}
"""Reported metric → its key in a row of ``evaluate --out``'s ``evaluation.json`` (loss recovered
as the paper and ``measure`` compute it: the SAE spliced and CE counted at every position)."""


def _from_evaluation_rows(rows: list[Any], path: Path) -> dict[str, dict[str, float]]:
    """``{sae_id: metrics}`` from ``evaluation.json`` rows; the id is the SAE folder's name (the
    publish default) or the ID of ``RELEASE:ID``; non-finite numbers count as not measured."""
    given: dict[str, dict[str, float]] = {}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("sae"), str):
            raise ValueError(
                f"metrics file {str(path)!r}: a list must hold the rows of evaluate --out's "
                f"evaluation.json (objects with 'sae' and {sorted(set(EVALUATION_KEYS.values()))}), "
                f"got {row!r}"
            )
        spec = row["sae"]
        sae_id = (
            Path(spec).name if Path(spec).is_dir() or ":" not in spec else spec.rpartition(":")[2]
        )
        given[sae_id] = {
            name: float(row[key])
            for name, key in EVALUATION_KEYS.items()
            if isinstance(row.get(key), int | float)
            and not isinstance(row.get(key), bool)
            and math.isfinite(row[key])
        }
    return given


class Measurement(NamedTuple):
    """Metrics and feature densities of one SAE measured on tokens."""

    metrics: SAEMetrics
    """The measured metrics."""
    log_sparsity: Float[Tensor, " d_sae"]
    """``log10(feature density + 1e-10)``, SAELens's ``sparsity.safetensors`` content."""


@torch.no_grad()
def measure(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " batch pos"],
    *,
    exclude_tokens: Sequence[int] = (),
    batch_size: int = 8,
) -> Measurement:
    """Measure an attention SAE on ``tokens`` run through ``model``.

    Args:
        model: any model a backend supports (HookedTransformer, ...).
        sae: a SAELens SAE on a hook_z site of ``model``.
        tokens: token ids, one row per context.
        exclude_tokens: token ids (BOS, EOS, padding) left out of l0, explained variance and
            densities, as SAELens's evals leave out special tokens.
        batch_size: contexts per forward pass.

    Returns:
        The metrics and the log10 feature densities.
    """
    check_tokens(tokens, model)
    convention = read_attention_metadata(sae.cfg.metadata).value_bias_convention or "included"
    result = evaluate(
        model,
        sae,
        tokens,
        batch_size=batch_size,
        exclude_tokens=exclude_tokens,
        exclude_from_loss=False,
        convention=convention,
        progress=False,
    )
    recovered = result.loss_recovered_zero
    metrics = SAEMetrics(
        l0=result.l0,
        ce_loss_recovered=None if math.isnan(recovered) else recovered,
        dead_pct=100.0 * result.dead_fraction,
        explained_variance=result.explained_variance,
        n_tokens=result.n_tokens,
        source=f"measured on {result.n_tokens} tokens ({convention} z)",
    )
    density = result.feature_density.double()
    return Measurement(metrics, torch.log10(density + LOG_SPARSITY_EPS).float())
