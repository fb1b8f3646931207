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
from sae_lens_attn.default_model import RELEASE_NAME, corpus, load_default_model
from sae_lens_attn.evaluation import evaluate
from sae_lens_attn.outputs import atomic_output
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.training.train import train_attn_saes
from sae_lens_attn.viz.dashboard.build import build_dashboard
from sae_lens_attn.viz.plots import head_attribution_heatmap, layer_metrics_png

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
    """Features shown in the dashboards (induction features first)."""
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
    shipped = SAE.from_pretrained(RELEASE_NAME, f"blocks.{options.layer}")
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
        **arch_kwargs,
    )
    fresh = SAE.load_from_disk(saved[options.layer])
    steps.update()

    step("evaluating fresh and shipped SAEs")
    evaluations = {
        name: dict(evaluate(model, sae, eval_tokens, progress=False).items())
        for name, sae in (("fresh", fresh), ("shipped", shipped))
    }
    per_layer = [
        {
            "layer": layer,
            **evaluate(
                model,
                SAE.from_pretrained(RELEASE_NAME, f"blocks.{layer}"),
                eval_tokens,
                progress=False,
            ),
        }
        for layer in range(model.cfg.n_layers)
    ]
    _write_rows(
        folder / "evaluation.csv",
        [{"sae": name, **metrics} for name, metrics in evaluations.items()],
    )
    _write_rows(folder / "evaluation_per_layer.csv", per_layer)
    (folder / "plots").mkdir()
    layer_metrics_png(
        per_layer, folder / "plots" / "layers.png", title=f"{RELEASE_NAME} on held-out files"
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
    report = induction_features(model, shipped, eval_tokens, head_score=INDUCTION_HEAD_SCORE)
    _write_rows(analysis / "induction_features.csv", [row.__dict__ for row in report.rows])
    found = [row.feature for row in sorted(report.induction_features, key=lambda r: -r.pass_rate)]
    steps.update()

    step("writing dashboards and plots")
    shown = (found + [f for f in _most_active(model, shipped, eval_tokens) if f not in found])[
        : options.features
    ]
    dashboard = build_dashboard(
        model,
        shipped,
        eval_tokens,
        folder / "dashboard",
        features=shown,
        tokenizer=tokenizer,
        progress=False,
        title=f"{RELEASE_NAME} blocks.{options.layer}",
    )
    head_attribution_heatmap(
        head_attribution(shipped)[shown],
        shown,
        folder / "plots" / "head_attribution.png",
        title=f"layer {options.layer}: head attribution",
    )
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
    )
    _write_summary(result, options, report, dashboard.index.relative_to(folder), eval_tokens.shape)
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


def _most_active(model: Any, sae: Any, tokens: torch.Tensor) -> list[int]:
    from sae_lens_attn.analysis.builtin import top_features

    return top_features(AnalysisInput(model, sae, tokens), 64)


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _write_summary(
    result: DemoResult, options: DemoOptions, report: Any, dashboard: Path, shape: Any
) -> None:
    heads = ", ".join(f"H{h} {s:.2f}" for h, s in enumerate(report.head_scores))
    lines = [
        "# sae-lens-attn demo",
        "",
        f"Embedded default model, layer {options.layer}; {shape[0]} held-out contexts of {shape[1]} tokens; "
        f"{result.seconds:.0f} s.",
        "",
        "## Evaluation (held-out files)",
        "",
        "| SAE | " + " | ".join(SUMMARY_METRICS) + " |",
        "|---|" + "---|" * len(SUMMARY_METRICS),
        *(
            f"| {name} | " + " | ".join(f"{metrics[key]:.4g}" for key in SUMMARY_METRICS) + " |"
            for name, metrics in result.evaluation.items()
        ),
        "",
        "## Induction",
        "",
        f"Induction scores of layer {options.layer}'s heads: {heads}; induction heads "
        f"(score ≥ {INDUCTION_HEAD_SCORE}): {list(report.induction_heads)}.",
        f"Induction features of the shipped SAE: {len(result.induction_features)} "
        f"({', '.join(map(str, result.induction_features[:20]))}); "
        f"negative-control pass rate {result.control_pass_rate:.2f}.",
        "",
        "## Plots",
        "",
        "![per layer](plots/layers.png)",
        "![head attribution](plots/head_attribution.png)",
        "",
        "## Files",
        "",
        f"- [dashboard]({dashboard.as_posix()}) — feature pages with DFA and head attribution",
        "- [evaluation.csv](evaluation.csv) — fresh and shipped SAE on held-out contexts",
        "- [evaluation_per_layer.csv](evaluation_per_layer.csv) — the shipped SAEs per layer",
        "- [analysis/](analysis/) — analyzer tables (DFA, head attribution, induction)",
        "- [fresh_sae/](fresh_sae/) — the SAE trained here, SAELens format",
    ]
    result.summary_md.write_text("\n".join(lines) + "\n")
    result.summary_html.write_text(_markdown_page(lines))


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
            switch("table")
            cells = [c.strip() for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
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
        "td{border:1px solid #ddd;padding:2px 8px}</style></head><body>"
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
    )
