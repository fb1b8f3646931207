"""Plots of feature logits, feature families, head polysemanticity and features against a proxy
(PNG, matplotlib Agg).

Each plot is drawn from a typed result (``FeatureLogits``, ``FeatureFamilies``,
``Polysemanticity``, ``ProxyHistogram``) or, for ``sae-lens-attn analyze``, from the tables its analyzers write
(``table_plots``); both go through the same drawing code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from sae_lens_attn.analysis.families import FAMILIES, LABELS, FeatureFamilies
from sae_lens_attn.analysis.logits import FeatureLogits
from sae_lens_attn.analysis.polysemantic_heads import Polysemanticity
from sae_lens_attn.analysis.proxies import ProxyHistogram
from sae_lens_attn.viz.plots import _save, subplots

LogitPanel = tuple[str, Sequence[str], Sequence[float], Sequence[str], Sequence[float]]
"""One feature's bars: title, top tokens and values, bottom tokens and values."""
HeadLabels = tuple[str, Sequence[str], Sequence[float]]
"""One head's row: its name (``L1H0``), its top features' labels and their confidences."""
ProxyRow = tuple[str, str, Sequence[float], Sequence[int], Sequence[int]]
"""One feature's histograms: title, proxy name, bin edges, counts where the proxy holds and not."""


def feature_logits_png(
    logits: FeatureLogits,
    path: str | Path,
    *,
    features: Sequence[int] | None = None,
    k: int | None = None,
) -> Path:
    """Bars of the tokens each feature raises (blue) and lowers (red) most (PNG).

    Args:
        logits: from ``sla.analysis.feature_logits``.
        path: where to write.
        features: which of its features to draw (default: the first 8).
        k: tokens per direction (default: all it holds, at most 10).
    """
    chosen = list(features) if features is not None else logits.features[:8].tolist()
    n = min(k or 10, logits.top_ids.shape[1])
    panels: list[LogitPanel] = []
    for feature in chosen:
        row = logits.row(feature)
        panels.append(
            (
                f"feature {feature} (layer {logits.layer})",
                logits.top_tokens[row][:n],
                logits.top_values[row, :n].tolist(),
                logits.bottom_tokens[row][:n],
                logits.bottom_values[row, :n].tolist(),
            )
        )
    return _logit_bars(panels, path)


def family_counts_png(
    families: FeatureFamilies | Mapping[str, FeatureFamilies | Mapping[str, int]],
    path: str | Path,
    *,
    title: str = "feature families",
) -> Path:
    """Bars of the number of features per family label, one group per SAE (e.g. per layer).

    Args:
        families: one result, or group name → a result or its ``counts()``.
        path: where to write.
    """
    groups = {"features": families} if isinstance(families, FeatureFamilies) else families
    counts = {
        name: group.counts() if isinstance(group, FeatureFamilies) else dict(group)
        for name, group in groups.items()
    }
    return _count_bars(counts, path, title)


def head_families_png(
    result: Polysemanticity, path: str | Path, *, title: str | None = None
) -> Path:
    """Heads × families: how many of each head's top features carry each label at the stated
    confidence (PNG); a head's row title gives its verdict."""
    rows: list[HeadLabels] = []
    for top in result.head_features:
        assert top.labels is not None and top.confidences is not None
        for head in range(top.features.shape[0]):
            rows.append((f"L{top.layer}H{head}", top.labels[head], top.confidences[head]))
    verdicts = {f"L{v.layer}H{v.head}": v.verdict for v in result.verdicts}
    title = title or (
        f"top-{result.k} features per head: {result.fraction_polysemantic:.0%} polysemantic"
    )
    return _head_grid(rows, result.confidence, path, title, verdicts)


def proxy_histogram_png(
    histograms: ProxyHistogram | Mapping[int, ProxyHistogram],
    path: str | Path,
) -> Path:
    """Kissane et al.'s Figure 2, one row per feature: the activation histogram stacked by proxy
    value (specificity, left) and each bin's count × activation (expected value, right) (PNG).

    Args:
        histograms: from ``sla.analysis.proxy_histogram``, or feature → one.
        path: where to write.
    """
    given = {None: histograms} if isinstance(histograms, ProxyHistogram) else histograms
    rows: list[ProxyRow] = [
        (
            "feature" if feature is None else f"feature {feature}",
            hist.proxy,
            hist.edges.tolist(),
            hist.counts_true.tolist(),
            hist.counts_false.tolist(),
        )
        for feature, hist in given.items()
    ]
    return _proxy_rows(rows, path)


def table_plots(
    tables: Mapping[str, Sequence[Mapping[str, Any]]], folder: str | Path
) -> list[Path]:
    """The plots of the tables ``feature_logits``, ``family_counts`` and ``head_features`` (as
    the analyzers of the same names write them) that ``tables`` holds, written into ``folder``."""
    folder = Path(folder)
    written = []
    if tables.get("feature_logits"):
        written.append(
            _logit_bars(_logit_panels(tables["feature_logits"]), folder / "feature_logits.png")
        )
    if tables.get("family_counts"):
        counts = {
            "features": {row["label"]: int(row["features"]) for row in tables["family_counts"]}
        }
        written.append(_count_bars(counts, folder / "family_counts.png", "feature families"))
    if tables.get("head_features"):
        summary = (tables.get("polysemanticity") or [{}])[0]
        confidence = float(summary.get("confidence", 0.5))
        rows: dict[str, tuple[list[str], list[float]]] = {}
        for row in tables["head_features"]:
            labels, confidences = rows.setdefault(f"L{row['layer']}H{row['head']}", ([], []))
            labels.append(str(row["label"]))
            confidences.append(float(row["confidence"]))
        verdicts = {
            f"L{row['layer']}H{row['head']}": str(row["verdict"])
            for row in tables.get("head_verdicts", [])
        }
        grid = [(name, labels, values) for name, (labels, values) in rows.items()]
        written.append(
            _head_grid(
                grid, confidence, folder / "head_families.png", "top features per head", verdicts
            )
        )
    if tables.get("proxy_histogram"):
        written.append(
            _proxy_rows(
                _proxy_table_rows(tables["proxy_histogram"]), folder / "proxy_histogram.png"
            )
        )
    return written


def _proxy_table_rows(table: Sequence[Mapping[str, Any]]) -> list[ProxyRow]:
    by_feature: dict[int, list[Mapping[str, Any]]] = {}
    for row in table:
        by_feature.setdefault(int(row["feature"]), []).append(row)
    rows: list[ProxyRow] = []
    for feature, bins in list(by_feature.items())[:8]:
        bins = sorted(bins, key=lambda r: int(r["bin"]))
        edges = [float(r["low"]) for r in bins] + [float(bins[-1]["high"])]
        rows.append(
            (
                f"feature {feature}",
                str(bins[0]["proxy"]),
                edges,
                [int(r["proxy_true"]) for r in bins],
                [int(r["proxy_false"]) for r in bins],
            )
        )
    return rows


def _proxy_rows(rows: Sequence[ProxyRow], path: str | Path) -> Path:
    if not rows:
        raise ValueError("no features to plot: give at least one histogram")
    fig, axes = subplots(len(rows), 2, figsize=(8.0, 0.6 + 2.4 * len(rows)), squeeze=False)
    for (left, right), (title, proxy, edges, on, off) in zip(axes, rows, strict=True):
        lows, widths = edges[:-1], [b - a for a, b in pairwise(edges)]
        centers = [a + w / 2 for a, w in zip(lows, widths, strict=True)]
        for ax, scale, what in (
            (left, [1.0] * len(centers), "tokens"),
            (right, centers, "count × activation"),
        ):
            yes = [n * c for n, c in zip(on, scale, strict=True)]
            no = [n * c for n, c in zip(off, scale, strict=True)]
            ax.bar(lows, yes, width=widths, align="edge", color="#ea580c", label=f"{proxy}")
            ax.bar(
                lows, no, width=widths, align="edge", bottom=yes, color="#9ca3af",
                label=f"not {proxy}",
            )  # fmt: skip
            ax.set_xlabel("activation", fontsize=8)
            ax.set_ylabel(what, fontsize=8)
        total = sum(on) + sum(off)
        share = f"{sum(on) / total:.0%} {proxy}" if total else "never fires"
        left.set_title(f"{title}: specificity ({share})", fontsize=9)
        right.set_title(f"{title}: expected value", fontsize=9)
        left.legend(fontsize=7)
    return _save(fig, path)


def _logit_panels(table: Sequence[Mapping[str, Any]]) -> list[LogitPanel]:
    by_feature: dict[int, dict[str, list[tuple[int, str, float]]]] = {}
    for row in table:
        sides = by_feature.setdefault(int(row["feature"]), {"top": [], "bottom": []})
        sides[str(row["direction"])].append(
            (int(row["rank"]), str(row["token"]), float(row["value"]))
        )
    panels: list[LogitPanel] = []
    for feature, sides in list(by_feature.items())[:8]:
        top, bottom = sorted(sides["top"])[:10], sorted(sides["bottom"])[:10]
        panels.append(
            (
                f"feature {feature}",
                [t for _, t, _ in top],
                [v for _, _, v in top],
                [t for _, t, _ in bottom],
                [v for _, _, v in bottom],
            )
        )
    return panels


def _logit_bars(panels: Sequence[LogitPanel], path: str | Path) -> Path:
    if not panels:
        raise ValueError("no features to plot: give at least one feature")
    n = max(len(p[1]) + len(p[3]) for p in panels)
    fig, axes = subplots(
        1, len(panels), figsize=(2.6 * len(panels) + 0.6, 0.8 + 0.22 * n), squeeze=False
    )
    for ax, (title, top, top_values, bottom, bottom_values) in zip(axes[0], panels, strict=True):
        labels = [repr(t)[1:-1] for t in [*top, *reversed(bottom)]]
        values = [*top_values, *reversed(bottom_values)]
        ax.barh(
            range(len(values)), values, color=["#2563eb" if v >= 0 else "#dc2626" for v in values]
        )
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="#555", linewidth=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("direct logit effect", fontsize=8)
    return _save(fig, path)


def _count_bars(counts: Mapping[str, Mapping[str, int]], path: str | Path, title: str) -> Path:
    labels = [label for label in LABELS if any(group.get(label, 0) for group in counts.values())]
    labels = labels or list(FAMILIES)
    width = 0.8 / max(len(counts), 1)
    fig, ax = subplots(figsize=(1.5 + 0.9 * len(labels), 3.2))
    for i, (name, group) in enumerate(counts.items()):
        xs = [j + (i - (len(counts) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [group.get(label, 0) for label in labels], width=width, label=name)
    ax.set_xticks(
        range(len(labels)),
        [label.replace("_", " ") for label in labels],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("features")
    ax.set_title(title)
    if len(counts) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _head_grid(
    rows: Sequence[HeadLabels],
    confidence: float,
    path: str | Path,
    title: str,
    verdicts: Mapping[str, str],
) -> Path:
    columns = [*FAMILIES, "other"]
    grid = []
    for _, labels, values in rows:
        counted = [
            label if label in FAMILIES and value >= confidence else "other"
            for label, value in zip(labels, values, strict=True)
        ]
        grid.append([counted.count(column) for column in columns])
    fig, ax = subplots(figsize=(1.8 + 0.75 * len(columns), 1.0 + 0.3 * len(rows)))
    image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    ax.set_xticks(
        range(len(columns)),
        [c.replace("_", " ") for c in columns],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    names = [name for name, _, _ in rows]
    ax.set_yticks(range(len(rows)), [f"{n} ({verdicts.get(n, '?')})" for n in names], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="top features")
    return _save(fig, path)
