"""Plots of prefix-length induction (PNG, matplotlib Agg) and RDFA trees (self-contained HTML).

Each is drawn from a typed result (``PrefixInduction``, ``PrefixEvents``, ``RDFAResult``) or, for
``sae-lens-attn analyze``, from the tables its analyzers write (``induction_table_plots``); both
go through the same drawing code.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae_lens_attn.analysis.long_prefix import PrefixEvents, PrefixInduction
from sae_lens_attn.analysis.recursive_dfa import RDFAResult
from sae_lens_attn.viz.plots import _save, html_page, subplots

Rows = Sequence[Mapping[str, Any]]


def prefix_curves_png(
    result: PrefixInduction | Rows,
    path: str | Path,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    title: str = "induction score against prefix length",
) -> Path:
    """Score against prefix length, one line per head, one panel per layer (Kissane et al.'s
    Figure 4a), with ± one standard error shaded.

    Args:
        result: from ``sla.analysis.prefix_induction``, or its ``rows()`` / the analyzer's
            ``prefix_scores`` table.
        path: where to write.
        heads: ``(layer, head)`` pairs to draw (default: all).
    """
    rows = result.rows() if isinstance(result, PrefixInduction) else result
    curves: dict[int, dict[int, list[tuple[int, float, float]]]] = {}
    for row in rows:
        key = (int(row["layer"]), int(row["head"]))
        if heads is not None and key not in heads:
            continue
        point = (int(row["prefix_length"]), float(row["score"]), float(row.get("sem") or 0.0))
        curves.setdefault(key[0], {}).setdefault(key[1], []).append(point)
    layers = sorted(curves)
    fig, axes = subplots(
        1, max(1, len(layers)), figsize=(4.2 * max(1, len(layers)), 3.4), squeeze=False
    )
    for ax, layer in zip(axes[0], layers, strict=False):
        for head, points in sorted(curves[layer].items()):
            x, y, err = zip(*sorted(points), strict=True)
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=f"{layer}.{head}")
            low = [a - b for a, b in zip(y, err, strict=True)]
            high = [a + b for a, b in zip(y, err, strict=True)]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("prefix length")
        ax.set_ylabel("attention to the token after the first copy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, title="head", title_fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def prefix_counts_png(
    events: PrefixEvents | Rows,
    path: str | Path,
    *,
    max_length: int = 8,
    title: str = "prefix lengths of induction events",
) -> Path:
    """Events per prefix length (0: attention that is not induction), grouped bars per head.

    Args:
        events: from ``sla.analysis.prefix_events``, or the analyzer's ``prefix_events`` table
            (rows with ``layer``, ``head``, ``prefix_length``, ``events``).
        path: where to write.
        max_length: the last bucket holds this length and longer (tables: as written).
    """
    rows = _count_rows(events, max_length) if isinstance(events, PrefixEvents) else events
    counts: dict[str, dict[int, int]] = {}
    for row in rows:
        name = f"{int(row['layer'])}.{int(row['head'])}"
        counts.setdefault(name, {})[int(row["prefix_length"])] = int(row["events"])
    lengths = sorted({p for by_length in counts.values() for p in by_length})
    fig, ax = subplots(figsize=(max(5.0, 0.5 * len(lengths) * max(1, len(counts)) ** 0.5), 3.4))
    width = 0.8 / max(1, len(counts))
    for i, (name, by_length) in enumerate(sorted(counts.items())):
        x = [p + (i - (len(counts) - 1) / 2) * width for p in lengths]
        ax.bar(x, [by_length.get(p, 0) for p in lengths], width=width, label=name)
    ax.set_xticks(lengths, [f"{p}+" if p == max(lengths) else str(p) for p in lengths])
    ax.set_xlabel("prefix length")
    ax.set_ylabel("events")
    ax.set_title(title)
    if counts:
        ax.legend(fontsize=7, title="head", title_fontsize=7)
    return _save(fig, path)


def prefix_corruption_png(
    events: PrefixEvents | Rows,
    path: str | Path,
    *,
    title: str = "attention before and after corrupting the token before the prefix",
) -> Path:
    """Mean attention on events with a prefix of 2 or more, clean and with ``tokens[src − 2]``
    corrupted (Kissane et al.'s intervention), per head.

    Args:
        events: from ``sla.analysis.prefix_events``, or the analyzer's ``prefix_corruption``
            table (rows with ``layer``, ``head``, ``n``, ``clean``, ``corrupted``).
        path: where to write.
    """
    rows = _corruption_rows(events) if isinstance(events, PrefixEvents) else events
    rows = [row for row in rows if int(row["n"]) > 0]
    names = [f"{int(row['layer'])}.{int(row['head'])}" for row in rows]
    fig, ax = subplots(figsize=(max(4.5, 0.7 * len(rows) + 1.5), 3.4))
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [float(r["clean"]) for r in rows], width=0.4, label="clean")
    ax.bar(
        [i + 0.2 for i in x], [float(r["corrupted"]) for r in rows], width=0.4, label="corrupted"
    )
    ax.set_xticks(x, names)
    ax.set_xlabel("head")
    ax.set_ylabel("mean attention to the source")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def rdfa_tree_html(
    result: RDFAResult | Rows,
    *,
    tokenizer: Any = None,
    top: int = 12,
    title: str | None = None,
    summary: Mapping[str, Any] | None = None,
) -> str:
    """An RDFA tree as nested, collapsible HTML lists (no scripts): each node's ``top``
    contributions by magnitude, the rest summed on one line, bars scaled to the largest.

    Args:
        result: from ``sla.analysis.rdfa``, or its ``rows()`` / the analyzer's ``rdfa`` table.
        tokenizer: to show source tokens of a result as text.
        top: contributions shown per node.
        title: heading (default: the feature, layer and position).
        summary: ``pre_act`` and ``bias`` (taken from a result when one is given).
    """
    if isinstance(result, RDFAResult):
        rows: Rows = result.rows(tokenizer)
        summary = {"pre_act": result.pre_act, "bias": result.bias, **(summary or {})}
        title = (
            title or f"layer {result.layer} feature {result.feature} at position {result.position}"
        )
    else:
        rows = result
    children: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        children.setdefault(str(row["parent"] or ""), []).append(row)
    scale = max((abs(float(r["value"])) for r in rows), default=1.0) or 1.0

    def render(parent: str) -> str:
        items = sorted(children.get(parent, []), key=lambda r: -abs(float(r["value"])))
        shown, rest = items[:top], items[top:]
        lines = []
        for row in shown:
            label = _bar(float(row["value"]), scale) + html.escape(_label(row))
            if str(row["id"]) in children:
                bias = float(row.get("children_bias") or 0.0)
                lines.append(
                    f"<li><details><summary>{label}</summary><ul>"
                    f"{render(str(row['id']))}<li>{_bar(bias, scale)}{bias:+.4f}  encoder bias</li>"
                    "</ul></details></li>"
                )
            else:
                lines.append(f"<li>{label}</li>")
        if rest:
            total = sum(float(r["value"]) for r in rest)
            lines.append(f"<li>{_bar(total, scale)}{total:+.4f}  {len(rest)} more parts</li>")
        return "".join(lines)

    head = f"<h3>{html.escape(title)}</h3>" if title else ""
    if summary:
        head += (
            f"<p>pre-activation {float(summary['pre_act']):+.4f} = contributions + bias "
            f"{float(summary['bias']):+.4f}</p>"
        )
    style = "font-family:monospace;font-size:13px;list-style:none"
    return f'{head}<ul style="{style}">{render("")}</ul>'


def rdfa_page(results: Sequence[RDFAResult], *, tokenizer: Any = None, top: int = 12) -> str:
    """A self-contained page of RDFA trees."""
    sections = [rdfa_tree_html(r, tokenizer=tokenizer, top=top) for r in results]
    return html_page("recursive direct feature attribution", sections)


def induction_table_plots(tables: Mapping[str, Rows], folder: str | Path) -> list[Path]:
    """The plots of the tables ``prefix_scores``, ``prefix_events``, ``prefix_corruption`` and
    ``rdfa`` (as the analyzers ``prefix_induction`` and ``rdfa`` write them) that ``tables``
    holds, written into ``folder``."""
    folder = Path(folder)
    written = []
    if tables.get("prefix_scores"):
        written.append(prefix_curves_png(tables["prefix_scores"], folder / "prefix_scores.png"))
    if tables.get("prefix_events"):
        written.append(prefix_counts_png(tables["prefix_events"], folder / "prefix_events.png"))
    if any(int(r["n"]) for r in tables.get("prefix_corruption", [])):
        written.append(
            prefix_corruption_png(tables["prefix_corruption"], folder / "prefix_corruption.png")
        )
    if tables.get("rdfa"):
        summary = (tables.get("rdfa_summary") or [None])[0]
        title = None
        if summary is not None:
            title = (
                f"layer {summary['layer']} feature {summary['feature']} at prompt "
                f"{summary['prompt']}, position {summary['position']} ({summary['token']!r})"
            )
        section = rdfa_tree_html(tables["rdfa"], title=title, summary=summary)
        path = folder / "rdfa.html"
        path.write_text(html_page("recursive direct feature attribution", [section]))
        written.append(path)
    return written


def _count_rows(events: PrefixEvents, max_length: int) -> list[dict[str, Any]]:
    heads = sorted(set(zip(events.layer.tolist(), events.head.tolist(), strict=True)))
    return [
        {"layer": layer, "head": head, "prefix_length": p, "events": n}
        for layer, head in heads
        for p, n in enumerate(events.prefix_counts(layer, head, max_length))
    ]


def _corruption_rows(events: PrefixEvents) -> list[dict[str, Any]]:
    heads = sorted(set(zip(events.layer.tolist(), events.head.tolist(), strict=True)))
    rows = []
    for layer, head in heads:
        n, clean, corrupted = events.corruption(layer, head)
        rows.append({"layer": layer, "head": head, "n": n, "clean": clean, "corrupted": corrupted})
    return rows


def _label(row: Mapping[str, Any]) -> str:
    kind, layer, position = str(row["kind"]), row.get("layer"), row.get("position")
    where = f" @ {position} {str(row.get('token'))!r}"
    value = f"{float(row['value']):+.4f}  "
    if kind == "feature":
        activation = row.get("activation")
        act = "" if activation in (None, "") else f", act {float(activation):.3f}"
        return f"{value}L{layer} feature {row['feature']}{where}{act}"
    layer_text = "" if layer in (None, "") else f"L{layer} "
    return f"{value}{layer_text}{kind.replace('_', ' ')}{where}"


def _bar(value: float, scale: float) -> str:
    width = round(60 * min(abs(value) / scale, 1.0))
    color = "#2563eb" if value >= 0 else "#dc2626"
    return (
        f'<span style="display:inline-block;width:60px"><span style="display:inline-block;'
        f'height:0.8em;width:{width}px;background:{color}"></span></span> '
    )
