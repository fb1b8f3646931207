"""``sae-lens-attn evaluate``: the paper's per-layer table (L0, loss recovered, dead %, ...) for the
SAEs of a release or of SAE folders, on a model and text or tokens."""

from __future__ import annotations

import argparse
import difflib
import html
import json
import math
from pathlib import Path
from typing import Any

from sae_lens_attn.cli.arguments import count
from sae_lens_attn.cli.inputs import load_model, load_sae, load_tokens
from sae_lens_attn.evaluation import Evaluation, evaluate
from sae_lens_attn.outputs import atomic_output, check_output
from sae_lens_attn.site import AttnSite
from sae_lens_attn.viz.plots import html_page, layer_metrics_html, layer_metrics_png

OUTPUT_KIND = "evaluation"
"""Kind of output folder ``evaluate --out`` writes (see ``sae_lens_attn.outputs``)."""
COLUMNS = (
    ("layer", "layer", "{}"),
    ("sae", "SAE", "{}"),
    ("l0", "L0", "{:.2f}"),
    ("loss_recovered_paper", "loss recovered (paper: all positions)", "{:.3f}"),
    ("loss_recovered_saelens", "loss recovered (SAELens: special tokens excluded)", "{:.3f}"),
    ("loss_recovered_mean", "loss recovered (mean ablation, special tokens excluded)", "{:.3f}"),
    ("dead_pct", "dead %", "{:.1f}"),
    ("explained_variance", "expl. var.", "{:.3f}"),
    ("mse", "MSE", "{:.4g}"),
    ("ce_clean", "CE clean", "{:.4f}"),
    ("ce_sae", "CE SAE", "{:.4f}"),
    ("ce_zero_ablation", "CE zero", "{:.4f}"),
    ("ce_mean_ablation", "CE mean", "{:.4f}"),
    ("delta_ce", "ΔCE", "{:+.4f}"),
    ("kl", "KL", "{:.4f}"),
)
"""Table columns: key in a row, header, format."""

TABLE_NOTE = (
    "Loss recovered = (CE_zero − CE_SAE) / (CE_zero − CE_clean), z zero-ablated at every position. "
    "paper: the SAE spliced at every position and every prediction counted, BOS included, as in "
    "Kissane et al.; SAELens: the SAE spliced and predictions counted only at positions that are "
    "not special tokens (BOS, EOS, padding), as SAELens's run_evals (ce_loss_score). "
    "The CE, ΔCE and KL columns count the SAELens positions."
)
"""Printed under the table: what the loss-recovered columns measure."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="evaluate the SAEs of a release (or SAE folders): L0, loss recovered, dead %%, ...",
        description="Evaluate attention SAEs on a model and text or tokens, and print the "
        "per-layer table (Markdown). With --out, also write evaluation.json and per-layer plots.",
    )
    parser.add_argument("--model", default="default", help="'default', 'hf:DIR' or 'tl:NAME'")
    saes = parser.add_mutually_exclusive_group(required=True)
    saes.add_argument("--release", help="a release in SAELens's pretrained directory")
    saes.add_argument("--sae", nargs="+", metavar="SAE", help="SAE folders or RELEASE:ID")
    parser.add_argument("--text", help="text file, cut into BOS-led contexts")
    parser.add_argument("--tokens", help="a .pt file holding [prompts, ctx] token ids")
    parser.add_argument("--context-size", type=count(), default=128, help="tokens per context")
    parser.add_argument("--max-prompts", type=count(), default=64, help="contexts to use at most")
    parser.add_argument("--batch-size", type=count(), default=8, help="contexts per forward pass")
    parser.add_argument("--out", help="folder for evaluation.json and per_layer.png/.html")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --out an earlier evaluate wrote"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output(out, kind=OUTPUT_KIND, overwrite=args.overwrite)
    specs = release_specs(args.release) if args.release else list(args.sae)
    model, tokenizer = load_model(args.model)
    tokens = load_tokens(
        text=args.text, tokens=args.tokens, tokenizer=tokenizer,
        context_size=args.context_size, max_prompts=args.max_prompts,
    )  # fmt: skip
    rows = []
    for spec in specs:
        sae = load_sae(spec)
        result = evaluate(
            model, sae, tokens, tokenizer=tokenizer, context_size=args.context_size,
            batch_size=args.batch_size,
        )  # fmt: skip
        rows.append(table_row(spec, sae, result))
    rows.sort(key=lambda row: row["layer"])
    print(markdown_table(rows))
    print(f"\n{TABLE_NOTE}")
    if out is not None:
        _write(rows, out, title=args.release or "SAEs", overwrite=args.overwrite)
        print(f"wrote evaluation.json, per_layer.png, per_layer.html to {out}")
    return 0


def release_specs(release: str) -> list[str]:
    """``RELEASE:ID`` of every SAE of a release in SAELens's pretrained directory (one id each).

    Raises:
        ValueError: no such release (the message suggests close names).
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        raise ValueError(
            f"no release {release!r} in SAELens's pretrained directory"
            + (f"; close names: {close}" if close else "")
        )
    first_id_per_path = {}  # releases may list one SAE under several ids
    for sae_id, path in directory[release].saes_map.items():
        first_id_per_path.setdefault(path, sae_id)
    return [f"{release}:{sae_id}" for sae_id in first_id_per_path.values()]


def table_row(spec: str, sae: Any, result: Evaluation) -> dict[str, Any]:
    """One row of the table: the evaluation plus layer, SAE name and dead %."""
    return {
        "layer": AttnSite.layer_of(result.hook_name),
        "sae": spec,
        **result.as_dict(),
        "dead_pct": 100.0 * result.dead_fraction,
        "d_sae": sae.cfg.d_sae,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table with ``COLUMNS``."""
    lines = [
        "| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [_cell(fmt, row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an HTML table with ``COLUMNS``."""
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_cell(fmt, row[key]))}</td>" for key, _, fmt in COLUMNS)
        + "</tr>"
        for row in rows
    )
    return f'<table border="1" cellpadding="4"><tr>{head}</tr>{body}</table>'


def _cell(fmt: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return fmt.format(value)


def _write(rows: list[dict[str, Any]], out: Path, *, title: str, overwrite: bool) -> None:
    with atomic_output(out, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
        (tmp / "evaluation.json").write_text(json.dumps(rows, indent=1))
        layer_metrics_png(rows, tmp / "per_layer.png", title=title)
        (tmp / "per_layer.html").write_text(
            html_page(
                title,
                [html_table(rows), f"<p>{html.escape(TABLE_NOTE)}</p>", layer_metrics_html(rows)],
            )
        )
