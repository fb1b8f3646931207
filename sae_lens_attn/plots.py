"""Plots: head attribution as a heatmap (PNG), DFA over tokens as highlighted text (HTML)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor


def head_attribution_heatmap(
    shares: Float[Tensor, " F n_heads"],
    features: Sequence[int],
    path: str | Path,
    *,
    title: str = "head attribution",
) -> Path:
    """Write a features × heads heatmap of head-attribution shares to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_features, n_heads = shares.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_heads, 1.2 + 0.22 * n_features))
    image = ax.imshow(shares.float().numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
    ax.set_yticks(range(n_features), [str(f) for f in features], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("feature")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of decoder norm")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
            f'white-space:pre">{html.escape(token)}</span>'
        )
    header = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f'{header}<div style="font-family:monospace;line-height:1.8">{"".join(spans)}</div>'


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
