"""The main job, end to end and offline, on the embedded default model.

Trains a fresh attention SAE on one layer (short run), evaluates it beside the shipped one on
held-out files, runs the built-in analyzers, finds induction features, and writes dashboards,
plots and a one-page summary (HTML and Markdown) into one folder.
"""

from __future__ import annotations

import csv
import html
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from sae_lens_attn.analysis import AnalysisInput, get, head_attribution, induction_features
from sae_lens_attn.analysis.analyzers.causal import repeat_positions
from sae_lens_attn.analysis.analyzers.repeats import induction_ablation
from sae_lens_attn.default_model import RELEASE_NAME, corpus, load_default_model
from sae_lens_attn.default_model.metrics import read_metrics
from sae_lens_attn.evaluation import evaluate
from sae_lens_attn.outputs import atomic_output
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.training.train import train_attn_saes
from sae_lens_attn.viz.causal_plots import induction_ablation_png
from sae_lens_attn.viz.dashboard.build import build_dashboard
from sae_lens_attn.viz.plots import (
    feature_density_png,
    head_attribution_heatmap,
    layer_metrics_png,
)

INDUCTION_HEAD_SCORE = 0.75
"""Induction score that makes a head an induction head here. All four layer-1 heads of the
default model score above 0.6 on repeated random tokens; the two above 0.75 are also the two
strongest on repeated real code, and the others leave room for a negative control."""
OUTPUT_KIND = "demo"
"""Kind of output folder the demo writes; a later demo replaces only a folder of this kind."""
SUMMARY_METRICS = (
    "l0",
    "loss_recovered_zero",
    "loss_recovered_mean",
    "dead_fraction",
    "explained_variance",
    "delta_ce",
    "kl",
)
METRIC_DEFINITIONS = {
    "l0": (
        "mean number of features active per token (for a TopK SAE k by construction: it only "
        "checks that the SAE ran as configured)",
        "lower is sparser",
    ),
    "loss_recovered_zero": (
        "(CE_zero − CE_sae) / (CE_zero − CE_clean): the share of the loss that zeroing the "
        "layer's attention output costs which splicing in the reconstruction wins back",
        "higher is better, 1 = the clean model",
    ),
    "loss_recovered_mean": (
        "the same with the mean attention output as the baseline, a stricter baseline than zero",
        "higher is better, 1 = the clean model",
    ),
    "dead_fraction": ("share of features never active on the held-out tokens", "lower is better"),
    "explained_variance": (
        "1 − MSE / Var(z): share of the variance of the attention output z the reconstruction "
        "explains",
        "higher is better, 1 = exact",
    ),
    "delta_ce": (
        "CE_sae − CE_clean: next-token cross-entropy added by the reconstruction (nats per token)",
        "lower is better, 0 = no loss",
    ),
    "kl": (
        "mean KL(clean ‖ with SAE) of the next-token distributions (nats)",
        "lower is better, 0 = unchanged predictions",
    ),
    "induction score": (
        "attention a head pays from a token to the token after its previous occurrence, on "
        "repeated random tokens",
        "higher is more induction-like",
    ),
    "pass rate": (
        "share of a feature's firing contexts whose top DFA source token follows an earlier copy "
        "of the current token",
        "higher is more induction-like",
    ),
    "negative-control pass rate": (
        "the pass rate over the control features (little head attribution to induction heads)",
        "low means the behaviour test is selective",
    ),
}
"""What each figure of the summary measures, and which direction is better."""
SHOWN_BECAUSE, VERDICT = "shown because", "induction verdict"
"""Columns the demo adds to the dashboard's index."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs on and how long it trains."""

    out: Path
    """Folder to write (replaced only if an earlier demo wrote it)."""
    layer: int = 1
    """Layer whose attention SAE is trained, evaluated and analysed."""
    corpus_root: Path = field(default_factory=lambda: Path(sysconfig.get_paths()["stdlib"]))
    """Folder of source files; its held-out files are never trained on."""
    train_tokens: int = 300_000
    """Tokens the fresh SAE trains on."""
    eval_contexts: int = 64
    """Held-out contexts for evaluation, analysis and dashboards."""
    features: int = 12
    """Features shown in the dashboards: half of them induction features (by pass rate), the
    rest those of largest max activation, whatever their verdict (``_shown``)."""
    seed: int = 0
    """Seed of training and sampling."""
    progress: bool = True
    """Show progress bars."""


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote things, and the figures on its summary."""

    out: Path
    """The output folder."""
    summary_html: Path
    """One-page summary (HTML)."""
    summary_md: Path
    """One-page summary (Markdown)."""
    evaluation: dict[str, dict[str, float]]
    """``fresh`` / ``shipped`` → evaluation metrics on held-out contexts."""
    induction_features: list[int]
    """Features of the shipped SAE judged induction features."""
    control_pass_rate: float
    """Behaviour pass rate of the negative-control features."""
    seconds: float
    """Wall time of the whole demo."""
    induction_ablation: dict[str, float] = field(default_factory=dict)
    """Set (``induction``, ``control``, ``matched``, ``error term``) → change of the induced
    token's logit when it is zero-ablated at once at the second occurrence of repeated spans
    (``analysis.analyzers.repeats.induction_ablation``); empty without repeated spans."""


def run_demo(options: DemoOptions) -> DemoResult:
    """Run the demo into ``options.out``; see the module docstring.

    Raises:
        FileExistsError: ``out`` is a non-empty folder that an earlier demo did not write
            (``sae_lens_attn.outputs.check_output``).
    """
    start = time.perf_counter()
    out = options.out
    with atomic_output(out, kind=OUTPUT_KIND, overwrite=True) as tmp:
        result = _run(options, tmp, start)
    return _moved(result, tmp, out)


def _run(options: DemoOptions, folder: Path, start: float) -> DemoResult:
    steps = tqdm(total=6, desc="demo", unit="step", disable=not options.progress)

    def step(name: str) -> None:
        steps.set_postfix_str(name)

    step("loading the default model and the corpus")
    torch.manual_seed(options.seed)
    model, tokenizer = load_default_model()
    context = model.cfg.n_ctx
    split = corpus.split_corpus(options.corpus_root)
    rng = torch.Generator().manual_seed(options.seed)
    train_texts = _sample_texts(split.train, tokenizer, options.train_tokens // 2, rng)
    train = TokenBatches.from_texts(tokenizer, train_texts, context_size=context, batch_size=32)
    eval_texts = _sample_texts(split.held_out, tokenizer, 2 * options.eval_contexts * context, rng)
    held_out = TokenBatches.from_texts(tokenizer, eval_texts, context_size=context, batch_size=8)
    eval_tokens = held_out.tokens[: options.eval_contexts]
    layer_saes = [
        SAE.from_pretrained(RELEASE_NAME, f"blocks.{layer}") for layer in range(model.cfg.n_layers)
    ]
    shipped = layer_saes[options.layer]
    steps.update()

    step("training a fresh SAE")
    arch = shipped.cfg.architecture()
    arch_kwargs: dict[str, Any] = {"k": int(shipped.cfg.k)} if arch == "topk" else {}
    saved = train_attn_saes(
        model,
        [options.layer],
        train,
        training_tokens=options.train_tokens,
        out_dir=folder / "fresh_sae",
        architecture="topk" if arch == "topk" else "standard",
        model_name=shipped.cfg.metadata.model_name,
        train_batch_size_tokens=2048,
        buffer_size_tokens=16384,
        lr=2e-3,
        d_sae=shipped.cfg.d_sae,
        exclude_special_tokens=[int(cast(int, tokenizer.bos_token_id))],
        seed=options.seed,
        progress=options.progress,
        **arch_kwargs,
    )
    fresh = SAE.load_from_disk(saved[options.layer])
    steps.update()

    step("evaluating fresh and shipped SAEs")
    layer_evaluations = [evaluate(model, sae, eval_tokens, progress=False) for sae in layer_saes]
    evaluations = {
        "fresh": dict(evaluate(model, fresh, eval_tokens, progress=False).items()),
        "shipped": dict(layer_evaluations[options.layer].items()),
    }
    per_layer = [
        {"layer": layer, **evaluation} for layer, evaluation in enumerate(layer_evaluations)
    ]
    _write_rows(
        folder / "evaluation.csv",
        [{"sae": name, **metrics} for name, metrics in evaluations.items()],
    )
    _write_rows(folder / "evaluation_per_layer.csv", per_layer)
    (folder / "plots").mkdir()
    layer_metrics_png(
        per_layer,
        folder / "plots" / "layers.png",
        title=f"{RELEASE_NAME} on held-out files",
        show_l0=any(sae.cfg.architecture() != "topk" for sae in layer_saes),
    )
    feature_density_png(
        {f"layer {i}": e.feature_density for i, e in enumerate(layer_evaluations)},
        folder / "plots" / "feature_density.png",
        title=f"{RELEASE_NAME}: how often each feature fires on held-out files",
    )
    steps.update()

    step("running the analyzers")
    analysis = folder / "analysis"
    analysis.mkdir()
    inputs = AnalysisInput(
        model, shipped, eval_tokens, tokenizer=tokenizer, options={"top": options.features}
    )
    for name in ("head_attribution", "dfa", "induction_scores"):
        for table, rows in get(name)(inputs).items():
            _write_rows(analysis / f"{table}.csv", rows)
    shared = inputs.corpus  # one capture and one encode for analyzers, heuristics and dashboard
    report = induction_features(model, shipped, shared, head_score=INDUCTION_HEAD_SCORE)
    _write_rows(analysis / "induction_features.csv", [row.__dict__ for row in report.rows])
    found = [row.feature for row in sorted(report.induction_features, key=lambda r: -r.pass_rate)]
    causal: list[dict[str, Any]] = []
    if repeat_positions(shared).any():  # the causal check: one pass per ablated set
        verdicts = {row.feature: row.verdict for row in report.rows}
        causal, _ = induction_ablation(model, shipped, shared, verdicts)
        _write_rows(analysis / "induction_ablation.csv", causal)
    steps.update()

    step("writing dashboards and plots")
    by_max = shared.top_features(shipped, 64)
    reasons = _shown(found, by_max, options.features)
    shown = list(reasons)
    dashboard = build_dashboard(
        model,
        shipped,
        shared,
        folder / "dashboard",
        features=shown,
        tokenizer=tokenizer,
        progress=False,
        title=f"{RELEASE_NAME} blocks.{options.layer}",
        index_columns={SHOWN_BECAUSE: reasons, VERDICT: _verdicts(shown, report)},
        upstream_saes=layer_saes[: options.layer],  # for the recursive-DFA panel
    )
    head_attribution_heatmap(
        head_attribution(shipped)[shown],
        shown,
        folder / "plots" / "head_attribution.png",
        title=f"layer {options.layer}: head attribution",
    )
    if causal:
        induction_ablation_png(causal, folder / "plots" / "induction_ablation.png")
    steps.update()

    step("writing the summary")
    seconds = time.perf_counter() - start
    result = DemoResult(
        out=folder,
        summary_html=folder / "summary.html",
        summary_md=folder / "summary.md",
        evaluation=evaluations,
        induction_features=found,
        control_pass_rate=report.control_pass_rate(),
        seconds=seconds,
        induction_ablation={str(row["set"]): row["delta_logit"] for row in causal},
    )
    _write_summary(
        result,
        options,
        report,
        dashboard.index.relative_to(folder),
        eval_tokens.shape,
        _configuration(layer_saes, fresh, options.train_tokens),
        causal,
    )
    steps.update()
    steps.close()
    return result


def _sample_texts(
    paths: Sequence[Path], tokenizer: Any, n_tokens: int, rng: torch.Generator
) -> list[str]:
    """Files in a seeded random order until they hold about ``n_tokens`` tokens.

    The store cycles over its token source, so training on fewer distinct tokens than it
    consumes repeats them; a demo needs variety, not the whole corpus.
    """
    texts, total = [], 0
    for index in torch.randperm(len(paths), generator=rng).tolist():
        text = "".join(corpus.read_texts([paths[index]]))
        if not text:
            continue
        texts.append(text)
        total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if total >= n_tokens:
            break
    return texts


def _shown(found: Sequence[int], by_max: Sequence[int], n: int) -> dict[int, str]:
    """``n`` features, each with why it is shown: the best ``ceil(n / 2)`` induction features,
    then the features of largest max activation not shown yet (so the dashboard also shows what
    the SAE does besides induction), then further induction features if those run out."""
    shown = {
        f: f"induction feature #{rank} of {len(found)} by pass rate"
        for rank, f in enumerate(found[: (n + 1) // 2], 1)
    }
    for rank, f in enumerate(by_max, 1):
        if len(shown) < n and f not in shown:
            shown[f] = f"top by max activation (#{rank})"
    for rank, f in enumerate(found, 1):
        if len(shown) < n and f not in shown:
            shown[f] = f"induction feature #{rank} of {len(found)} by pass rate"
    return shown


def _verdicts(features: Sequence[int], report: Any) -> dict[int, str]:
    """The induction analyzer's verdict on each feature (a feature without a row never fired and
    is in the control: ``induction_features``)."""
    rows = {row.feature: row.verdict for row in report.rows}
    return {f: rows.get(f, "control") for f in features}


def _configuration(shipped: Sequence[Any], fresh: Any, fresh_tokens: int) -> list[str]:
    """Markdown table of the SAEs' configuration, read from their cfg and the release's
    metadata (``metrics.json``: training tokens)."""
    training = read_metrics().get("training", {})
    shipped_tokens = training.get("sae_tokens") if isinstance(training, dict) else None

    def row(name: str, sae: Any, tokens: Any) -> str:
        cfg = sae.cfg
        k = getattr(cfg, "k", None)
        return (
            f"| {name} | {cfg.architecture()} ({cfg.metadata.training_architecture}) | "
            f"{cfg.d_in} | {cfg.d_sae} ({cfg.d_sae / cfg.d_in:g}× d_in) | "
            f"{'—' if k is None else k} | "
            f"{'not recorded' if tokens is None else f'{int(tokens):,}'} |"
        )

    return [
        "| SAE | architecture | d_in | d_sae | k | training tokens |",
        "|---|---|---|---|---|---|",
        *(row(f"shipped {sae.cfg.metadata.hook_name}", sae, shipped_tokens) for sae in shipped),
        row(f"fresh {fresh.cfg.metadata.hook_name}", fresh, fresh_tokens),
    ]


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _write_summary(
    result: DemoResult,
    options: DemoOptions,
    report: Any,
    dashboard: Path,
    shape: Any,
    configuration: Sequence[str],
    causal: Sequence[dict[str, Any]] = (),
) -> None:
    heads = ", ".join(f"H{h} {s:.2f}" for h, s in enumerate(report.head_scores))
    names = list(result.evaluation)
    thresholds = report.thresholds
    lines = [
        "# sae-lens-attn demo",
        "",
        f"Embedded default model, layer {options.layer}; {shape[0]} held-out contexts of "
        f"{shape[1]} tokens; {result.seconds:.0f} s.",
        "",
        "## SAE configuration",
        "",
        *configuration,
        "",
        "## Evaluation (held-out files)",
        "",
        "| metric | " + " | ".join(names) + " | better |",
        "|---|" + "---|" * (len(names) + 1),
        *(
            f"| {key} | "
            + " | ".join(f"{result.evaluation[name][key]:.4g}" for name in names)
            + f" | {METRIC_DEFINITIONS[key][1]} |"
            for key in SUMMARY_METRICS
        ),
        "",
        "## Induction",
        "",
        f"Induction scores of layer {options.layer}'s heads: {heads}; induction heads "
        f"(score ≥ {INDUCTION_HEAD_SCORE}): {list(report.induction_heads)}.",
        f"Induction features of the shipped SAE: {len(result.induction_features)} "
        f"({', '.join(map(str, result.induction_features[:20]))}): at least "
        f"{thresholds['selection_share']:.0%} of the decoder norm in the induction heads and a "
        f"pass rate of at least {thresholds['pass_rate']:.0%}; negative-control pass rate "
        f"{result.control_pass_rate:.2f} (features under {thresholds['control_share']:.0%} in "
        "the induction heads).",
        "",
        *_causal_lines(causal),
        "## What the figures mean",
        "",
        *(f"- {name}: {what}; {better}." for name, (what, better) in METRIC_DEFINITIONS.items()),
        "",
        "## Plots",
        "",
        "![loss recovered per layer](plots/layers.png)",
        "![feature density per layer](plots/feature_density.png)",
        "![head attribution of the dashboard's features](plots/head_attribution.png)",
        *(
            ["![zero-ablating feature sets at repeated spans](plots/induction_ablation.png)"]
            if causal
            else []
        ),
        "",
        "## Files",
        "",
        f"- [dashboard]({dashboard.as_posix()}) — feature pages with DFA and head attribution: "
        "the induction features by pass rate, then the features of largest max activation; the "
        "index gives each one's reason and induction verdict",
        "- [evaluation.csv](evaluation.csv) — fresh and shipped SAE on held-out contexts",
        "- [evaluation_per_layer.csv](evaluation_per_layer.csv) — the shipped SAEs per layer",
        "- [analysis/](analysis/) — analyzer tables (DFA, head attribution, induction, "
        "induction ablation)",
        "- [fresh_sae/](fresh_sae/) — the SAE trained here, SAELens format",
    ]
    result.summary_md.write_text("\n".join(lines) + "\n")
    result.summary_html.write_text(_markdown_page(lines))


def _causal_lines(causal: Sequence[dict[str, Any]]) -> list[str]:
    """The summary's causal check: what ablating each set does to the induced token's logit."""
    if not causal:
        return [
            "## Causal check",
            "",
            "No held-out context repeats a span, so no feature was ablated at one.",
            "",
        ]
    by_set = {str(row["set"]): row for row in causal}
    first = causal[0]

    def effect(name: str) -> str:
        row = by_set[name]
        if row["delta_logit"] is None:
            return f"{name}: no features"
        size = "" if row["activation"] is None else f"{row['features']} features, "
        return (
            f"{name} ({size}logit {row['delta_logit']:+.3f}, log-probability "
            f"{row['delta_logprob']:+.3f}, lower in {row['contexts_lower']:.0%} of contexts)"
        )

    return [
        "## Causal check",
        "",
        f"Zero-ablating each set of layer-1 features at once, with the error term kept, at the "
        f"second occurrence of repeated spans ({first['positions']} positions in "
        f"{first['contexts']} held-out contexts; clean logit of the induced token "
        f"{first['clean']:.2f}): " + "; ".join(effect(name) for name in by_set) + ". The "
        "matched set is the most active other features with the induction set's summed "
        "activation there.",
        "",
    ]


def _markdown_page(lines: Sequence[str]) -> str:
    """The summary's Markdown (headings, paragraphs, one table, link lists) as HTML."""
    body: list[str] = []
    open_tag = ""

    def switch(tag: str) -> None:
        nonlocal open_tag
        if open_tag != tag:
            if open_tag:
                body.append(f"</{open_tag}>")
            if tag:
                body.append(f"<{tag}>")
            open_tag = tag

    for line in lines:
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            cell = "th" if open_tag != "table" else "td"  # a table's first row is its header
            switch("table")
            cells = [c.strip() for c in line.strip("|").split("|")]
            body.append(
                "<tr>" + "".join(f"<{cell}>{html.escape(c)}</{cell}>" for c in cells) + "</tr>"
            )
        elif line.startswith("!["):
            switch("")
            alt, target = line[2:].rstrip(")").split("](", 1)
            body.append(
                f'<img src="{html.escape(target)}" alt="{html.escape(alt)}" style="max-width:100%">'
            )
        elif line.startswith("- ["):
            switch("ul")
            label, rest = line[3:].split("](", 1)
            target, rest = rest.split(")", 1)
            link = f'<a href="{html.escape(target)}">{html.escape(label)}</a>'
            body.append(f"<li>{link}{html.escape(rest)}</li>")
        elif line.startswith("- "):
            switch("ul")
            body.append(f"<li>{html.escape(line[2:])}</li>")
        else:
            switch("")
            if line.startswith("# "):
                body.append(f"<h1>{html.escape(line[2:])}</h1>")
            elif line.startswith("## "):
                body.append(f"<h2>{html.escape(line[3:])}</h2>")
            elif line:
                body.append(f"<p>{html.escape(line)}</p>")
    switch("")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sae-lens-attn demo</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px}"
        "td,th,p,li{overflow-wrap:anywhere}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def _moved(result: DemoResult, old: Path, new: Path) -> DemoResult:
    def move(path: Path) -> Path:
        return new / path.relative_to(old)

    return DemoResult(
        out=new,
        summary_html=move(result.summary_html),
        summary_md=move(result.summary_md),
        evaluation=result.evaluation,
        induction_features=result.induction_features,
        control_pass_rate=result.control_pass_rate,
        seconds=result.seconds,
        induction_ablation=result.induction_ablation,
    )
