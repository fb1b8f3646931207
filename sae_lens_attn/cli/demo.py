"""``sae-lens-attn demo``: the main job, offline, on the embedded default model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sae_lens_attn.cli.arguments import count
from sae_lens_attn.demo import DemoOptions, run_demo


def add_parser(commands: Any) -> None:
    defaults = DemoOptions(out=Path("sae-lens-attn-demo"))
    parser = commands.add_parser(
        "demo",
        help="train, evaluate and analyse an attention SAE on the embedded default model, offline",
        description="On the embedded default model (a 2-layer attention-only model trained on the "
        "Python standard library): train a fresh attention SAE on one layer (short run), evaluate "
        "it beside the shipped one on held-out files, run the built-in analyzers, find induction "
        "features, and write dashboards, plots and a one-page summary (HTML and Markdown).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=defaults.out,
        help=f"output folder (default: ./{defaults.out}); replaced only if an earlier demo wrote it",
    )
    parser.add_argument(
        "--layer",
        type=count(minimum=0),
        default=defaults.layer,
        help=f"layer to train, evaluate and analyse (default: {defaults.layer})",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=defaults.corpus_root,
        help="folder of .py files to train and evaluate on (default: the Python standard library)",
    )
    parser.add_argument(
        "--train-tokens",
        type=count(),
        default=defaults.train_tokens,
        help=f"tokens the fresh SAE trains on (default: {defaults.train_tokens})",
    )
    parser.add_argument(
        "--eval-contexts",
        type=count(),
        default=defaults.eval_contexts,
        help=f"held-out contexts to evaluate and analyse on (default: {defaults.eval_contexts})",
    )
    parser.add_argument(
        "--features",
        type=count(),
        default=defaults.features,
        help="features in the dashboards: half induction features, half those of largest max "
        f"activation (default: {defaults.features})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"seed of training and sampling (default: {defaults.seed})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = run_demo(
        DemoOptions(
            out=args.out,
            layer=args.layer,
            corpus_root=args.corpus,
            train_tokens=args.train_tokens,
            eval_contexts=args.eval_contexts,
            features=args.features,
            seed=args.seed,
            progress=not args.no_progress,
        )
    )
    print(
        f"demo finished in {result.seconds:.0f} s; {len(result.induction_features)} induction features"
    )
    print(f"summary: {result.summary_html}")
    print(f"         {result.summary_md}")
    print(f"everything else: {result.out}")
    return 0
