"""``sae-lens-attn analyze``: run named analyzers on a model, an SAE and text; write tables and plots."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_lens_attn.analysis import AnalysisInput, dfa_at_peaks, get, head_attribution, names
from sae_lens_attn.analysis.registry import Table
from sae_lens_attn.backends import backend_for
from sae_lens_attn.cli.inputs import load_model, load_sae, load_tokens
from sae_lens_attn.outputs import staging_dir
from sae_lens_attn.viz.plots import dfa_tokens_html, head_attribution_heatmap, html_page


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "analyze",
        help="run named analyzers on a model, an SAE and text; write tables and plots",
        description="Run analyzers (see --list) and write their tables (CSV or JSON) and plots "
        "(head-attribution heatmap PNG, DFA-highlighted tokens HTML) into --out.",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the registered analyzers and exit"
    )
    parser.add_argument(
        "--model",
        default="default",
        help="'default', 'hf:NAME_OR_DIR' or 'tl:NAME' (default: default)",
    )
    parser.add_argument("--sae", help="SAE folder (SAELens format) or RELEASE:ID")
    parser.add_argument("--text", help="text file, cut into BOS-led contexts")
    parser.add_argument("--tokens", help="a .pt file holding [prompts, ctx] token ids")
    parser.add_argument(
        "--analyzers",
        default="head_attribution,dfa",
        help="comma-separated names (default: head_attribution,dfa)",
    )
    parser.add_argument(
        "--features", help="comma-separated feature indices (default: the most active)"
    )
    parser.add_argument(
        "--top",
        type=int,
        default=8,
        help="features to analyze when --features is not given (default: 8)",
    )
    parser.add_argument(
        "--context-size", type=int, default=128, help="tokens per context for --text (default: 128)"
    )
    parser.add_argument(
        "--max-prompts", type=int, default=64, help="contexts to use at most (default: 64)"
    )
    parser.add_argument(
        "--format", choices=["csv", "json"], default="csv", help="table format (default: csv)"
    )
    parser.add_argument(
        "--out", help="output folder (must not exist or be empty, unless --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in names():
            print(f"{name:<20} {get(name).description}")
        return 0
    if not args.sae or not args.out:
        raise SystemExit("analyze: --sae and --out are required (or --list)")
    wanted = [name.strip() for name in args.analyzers.split(",") if name.strip()]
    analyzers = {
        name: get(name) for name in wanted
    }  # unknown names fail here, listing the valid ones
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"analyze: {out} is not empty; pass --overwrite to replace it")

    model, tokenizer = load_model(args.model)
    sae = load_sae(args.sae)
    tokens = load_tokens(
        text=args.text,
        tokens=args.tokens,
        tokenizer=tokenizer,
        context_size=args.context_size,
        max_prompts=args.max_prompts,
    )
    options: dict[str, Any] = {"top": args.top}
    if getattr(tokenizer, "bos_token_id", None) is not None:
        options["bos_token_id"] = tokenizer.bos_token_id
    if args.features:
        options["features"] = [int(f) for f in args.features.split(",")]
    inputs = AnalysisInput(backend_for(model), sae, tokens, tokenizer=tokenizer, options=options)

    tmp = staging_dir(out)
    try:
        for analyzer in tqdm(analyzers.values(), desc="analyzers", unit="analyzer"):
            for table_name, table in analyzer(inputs).items():
                _write_table(table, tmp / f"{table_name}.{args.format}")
        _plots(inputs, tmp, options)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def _write_table(table: Table, path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(table, indent=1, default=float))
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else [])
        writer.writeheader()
        writer.writerows(table)


def _plots(inputs: AnalysisInput, folder: Path, options: dict[str, Any]) -> None:
    from sae_lens_attn.analysis.builtin import top_features

    features = options.get("features") or top_features(inputs, options["top"])
    shares = head_attribution(inputs.sae, inputs.model)[features]
    head_attribution_heatmap(shares, features, folder / "head_attribution.png")
    peak = dfa_at_peaks(inputs.model, inputs.sae, inputs.tokens, features=features)
    sections = []
    for column, feature in enumerate(features):
        prompt = int(peak.pre_act[:, column].argmax())
        query = int(peak.positions[prompt, column])
        text = [_decode(inputs.tokenizer, t) for t in inputs.tokens[prompt, : query + 1].tolist()]
        sections.append(
            dfa_tokens_html(
                text,
                peak.by_src[prompt, : query + 1, column],
                query,
                title=f"feature {feature}: pre-activation {float(peak.pre_act[prompt, column]):.3f} "
                f"at prompt {prompt}, position {query}",
            )
        )
    (folder / "dfa.html").write_text(html_page("DFA over source tokens", sections))


def _decode(tokenizer: Any, token: int) -> str:
    return str(token) if tokenizer is None else tokenizer.decode([token])
