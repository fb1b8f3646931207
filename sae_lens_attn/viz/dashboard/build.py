"""``build_dashboard``: a folder of HTML feature dashboards that opens from disk, offline."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_attn.analysis import feature_families, feature_logits
from sae_lens_attn.corpus import Corpus, corpus_of
from sae_lens_attn.outputs import atomic_output, check_output
from sae_lens_attn.site import AttnSite
from sae_lens_attn.validation import (
    check_context,
    check_count,
    check_features,
    special_token_ids,
    tokenizer_of,
)
from sae_lens_attn.viz.dashboard import feature_analyses, panels, saedashboard
from sae_lens_attn.viz.dashboard.data import FeatureData, collect

Engine = Literal["auto", "saedashboard", "own"]
"""``saedashboard``: SAEDashboard's pages plus our DFA and head-attribution panels (TransformerLens
models); ``own``: our pages only (any backend); ``auto``: SAEDashboard where it serves, else ours."""
ENGINES: tuple[str, ...] = get_args(Engine)

OUTPUT_KIND = "dashboard"
"""Kind of output folder a dashboard is (see ``sae_lens_attn.outputs``)."""
ASSETS = "assets"
"""Folder of the dashboard's scripts (d3 and Plotly, for SAEDashboard's pages)."""


@dataclass(frozen=True)
class Dashboard:
    """A written dashboard folder."""

    out_dir: Path
    """The folder."""
    index: Path
    """``index.html``: the features, linking to their pages."""
    pages: dict[int, Path]
    """Feature index → its page."""
    engine: Literal["saedashboard", "own"]
    """What built the pages."""
    note: str
    """Why ``auto`` chose ``own`` (empty otherwise)."""


def build_dashboard(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " rows ctx"] | Corpus,
    out: str | Path,
    *,
    features: Sequence[int] | None = None,
    top: int = 8,
    tokenizer: Any = None,
    engine: Engine = "auto",
    exclude_tokens: Sequence[int] | None = None,
    n_contexts: int = 8,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    title: str | None = None,
    index_columns: Mapping[str, Mapping[int, str]] | None = None,
    upstream_saes: Sequence[Any] = (),
) -> Dashboard:
    """Write feature dashboards with DFA and head-attribution panels into ``out``.

    Args:
        model: any model a backend supports.
        sae: a hook_z SAE of ``model`` with a linear encoder.
        tokens: token ids ``[rows, ctx]`` to find top-activating contexts in, or a ``Corpus``
            of them (its capture and encode are shared; ``exclude_tokens`` is then its own).
        out: folder to write (written to a temporary folder first, then renamed).
        features: feature indices (default: the ``top`` features, ``Corpus.top_features``).
        top: features to show when ``features`` is not given.
        tokenizer: decodes tokens (default: the model's).
        engine: see ``Engine``.
        exclude_tokens: token ids that are never a feature's peak nor counted (default: the
            tokenizer's special tokens).
        n_contexts: top contexts per feature.
        batch_size: contexts per forward pass.
        overwrite: replace an earlier dashboard in ``out`` (a folder of other files never is).
        progress: show a progress bar.
        title: page title (default: the SAE's hook name).
        upstream_saes: SAEs of earlier layers, for the recursive-DFA panel (an earlier layer
            without one counts as an error term there).
        index_columns: extra columns of the index, also shown on each feature's page: column
            name → feature → text (e.g. why a feature is shown); a feature missing from a column
            gets an empty cell.

    Returns:
        A ``Dashboard``: its folder, index page and one page per feature.

    Raises:
        ValueError: the SAE does not fit the model, features are out of range, an unknown
            engine, or ``saedashboard`` where it cannot serve.
        FileExistsError: ``out`` may not be written (``sae_lens_attn.outputs.check_output``).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown dashboard engine {engine!r}; valid: {list(ENGINES)}")
    if isinstance(tokens, Corpus):
        corpus = corpus_of(model, tokens)
    else:
        corpus = Corpus(
            model, tokens, keep={"pattern", "values"}, batch_size=batch_size,
            ignore_tokens=exclude_tokens,
        )  # fmt: skip
    backend, tokens = corpus.backend, corpus.tokens
    site = AttnSite.from_sae(sae, backend)
    check_context(backend, tokens.shape[1])
    if features is not None:
        features = check_features(features, sae.cfg.d_sae).tolist()
    out = Path(out)
    check_output(out, kind=OUTPUT_KIND, overwrite=overwrite)
    reason = saedashboard.unsupported_reason(backend, sae) if engine != "own" else None
    if engine == "saedashboard" and reason:
        raise ValueError(f"engine='saedashboard' cannot build this dashboard: {reason}")
    used: Literal["saedashboard", "own"] = "own" if engine == "own" or reason else "saedashboard"
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(backend)
    excluded = list(corpus.ignore_tokens or special_token_ids(tokenizer_of(backend)))
    counted = corpus.counted.cpu()
    acts = corpus.activations(sae).float().cpu()
    if features is None:
        features = corpus.top_features(sae, check_count("top", top))
    bar = tqdm(total=len(features) + 1, desc="dashboard", unit="feature", disable=not progress)
    with bar:
        data = collect(backend, sae, corpus, features, tokenizer=tokenizer, n_contexts=n_contexts)
        logits = feature_logits(backend, sae, features, k=10, tokenizer=tokenizer)
        families = feature_families(
            backend, sae, corpus, features, tokenizer=tokenizer, ignore_tokens=excluded
        )
        proxies = feature_analyses.induction_histograms(
            acts[..., features], tokens, features, counted=counted
        )
        bar.update()
        fragments: dict[int, str] = {}
        if used == "saedashboard":
            fragments = saedashboard.feature_fragments(
                backend.model, sae, tokens, features, assets=ASSETS,
                ignore_tokens=excluded, batch_size=batch_size,
            )  # fmt: skip
        title = title or f"{site.hook_name} ({sae.cfg.d_sae} features)"
        with atomic_output(out, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
            if used == "saedashboard":
                saedashboard.write_assets(tmp / ASSETS)
            pages = {}
            for feature_data in data:
                name = f"feature_{feature_data.feature}.html"
                analyses = panels.family_panel(
                    families, feature_data.feature
                ) + panels.feature_logits_panel(logits, feature_data.feature)
                analyses += panels.proxy_panel(proxies[feature_data.feature]) + panels.rdfa_panel(
                    feature_analyses.peak_rdfa(backend, sae, upstream_saes, tokens, feature_data),
                    tokenizer=tokenizer,
                )
                text = _feature_page(
                    feature_data, title, fragments.get(feature_data.feature), analyses,
                    notes=_notes(index_columns, feature_data.feature),
                )  # fmt: skip
                (tmp / name).write_text(text, encoding="utf-8")
                pages[feature_data.feature] = out / name
                bar.update()
            (tmp / "index.html").write_text(
                _index_page(data, title, used, reason or "", index_columns or {}),
                encoding="utf-8",
            )
    return Dashboard(out, out / "index.html", pages, used, reason or "")


def _feature_page(
    data: FeatureData,
    title: str,
    fragment: str | None,
    analyses: str = "",
    notes: Sequence[tuple[str, str]] = (),
) -> str:
    ours = panels.dfa_panel(data) + panels.head_attribution_panel(data) + analyses
    header = panels.nav([("index.html", "all features")]) + (
        f"<h1>Feature {data.feature}</h1><p class='sla-note'>{html.escape(title)}</p>"
    )
    if notes:
        items = "; ".join(
            f"{html.escape(name)}: <b>{html.escape(text)}</b>" for name, text in notes
        )
        header += f"<p id='feature-notes'>{items}</p>"
    if fragment is None:
        body = ours + panels.contexts_panel(data) + panels.histogram_panel(data)
        return panels.page(f"feature {data.feature}", header + body)
    # SAEDashboard's grid (tables, histograms, top contexts) first, then our panels.
    return panels.page(f"feature {data.feature}", header + fragment + ours)


def _notes(columns: Mapping[str, Mapping[int, str]] | None, feature: int) -> list[tuple[str, str]]:
    return [(name, texts[feature]) for name, texts in (columns or {}).items() if feature in texts]


def _index_page(
    data: list[FeatureData],
    title: str,
    engine: str,
    note: str,
    columns: Mapping[str, Mapping[int, str]],
) -> str:
    rows = []
    for d in data:
        top_head = max(range(len(d.head_shares)), key=lambda h: d.head_shares[h])
        peak = d.contexts[0].activation if d.contexts else 0.0
        rows.append(
            f'<tr><td><a href="feature_{d.feature}.html">{d.feature}</a></td>'
            f"<td>{100 * d.density:.3f}</td><td>{peak:.3f}</td>"
            f"<td>{top_head} ({d.head_shares[top_head]:.2f})</td>"
            + "".join(
                f"<td>{html.escape(texts.get(d.feature, ''))}</td>" for texts in columns.values()
            )
            + "</tr>"
        )
    made_by = (
        "SAEDashboard 0.7.2 with sae-lens-attn panels"
        if engine == "saedashboard"
        else ("sae-lens-attn" + (f" ({html.escape(note)})" if note else ""))
    )
    body = (
        f"<h1>{html.escape(title)}</h1><p class='sla-note'>Pages built by {made_by}.</p>"
        "<table class='sla'><tr><th>feature</th><th>active %</th><th>max activation</th>"
        "<th>top head (share)</th>"
        + "".join(f"<th>{html.escape(name)}</th>" for name in columns)
        + f"</tr>{''.join(rows)}</table>"
    )
    return panels.page(title, body)
