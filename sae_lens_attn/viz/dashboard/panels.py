"""HTML panels of a feature dashboard: plain HTML and inline SVG, no scripts, no external resources.

Every panel is a ``<section class="sla-panel" id="...">``; the ids (``dfa-panel``,
``head-attribution-panel``, ``contexts-panel``, ``histogram-panel``, ``feature-logits-panel``,
``family-panel``) are stable, for tests and for readers who link to them.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

from sae_lens_attn.analysis.families import FAMILIES, FeatureFamilies
from sae_lens_attn.analysis.logits import FeatureLogits
from sae_lens_attn.viz.dashboard.data import FeatureContext, FeatureData
from sae_lens_attn.viz.plots import dfa_tokens_html, svg_bars

CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#111}"
    ".sla-panel{border:1px solid #ddd;border-radius:6px;padding:0.8em 1em;margin:1em 0;"
    "max-width:72em}.sla-panel h2{font-size:1.1em;margin:0 0 0.5em}"
    ".sla-panel h3{font-size:0.95em;margin:0.8em 0 0.3em}.sla-note{color:#555;font-size:0.85em}"
    ".sla-ctx{font-family:monospace;line-height:1.8;margin:0.3em 0}"
    "table.sla{border-collapse:collapse;font-size:0.9em}"
    "table.sla td,table.sla th{border:1px solid #ddd;padding:2px 8px;text-align:right}"
    "nav a{margin-right:1em}"
)
"""Style shared by every page we write."""


def head_attribution_panel(data: FeatureData) -> str:
    """Bars of the feature's head-attribution shares."""
    labels = [f"head {h}" for h in range(len(data.head_shares))]
    top = max(range(len(data.head_shares)), key=lambda h: data.head_shares[h])
    return _panel(
        "head-attribution-panel",
        "Head attribution",
        f'<p class="sla-note">Share of the decoder norm ‖W_dec[f, head]‖ per head (sums to 1); '
        f"largest: head {top} ({data.head_shares[top]:.2f}).</p>"
        + svg_bars(labels, list(data.head_shares), element_id="head-attribution-chart"),
    )


def dfa_panel(data: FeatureData, *, n_contexts: int = 3) -> str:
    """DFA at the feature's peak in its top contexts: by source token and by head."""
    if not data.contexts:
        return _panel(
            "dfa-panel",
            "Direct feature attribution",
            '<p class="sla-note">The feature never fires on these tokens: nothing to attribute.</p>',
        )
    parts = [
        '<p class="sla-note">Contribution of each source token (blue +, red −) to the '
        "pre-activation at the peak (outlined); the contributions plus the bias "
        f"c = {data.bias:+.4f} sum to the pre-activation.</p>"
    ]
    for rank, ctx in enumerate(data.contexts[:n_contexts]):
        heads = [f"head {h}" for h in range(len(ctx.dfa_by_head))]
        parts.append(
            dfa_tokens_html(
                list(ctx.tokens),
                torch.tensor(ctx.dfa_by_src),
                ctx.position,
                title=f"context {rank + 1}: prompt {ctx.prompt}, position {ctx.position}, "
                f"pre-activation {ctx.pre_act:.3f}",
            )
            + _top_sources(ctx)
            + "<h3>by head</h3>"
            + svg_bars(heads, list(ctx.dfa_by_head), element_id=f"dfa-heads-{rank}")
        )
    return _panel("dfa-panel", "Direct feature attribution (DFA)", "".join(parts))


def contexts_panel(data: FeatureData) -> str:
    """Top-activating contexts, tokens shaded by the feature's activation."""
    if not data.contexts:
        body = '<p class="sla-note">The feature never fires on these tokens.</p>'
    else:
        scale = max(ctx.activation for ctx in data.contexts) or 1.0
        body = "".join(_activation_line(ctx, scale) for ctx in data.contexts)
    return _panel("contexts-panel", "Top activating contexts", body)


def histogram_panel(data: FeatureData) -> str:
    """Histogram of the feature's non-zero activations, with its density."""
    note = f'<p class="sla-note">Active at {100 * data.density:.3f}% of the counted tokens.</p>'
    if not data.histogram_counts:
        return _panel("histogram-panel", "Activation histogram", note)
    edges = data.histogram_edges
    labels = [f"{edges[i]:.2f}–{edges[i + 1]:.2f}" for i in range(len(data.histogram_counts))]
    chart = svg_bars(
        labels,
        [float(c) for c in data.histogram_counts],
        width=420,
        bar_height=10,
        element_id="histogram-chart",
    )
    return _panel("histogram-panel", "Activation histogram", note + chart)


def feature_logits_panel(logits: FeatureLogits, feature: int) -> str:
    """Bars of the tokens whose logits the feature's direct effect raises and lowers most."""
    row = logits.row(feature)
    sides = []
    for name, tokens, values in (
        ("raises", logits.top_tokens[row], logits.top_values[row]),
        ("lowers", logits.bottom_tokens[row], logits.bottom_values[row]),
    ):
        labels = [repr(token)[1:-1] for token in tokens]
        chart = svg_bars(labels, values.tolist(), element_id=f"feature-logits-{name}")
        sides.append(f"<h3>{name}</h3>{chart}")
    return _panel(
        "feature-logits-panel",
        "Feature logits",
        '<p class="sla-note">Direct effect W_dec[f] · W_O · W_U on the logits of layer '
        f"{logits.layer}'s feature, skipping later layers, no final norm.</p>" + "".join(sides),
    )


def family_panel(families: FeatureFamilies, feature: int) -> str:
    """The feature's family label and the share of its top contexts fitting each family."""
    label = families.labels[int(feature)]
    column = int((families.features == int(feature)).nonzero()[0])
    n = int(families.contexts[column])
    if n == 0:
        note = "The feature never fires on these tokens: no family."
        return _panel("family-panel", "Family", f'<p class="sla-note">{note}</p>')
    shares = [float(families.shares[name][column]) for name in FAMILIES]
    verdict = label.replace("_", " ")
    if label in FAMILIES:
        verdict += f" ({families.confidence(feature):.0%} of its contexts)"
    return _panel(
        "family-panel",
        "Family",
        f'<p id="family-label"><b>{html.escape(verdict)}</b></p><p class="sla-note">Share of its '
        f"{n} max-activating contexts whose top DFA source and logit effect fit each family "
        f"(a label needs {families.thresholds.min_share:.0%}).</p>"
        + svg_bars(
            [_SHORT.get(name, name) for name in FAMILIES], shares, element_id="family-chart"
        ),
    )


_SHORT = {
    "duplicate_token": "duplicate",
    "local_context": "local",
    "long_range_context": "long-range",
}
"""Family names short enough for the bar labels."""


def page(title: str, body: str, *, head: str = "") -> str:
    """A complete HTML page with our style; ``head`` is extra markup for ``<head>``."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style>{head}</head><body>{body}</body></html>"
    )


def nav(links: Sequence[tuple[str, str]]) -> str:
    """A row of links ``(href, text)``."""
    return (
        "<nav>"
        + "".join(f'<a href="{html.escape(h)}">{html.escape(t)}</a>' for h, t in links)
        + "</nav>"
    )


def _panel(ident: str, title: str, body: str) -> str:
    return f'<section class="sla-panel" id="{ident}"><h2>{html.escape(title)}</h2>{body}</section>'


def _top_sources(ctx: FeatureContext, k: int = 3) -> str:
    order = sorted(range(len(ctx.dfa_by_src)), key=lambda s: -abs(ctx.dfa_by_src[s]))[:k]
    items = ", ".join(
        f"{html.escape(repr(ctx.tokens[s]))} at {s} ({ctx.dfa_by_src[s]:+.3f})" for s in order
    )
    return f'<p class="sla-note">Strongest sources: {items}</p>'


def _activation_line(ctx: FeatureContext, scale: float) -> str:
    spans = []
    for pos, (token, value) in enumerate(zip(ctx.tokens, ctx.activations, strict=True)):
        alpha = min(max(value, 0.0) / scale, 1.0)
        border = "outline:2px solid #111;" if pos == ctx.position else ""
        spans.append(
            f'<span title="pos {pos}: {value:.4f}" style="background:rgba(234,88,12,{alpha:.2f});'
            f'{border}white-space:pre">{html.escape(token)}</span>'
        )
    return (
        f'<div class="sla-ctx"><b>{ctx.activation:.3f}</b> (prompt {ctx.prompt}): '
        f"{''.join(spans)}</div>"
    )
