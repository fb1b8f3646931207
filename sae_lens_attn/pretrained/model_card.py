"""The model card (``README.md``) of a published release of attention SAEs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from jaxtyping import Float
from torch import Tensor

from sae_lens_attn.analysis.heads import decoder_head_shares
from sae_lens_attn.pretrained.metrics import SAEMetrics
from sae_lens_attn.pretrained.releases import Release
from sae_lens_attn.site import AttnSite

NOT_MEASURED = "—"
"""What the metrics table shows for a number nobody measured."""

_CONVENTION_NOTES = {
    "folded": (
        "z without the value bias `b_V + β·W_V` (β the bias of the attention's LayerNorm): the "
        "hook_z of `HookedTransformer.from_pretrained` with its default processing (`fold_ln`, "
        "then `fold_value_biases`); the SAEs' `model_from_pretrained_kwargs` spell it out for "
        "SAELens's loaders."
    ),
    "included": (
        "z with the value bias `b_V + β·W_V`, as Hugging Face models compute it: load the "
        "TransformerLens model with `from_pretrained_no_processing`."
    ),
}


@dataclass(frozen=True)
class CardEntry:
    """What the model card says about one SAE."""

    sae_id: str
    """The SAE's id in the release (also its folder in the repository)."""
    site: AttnSite
    """The attention site the SAE reads."""
    architecture: str
    """SAELens inference architecture (``standard``, ``topk``, ``jumprelu``, ...)."""
    d_sae: int
    """Number of features."""
    convention: str | None
    """Value-bias convention of the z the SAE reads, if recorded."""
    metrics: SAEMetrics
    """Measured or given metrics (``None`` fields are shown as not measured)."""
    head_shares: tuple[float, ...]
    """Mean over features of each head's share of ‖W_dec[f]‖ (see ``head_shares``)."""


def with_training_metadata(metrics: SAEMetrics, metadata: Any, d_sae: int) -> SAEMetrics:
    """``metrics`` with the numbers SAELens records in ``cfg.json`` at the end of training (its
    ``l0`` and ``num_dead_features``) filling the ones nobody gave, so the card shows a metric
    as not measured only when the SAE's config lacks it too."""
    l0 = _finite(getattr(metadata, "l0", None))
    dead = _finite(getattr(metadata, "num_dead_features", None))
    filled = {
        "l0": metrics.l0 if metrics.l0 is not None else l0,
        "dead_pct": metrics.dead_pct
        if metrics.dead_pct is not None
        else (None if dead is None else 100.0 * dead / d_sae),
    }
    taken = [name for name, value in filled.items() if getattr(metrics, name) != value]
    if not taken:
        return metrics
    recorded = f"{', '.join(taken)} from the SAE's training metadata (cfg.json)"
    given = any(value is not None for value in metrics.as_dict().values())
    source = f"{metrics.source}; {recorded}" if given else recorded
    return replace(metrics, **filled, source=source)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def head_shares(W_dec: Float[Tensor, " d_sae d_in"], site: AttnSite) -> Float[Tensor, " n_heads"]:
    """Per-head share of the decoder norm, averaged over features.

    ``share[f, h] = ‖W_dec[f, h-block]‖ / Σ_j ‖W_dec[f, j-block]‖``, the rows of
    ``sae_lens_attn.analysis.head_attribution``; features whose decoder row is zero have no share
    and are left out of the mean.

    Raises:
        ValueError: every decoder row is zero, or a row holds NaN or infinity (named).
    """
    site.check_sae_width(W_dec.shape[-1])
    shares = decoder_head_shares(W_dec, site)  # (F, H), zero rows spread evenly
    alive = W_dec.detach().ne(0).any(-1)
    if not alive.any():
        raise ValueError("every decoder row is zero: the SAE has no head attribution")
    return shares[alive].mean(0)


def render_model_card(release: Release, entries: Sequence[CardEntry], *, tool: str) -> str:
    """``README.md`` of a release: metrics, head attribution, and how to load the SAEs.

    Args:
        release: the release being published.
        entries: one entry per SAE, in the release's order.
        tool: name and version of the software that wrote the card.
    """
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sae_lens",
        "- sae-lens-attn",
        "- sparse-autoencoder",
        "- attention",
        "- hook_z",
        "---",
        "",
        f"# {release.name}: attention SAEs for {release.model}",
        "",
        f"Sparse autoencoders on the attention outputs (`hook_z`, the per-head outputs "
        f"concatenated head-major, the input of W_O) of `{release.model}`, in SAELens's native "
        f"format (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors` per SAE). "
        f"Written by {tool}.",
        "",
        "## SAEs and metrics",
        "",
        "| SAE id | hook | heads × d_head | architecture | d_sae | L0 | CE loss recovered "
        "| dead % | explained variance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        m = e.metrics
        lines.append(
            f"| `{e.sae_id}` | `{e.site.hook_name}` | {e.site.n_heads} × {e.site.d_head} | "
            f"{e.architecture} | {e.d_sae} | {_fmt(m.l0, '.2f')} | "
            f"{_fmt(m.ce_loss_recovered, '.3f')} | {_fmt(m.dead_pct, '.1f')} | "
            f"{_fmt(m.explained_variance, '.3f')} |"
        )
    lines += [
        "",
        f"{NOT_MEASURED}: neither measured, given, nor recorded in the SAE's cfg.json. "
        "Where the numbers come from:",
        "",
    ]
    lines += [f"- `{e.sae_id}`: {e.metrics.source}" for e in entries]
    lines += [
        "",
        "L0 is the mean number of active features per token; explained variance is "
        "1 − E‖z − ẑ‖² / Var(z) (SAELens's definition); CE loss recovered is "
        "(CE_zero-ablation − CE_SAE) / (CE_zero-ablation − CE_clean) with the reconstruction "
        "spliced at every position; dead % is the share of features never active on the "
        "evaluation tokens.",
        "",
        "## Head attribution",
        "",
        "Each head's share of the decoder norm, ‖W_dec[f, head block]‖ / Σ_heads ‖W_dec[f, ·]‖, "
        "averaged over features (uniform would be 1 / n_heads).",
        "",
        "| SAE id | top heads (mean share) | all heads, in head order |",
        "|---|---|---|",
    ]
    for e in entries:
        order = sorted(range(len(e.head_shares)), key=lambda h: -e.head_shares[h])[:3]
        top = ", ".join(f"h{h} ({e.head_shares[h]:.1%})" for h in order)
        every = " ".join(f"{share:.3f}" for share in e.head_shares)
        lines.append(f"| `{e.sae_id}` | {top} | {every} |")
    first = entries[0].sae_id
    lines += [
        "",
        "## How to load",
        "",
        "With SAELens alone (no plugin needed), by repository id and folder:",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{release.repo_id}", "{first}")',
        "```",
        "",
        f"By release name, with `sae-lens-attn` (once `{release.name}` is in SAELens's "
        "`pretrained_saes.yaml`, or with this release's YAML entry in a file named by the "
        "environment variable `SAE_LENS_ATTN_RELEASES`):",
        "",
        "```python",
        "import sae_lens_attn as sla",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{release.name}", "{first}")',
        "site = sla.AttnSite.from_sae(sae)  # layer, heads, d_head, hook name",
        "```",
        "",
        'The SAEs take z shaped `[..., n_heads, d_head]` (`reshape_activations="hook_z"`), so '
        "`HookedSAETransformer.run_with_saes(tokens, saes=[sae])` splices them at `hook_z`.",
        "",
    ]
    conventions = sorted({e.convention for e in entries if e.convention})
    for convention in conventions:
        lines += [f"Value-bias convention `{convention}`: {_CONVENTION_NOTES[convention]}", ""]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return NOT_MEASURED if value is None else format(value, spec)
