"""Plots of the causal analyzers (PNG, matplotlib Agg), drawn from their tables.

- ``ablation_box_png``: per-prompt effects of the largest-effect features and of the error term,
  one box per prompt group (IOI template) side by side (``feature_ablation``).
- ``patching_bars_png``: the patched metric per corruption beside the corrupt run, with the clean
  run and the zero-ablated layer as baselines, one panel per layer (Kissane et al.'s Figure 5;
  ``activation_patching``).
- ``induction_ablation_png``: the change of the induced token's logit when each set of features
  is zero-ablated at once (``induction_ablation``).

``causal_table_plots`` draws those whose tables ``sae-lens-attn analyze`` holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sae_lens_attn.viz.plots import _save, subplots

Rows = Sequence[Mapping[str, Any]]
"""A table, as an analyzer returns it."""
ALL = "all"
"""The group of every prompt (``sae_lens_attn.analysis.analyzers.causal.ALL``)."""
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def ablation_box_png(
    prompts: Rows,
    effects: Rows,
    path: str | Path,
    *,
    title: str = "effect of zero-ablating each feature (error term kept)",
) -> Path:
    """Boxes of each shown feature's per-prompt effect on the metric, and of the error term's,
    one box per group side by side; features in the order of the ``all`` group's ranks.

    Args:
        prompts: the ``ablation_prompts`` table (``group``, ``component``, ``feature``,
            ``delta`` per prompt).
        effects: the ``ablation_effects`` table (its ``all`` ranks order the features).
        path: where to write.
    """
    ranked = sorted(
        (row for row in effects if row["group"] == ALL and row["component"] == "feature"),
        key=lambda row: int(row["rank"]),
    )
    components: list[Any] = [row["feature"] for row in ranked]
    components += sorted(
        {r["feature"] for r in prompts if r["component"] == "feature"} - set(components),
        key=int,
    )
    components.append(None)  # the error term, last
    groups = sorted({str(r["group"]) for r in prompts}) or [ALL]
    values: dict[tuple[Any, str], list[float]] = {}
    for row in prompts:
        key = (None if row["component"] == "error" else row["feature"], str(row["group"]))
        values.setdefault(key, []).append(float(row["delta"]))
    width = 0.8 / len(groups)
    fig, ax = subplots(figsize=(max(5.0, 0.6 * len(components) * len(groups) + 2), 3.8))
    for g, group in enumerate(groups):
        data = [values.get((c, group), []) for c in components]
        positions = [i - 0.4 + width * (g + 0.5) for i in range(len(components))]
        drawn = [(p, d) for p, d in zip(positions, data, strict=True) if d]
        if not drawn:
            continue
        boxes = ax.boxplot(
            [d for _, d in drawn],
            positions=[p for p, _ in drawn],
            widths=width * 0.9,
            patch_artist=True,
            showfliers=True,
            flierprops={"markersize": 2},
        )
        for box in boxes["boxes"]:
            box.set_facecolor(COLORS[g % len(COLORS)])
            box.set_alpha(0.7)
        ax.plot([], [], color=COLORS[g % len(COLORS)], linewidth=6, alpha=0.7, label=group)
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_xticks(
        range(len(components)), ["error" if c is None else str(c) for c in components], rotation=45
    )
    ax.set_xlabel("feature")
    ax.set_ylabel("metric after ablation − clean")
    ax.set_title(title)
    if len(groups) > 1:
        ax.legend(fontsize=7, title="template", title_fontsize=7)
    return _save(fig, path)


def patching_bars_png(
    rows: Rows,
    path: str | Path,
    *,
    group: str = ALL,
    title: str | None = None,
) -> Path:
    """The patched metric per corruption (per head for target ``z``), beside the corrupt run,
    with the clean run (dashed) and the zero-ablated layer (dotted) as baselines; one panel per
    layer.

    Args:
        rows: the ``patching`` table.
        path: where to write.
        group: the prompt group drawn (default: every prompt).
    """
    chosen = [row for row in rows if row["group"] == group]
    layers = sorted({int(row["layer"]) for row in chosen})
    fig, axes = subplots(
        1, max(1, len(layers)), figsize=(4.6 * max(1, len(layers)), 3.8), squeeze=False
    )
    for ax, layer in zip(axes[0], layers, strict=False):
        here = [row for row in chosen if int(row["layer"]) == layer]
        per_head = any(row["head"] is not None for row in here)
        corruptions = list(dict.fromkeys(str(row["corruption"]) for row in here))
        if per_head:
            heads = sorted({int(row["head"]) for row in here})
            width = 0.8 / len(corruptions)
            for c, corruption in enumerate(corruptions):
                by_head = {
                    int(r["head"]): float(r["patched"])
                    for r in here
                    if r["corruption"] == corruption
                }
                ax.bar(
                    [h - 0.4 + width * (c + 0.5) for h in heads],
                    [by_head[h] for h in heads],
                    width=width,
                    color=COLORS[c % len(COLORS)],
                    label=f"patched from {corruption}",
                )
            ax.set_xticks(heads, [f"H{h}" for h in heads])
            ax.set_xlabel("head")
        else:
            patched = [float(r["patched"]) for r in here]
            corrupt = [float(r["corrupt"]) for r in here]
            x = list(range(len(here)))
            ax.bar([i - 0.2 for i in x], corrupt, width=0.4, color="#bbbbbb", label="corrupt run")
            ax.bar([i + 0.2 for i in x], patched, width=0.4, color=COLORS[0], label="patched")
            ax.set_xticks(x, [str(r["corruption"]).replace("_", " ") for r in here], fontsize=8)
            ax.set_xlabel("corruption")
        clean, zeroed = float(here[0]["clean"]), float(here[0]["zero_ablated"])
        ax.axhline(clean, color="#2a7d3a", linestyle="--", linewidth=1.2, label="clean run")
        ax.axhline(zeroed, color="#b22222", linestyle=":", linewidth=1.5, label="zero-ablated")
        ax.axhline(0, color="#444", linewidth=0.6)
        ax.set_ylabel("metric")
        ax.set_title(f"layer {layer}: {here[0]['direction']} of {here[0]['target']}")
        ax.legend(fontsize=7)
    fig.suptitle(title or f"activation patching ({group})")
    return _save(fig, path)


def induction_ablation_png(
    rows: Rows,
    path: str | Path,
    *,
    title: str = "zero-ablating each set at the second occurrence of repeated spans",
) -> Path:
    """Bars of the change of the induced token's logit when each set is ablated at once, with
    the set's size and summed activation in its label.

    Args:
        rows: the ``induction_ablation`` table.
        path: where to write.
    """
    drawn = [row for row in rows if row.get("delta_logit") is not None]
    labels = []
    for row in drawn:
        if row["activation"] is None:
            labels.append(str(row["set"]))
        else:
            labels.append(
                f"{row['set']}\n{row['features']} features\nactivation {float(row['activation']):.2f}"
            )
    fig, ax = subplots(figsize=(max(4.5, 1.6 * len(drawn) + 1), 3.8))
    values = [float(row["delta_logit"]) for row in drawn]
    ax.bar(range(len(drawn)), values, color=[COLORS[i % len(COLORS)] for i in range(len(drawn))])
    for i, value in enumerate(values):
        ax.annotate(f"{value:+.3f}", (i, value), ha="center", va="bottom" if value >= 0 else "top")
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_xticks(range(len(drawn)), labels, fontsize=8)
    ax.set_ylabel("change of the induced token's logit")
    ax.set_title(title)
    return _save(fig, path)


def causal_table_plots(tables: Mapping[str, Rows], folder: str | Path) -> list[Path]:
    """The plots of the tables ``ablation_prompts`` (with ``ablation_effects``), ``patching`` and
    ``induction_ablation`` that ``tables`` holds, written into ``folder``."""
    folder = Path(folder)
    written = []
    if tables.get("ablation_prompts"):
        written.append(
            ablation_box_png(
                tables["ablation_prompts"],
                tables.get("ablation_effects", []),
                folder / "ablation_effects.png",
            )
        )
    if tables.get("patching"):
        written.append(patching_bars_png(tables["patching"], folder / "patching.png"))
    if tables.get("induction_ablation"):
        written.append(
            induction_ablation_png(tables["induction_ablation"], folder / "induction_ablation.png")
        )
    return written
