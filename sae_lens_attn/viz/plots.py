"""Plots, as PNG (matplotlib, Agg) and as self-contained HTML (inline SVG, no scripts).

PNGs are drawn on figures with their own Agg canvas, never through pyplot, so making a plot
leaves the user's matplotlib backend and pyplot's open figures as they were.

Head attribution per feature (heatmap, bars, table) and per head (features each head dominates),
DFA over tokens (highlighted text, bars), loss recovered and L0 per layer, and feature density.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def head_attribution_heatmap(
    shares: Float[Tensor, " F n_heads"],
    features: Sequence[int],
    path: str | Path,
    *,
    title: str = "head attribution",
) -> Path:
    """Write a features × heads heatmap of head-attribution shares to ``path`` (PNG)."""
    n_features, n_heads = shares.shape
    fig = _figure(figsize=(max(4.5, 1.2 + 0.45 * n_heads), 1.2 + 0.22 * n_features))
    ax = fig.subplots()
    image = ax.imshow(shares.float().numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
    ax.set_yticks(range(n_features), [str(f) for f in features], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("feature")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of decoder norm")
    return _save(fig, path)


def dfa_tokens_html(
    tokens: Sequence[str],
    contributions: Float[Tensor, " s"],
    query_pos: int,
    *,
    title: str = "",
) -> str:
    """Tokens as HTML spans, source positions shaded by DFA contribution (blue +, red −),
    the query position boxed; hovering a token shows its contribution."""
    scale = float(contributions.abs().max()) or 1.0
    spans = []
    for pos, token in enumerate(tokens):
        value = float(contributions[pos]) if pos < contributions.numel() else 0.0
        alpha = min(abs(value) / scale, 1.0)
        color = f"rgba(37,99,235,{alpha:.2f})" if value >= 0 else f"rgba(220,38,38,{alpha:.2f})"
        border = "outline:2px solid #111;" if pos == query_pos else ""
        spans.append(
            f'<span title="pos {pos}: {value:+.4f}" style="background:{color};{border}'
            f'white-space:pre-wrap">{html.escape(token)}</span>'
        )
    header = f"<h3>{html.escape(title)}</h3>" if title else ""
    style = "font-family:monospace;line-height:1.8;overflow-wrap:anywhere"  # wraps to the window
    return f'{header}<div style="{style}">{"".join(spans)}</div>'


def html_page(title: str, sections: Sequence[str]) -> str:
    """A self-contained HTML page (no external resources)."""
    body = "\n".join(f"<section>{section}</section>" for section in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "section{margin-bottom:1.5em}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def top_contexts(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, largest first."""
    return torch.as_tensor(scores).topk(min(k, len(scores))).indices.tolist()


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure drawn by its own Agg canvas: pyplot, its figure manager and the user's backend
    are never touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def subplots(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any
) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a figure on its own Agg canvas and its axes (write it
    with ``_save``; nothing needs closing)."""
    fig = _figure(figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG; its text chunks name the figure (``Title``) and the titles of its
    panels (``Description``), for readers without the image and for tests."""
    path = Path(path)
    fig.tight_layout()
    panels = "; ".join(ax.get_title() for ax in fig.axes if ax.get_title())
    fig.savefig(path, dpi=120, metadata={"Title": fig.get_suptitle(), "Description": panels})
    return path


def png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (``Title``, ``Description``, ``Software``, ...)."""
    from PIL import Image

    with Image.open(path) as image:
        return dict(getattr(image, "text", {}))


def head_attribution_bars(
    shares: Float[Tensor, " n_heads"], path: str | Path, *, title: str = "head attribution"
) -> Path:
    """Write one feature's head-attribution shares as a bar per head to ``path`` (PNG)."""
    fig = _figure(figsize=(1.5 + 0.4 * shares.numel(), 2.6))
    ax = fig.subplots()
    ax.bar([f"H{h}" for h in range(shares.numel())], shares.float().tolist(), color="#2563eb")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of decoder norm")
    ax.set_title(title)
    return _save(fig, path)


def features_per_head(shares: Float[Tensor, " d_sae n_heads"]) -> Float[Tensor, " n_heads"]:
    """How many features attribute most of their decoder norm to each head (argmax counts)."""
    return torch.bincount(shares.argmax(-1), minlength=shares.shape[-1]).float()


def head_attribution_per_head(
    shares: Float[Tensor, " d_sae n_heads"], path: str | Path, *, title: str = "features per head"
) -> Path:
    """Write, per head, the number of features it dominates and their mean share (PNG)."""
    counts = features_per_head(shares)
    fig = _figure(figsize=(2 + 0.8 * shares.shape[1], 2.8))
    left, right = fig.subplots(1, 2)
    labels = [f"H{h}" for h in range(shares.shape[1])]
    left.bar(labels, counts.tolist(), color="#2563eb")
    left.set_ylabel("features (largest share)")
    right.bar(labels, shares.float().mean(0).tolist(), color="#16a34a")
    right.set_ylabel("mean share")
    fig.suptitle(title)
    return _save(fig, path)


def dfa_tokens_png(
    tokens: Sequence[str],
    contributions: Float[Tensor, " s"],
    query_pos: int,
    path: str | Path,
    *,
    title: str = "DFA by source position",
) -> Path:
    """Write DFA contributions per source token as bars (query position outlined) (PNG)."""
    values = contributions[: len(tokens)].float().tolist()
    fig = _figure(figsize=(1.5 + 0.35 * len(values), 3.0))
    ax = fig.subplots()
    bars = ax.bar(
        range(len(values)), values, color=["#2563eb" if v >= 0 else "#dc2626" for v in values]
    )
    if 0 <= query_pos < len(values):
        bars[query_pos].set_edgecolor("#111")
        bars[query_pos].set_linewidth(2)
    ax.set_xticks(range(len(values)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
    ax.axhline(0, color="#555", linewidth=0.5)
    ax.set_ylabel("contribution to pre-activation")
    ax.set_title(title)
    return _save(fig, path)


_RECOVERED = ("loss_recovered_zero", "loss_recovered_mean")
"""Metrics of ``layer_metrics_png``'s loss-recovered bars."""


def layer_metrics_png(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "per layer",
    show_l0: bool = True,
) -> Path:
    """Write loss recovered (zero and mean ablation) per layer as grouped bars, and L0 per layer
    unless ``show_l0`` is False (PNG).

    Args:
        rows: one mapping per SAE with ``layer``, ``loss_recovered_zero``,
            ``loss_recovered_mean`` and, with ``show_l0``, ``l0`` (an ``Evaluation`` plus its
            layer).
        path: where to write.
        title: the figure's title.
        show_l0: draw L0 too; pass False for TopK SAEs, whose L0 is k by construction.
    """
    labels = [f"layer {int(row['layer'])}" for row in rows]
    n_axes = 2 if show_l0 else 1
    fig = _figure(figsize=(1.8 + 3.2 * n_axes + 0.3 * len(rows), 3.0))
    axes = fig.subplots(1, n_axes, squeeze=False)[0]
    recovered = axes[-1]
    width = 0.38
    names = {"loss_recovered_zero": "zero ablation", "loss_recovered_mean": "mean ablation"}
    for offset, (key, color) in enumerate(zip(_RECOVERED, ("#2563eb", "#16a34a"), strict=True)):
        values = [float(row[key]) for row in rows]
        positions = [i + (offset - 0.5) * width for i in range(len(rows))]
        bars = recovered.bar(positions, values, width, label=names[key], color=color)
        recovered.bar_label(bars, fmt="%.3f", fontsize=7)
    recovered.set_xticks(range(len(rows)), labels)
    recovered.set_ylim(min(0.0, *(float(r[k]) for r in rows for k in _RECOVERED)), 1.3)
    recovered.axhline(1.0, color="#555", linewidth=0.5, linestyle=":")
    recovered.set_ylabel("loss recovered (1 = clean model)")
    recovered.set_title("loss recovered")
    recovered.legend(fontsize=7, loc="upper center", ncols=2)
    if show_l0:
        l0 = axes[0]
        l0.bar(labels, [float(row["l0"]) for row in rows], color="#9333ea")
        l0.set_ylabel("active features per token")
        l0.set_title("L0")
    fig.suptitle(title)
    return _save(fig, path)


def feature_density_png(
    densities: Mapping[str, Float[Tensor, " d_sae"]],
    path: str | Path,
    *,
    title: str = "feature density",
    bins: int = 30,
) -> Path:
    """Write, per SAE (one panel each, shared axes), a histogram of log10 feature density (the
    share of tokens a feature is active on); never-active (dead) features are counted in the
    panel's title, as log10 of 0 has no place on the axis (PNG)."""
    logs = {name: torch.as_tensor(d).float() for name, d in densities.items()}
    alive = [d[d > 0].log10() for d in logs.values()]
    values = torch.cat(alive) if alive else torch.zeros(0)
    low = float(values.min()) if values.numel() else -6.0
    high = float(values.max()) if values.numel() else 0.0
    edges = torch.linspace(low, max(high, low + 1e-3), bins + 1).tolist()
    fig = _figure(figsize=(1.2 + 3.2 * len(logs), 2.9))
    axes = fig.subplots(1, len(logs), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (name, density), log_density in zip(axes, logs.items(), alive, strict=True):
        ax.hist(log_density.numpy(), bins=edges, color="#2563eb")
        dead = int((density == 0).sum())
        ax.set_title(f"{name}: {dead} of {density.numel()} dead")
        ax.set_xlabel("log10 share of tokens active")
    axes[0].set_ylabel("features")
    fig.suptitle(title)
    return _save(fig, path)


def svg_bars(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    width: int = 360,
    bar_height: int = 16,
    color: str = "#2563eb",
    element_id: str = "",
) -> str:
    """A horizontal bar chart as inline SVG (no scripts, no external resources)."""
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    label_w, plot_w = 70, width - 140
    rows = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 2 + i * (bar_height + 4)
        w = plot_w * abs(value) / scale
        fill = color if value >= 0 else "#dc2626"
        rows.append(
            f'<text x="{label_w - 4}" y="{y + bar_height / 2 + 4:.0f}" text-anchor="end" '
            f'font-size="11">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_height}" fill="{fill}">'
            f"<title>{html.escape(label)}: {value:.4g}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + bar_height / 2 + 4:.0f}" font-size="11">'
            f"{value:.3g}</text>"
        )
    height = 4 + max(len(values), 1) * (bar_height + 4)
    ident = f' id="{html.escape(element_id)}"' if element_id else ""
    return (
        f'<svg{ident} xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img">{"".join(rows)}</svg>'
    )


def head_attribution_html(shares: Float[Tensor, " F n_heads"], features: Sequence[int]) -> str:
    """Head-attribution shares as an HTML table, cells shaded by share."""
    n_heads = shares.shape[1]
    head = "".join(f"<th>H{h}</th>" for h in range(n_heads))
    body = []
    for row, feature in zip(shares.float().tolist(), features, strict=True):
        cells = "".join(f'<td style="background:rgba(37,99,235,{v:.2f})">{v:.2f}</td>' for v in row)
        body.append(f"<tr><th>{feature}</th>{cells}</tr>")
    return f'<table class="heads"><tr><th>feature</th>{head}</tr>{"".join(body)}</table>'


def layer_metrics_html(rows: Sequence[Mapping[str, Any]], *, title: str = "per layer") -> str:
    """L0 and loss recovered per layer as inline SVG bar charts (HTML fragment)."""
    labels = [f"layer {row['layer']}" for row in rows]
    charts = [
        f"<h3>{html.escape(name)}</h3>"
        + svg_bars(labels, [float(row[key]) for row in rows], element_id=f"chart-{key}")
        for name, key in (
            ("L0", "l0"),
            ("loss recovered (zero ablation)", "loss_recovered_zero"),
            ("loss recovered (mean ablation)", "loss_recovered_mean"),
        )
    ]
    return f"<h2>{html.escape(title)}</h2>" + "".join(charts)
