"""HTML panels of a feature dashboard: plain HTML and inline SVG, no scripts, no external resources.

Every panel is a ``<section class="sla-panel" id="...">``; the ids (``dfa-panel``,
``head-attribution-panel``, ``contexts-panel``, ``histogram-panel``, ``feature-logits-panel``,
``family-panel``, ``proxy-panel``, ``rdfa-panel``) are stable, for tests and for readers who link to them.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import torch

from sae_lens_attn.analysis.families import FAMILIES, FeatureFamilies
from sae_lens_attn.analysis.logits import FeatureLogits
from sae_lens_attn.analysis.proxies import ProxyHistogram
from sae_lens_attn.viz.dashboard.data import FeatureContext, FeatureData, readable_token
from sae_lens_attn.viz.dashboard.feature_analyses import PeakRDFA
from sae_lens_attn.viz.induction_plots import rdfa_tree_html
from sae_lens_attn.viz.plots import dfa_tokens_html, svg_bars

CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#111}"
    ".sla-panel{border:1px solid #ddd;border-radius:6px;padding:0.8em 1em;margin:1em 0;"
    "max-width:72em}.sla-panel h2{font-size:1.1em;margin:0 0 0.5em}"
    ".sla-panel h3{font-size:0.95em;margin:0.8em 0 0.3em}.sla-note{color:#555;font-size:0.85em}"
    ".sla-ctx{font-family:monospace;line-height:1.8;margin:0.3em 0}"
    # token rows wrap at the window's edge instead of widening the page (readable_token leaves
    # no spaces in them, so nothing else would break the line)
    ".sla-ctx,.sla-ctx span{white-space:pre-wrap!important;overflow-wrap:anywhere}"
    "table.sla td{overflow-wrap:anywhere}"
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
        labels = [_one_line(readable_token(token)) for token in tokens]
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


def proxy_panel(hist: ProxyHistogram) -> str:
    """Kissane et al.'s Figure 2 for one feature: its activation histogram stacked by proxy
    value (specificity) and each bin's count × activation (expected value)."""
    active = int(hist.counts_true.sum() + hist.counts_false.sum())
    if not active:
        note = f"The feature never fires on these tokens: nothing to compare with the {hist.proxy} proxy."
        return _panel(
            "proxy-panel", f"Against the {hist.proxy} proxy", f'<p class="sla-note">{note}</p>'
        )
    edges = hist.edges.tolist()
    summary = (
        f'<p class="sla-note">Orange: tokens where the {html.escape(hist.proxy)} proxy holds '
        f"(sla.analysis.induction_proxy: the token repeats an earlier A whose next token B is "
        f"also the next token here); grey: where it does not. Of {active} active tokens "
        f"<b id='proxy-specificity'>{hist.specificity:.0%}</b> fit the proxy, carrying "
        f"{hist.expected_share:.0%} of the expected value (the proxy holds at "
        f"{hist.base_rate:.0%} of all tokens); the feature is active at "
        f"{hist.sensitivity:.0%} of the {int(hist.counts_true.sum()) + hist.inactive_true} "
        "tokens where the proxy holds.</p>"
    )
    charts = (
        "<h3>specificity: tokens per activation bin</h3>"
        + _stacked_columns(
            edges, hist.counts_true.tolist(), hist.counts_false.tolist(), "proxy-specificity-chart"
        )
        + "<h3>expected value: count × activation per bin</h3>"
        + _stacked_columns(
            edges, hist.expected_true.tolist(), hist.expected_false.tolist(), "proxy-expected-chart"
        )
    )
    return _panel("proxy-panel", f"Against the {hist.proxy} proxy", summary + charts)


def rdfa_panel(peak: PeakRDFA, *, tokenizer: Any = None, top: int = 8) -> str:
    """The recursive DFA tree of the feature at its strongest peak (collapsible, no scripts)."""
    note = f'<p class="sla-note">{html.escape(peak.note)}</p>' if peak.note else ""
    if peak.result is None:
        return _panel("rdfa-panel", "Recursive DFA", note)
    r = peak.result
    intro = (
        f'<p class="sla-note">The pre-activation at the peak of the strongest context (prompt '
        f"{r.prompt}, position {r.position}) split over every upstream part of the residual "
        "stream, with attention patterns and norm scales frozen; upstream features open into "
        "their own split.</p>"
    )
    tree = rdfa_tree_html(r, tokenizer=tokenizer, top=top)
    return _panel("rdfa-panel", "Recursive DFA", intro + note + tree)


def _stacked_columns(
    edges: Sequence[float], on: Sequence[float], off: Sequence[float], element_id: str
) -> str:
    """Columns per bin, ``on`` (orange) under ``off`` (grey), as inline SVG."""
    width, height, left, bottom = 420, 140, 40, 18
    plot_w, plot_h = width - left - 8, height - bottom - 6
    scale = max((a + b for a, b in zip(on, off, strict=True)), default=0.0) or 1.0
    step = plot_w / max(len(on), 1)
    shapes = []
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        x = left + i * step
        h_on, h_off = plot_h * a / scale, plot_h * b / scale
        tip = f"{edges[i]:.3g}–{edges[i + 1]:.3g}: {a:.4g} proxy, {b:.4g} not"
        shapes.append(
            f"<g><title>{html.escape(tip)}</title>"
            f'<rect x="{x:.1f}" y="{6 + plot_h - h_on:.1f}" width="{step - 1:.1f}" '
            f'height="{h_on:.1f}" fill="#ea580c"/>'
            f'<rect x="{x:.1f}" y="{6 + plot_h - h_on - h_off:.1f}" width="{step - 1:.1f}" '
            f'height="{h_off:.1f}" fill="#9ca3af"/></g>'
        )
    axis = (
        f'<text x="{left - 4}" y="14" text-anchor="end" font-size="10">{scale:.3g}</text>'
        f'<text x="{left}" y="{height - 4}" font-size="10">0</text>'
        f'<text x="{width - 8}" y="{height - 4}" text-anchor="end" font-size="10">'
        f"{edges[-1]:.3g} activation</text>"
    )
    return (
        f'<svg id="{html.escape(element_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img">{"".join(shapes)}{axis}</svg>'
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
        f"{html.escape(_one_line(ctx.tokens[s]))} at {s} ({ctx.dfa_by_src[s]:+.3f})" for s in order
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


def _one_line(token: str) -> str:
    """A shown token (``readable_token``) without the line break its newline mark keeps."""
    return token.replace("\n", "")
