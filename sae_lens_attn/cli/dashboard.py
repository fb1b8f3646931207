"""``sae-lens-attn dashboard``: feature dashboards (DFA, head attribution) that open from disk."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sae_lens_attn.cli.inputs import load_model, load_sae, load_tokens
from sae_lens_attn.viz.dashboard import ENGINES, build_dashboard


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "dashboard",
        help="write HTML feature dashboards with DFA and head-attribution panels",
        description="Write one HTML page per feature (top contexts, activation histogram, DFA, "
        "head attribution) and an index into --out. On TransformerLens models the pages are "
        "SAEDashboard's with our panels added; elsewhere they are ours. They open from disk.",
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--model", default="default", help="'default', 'hf:DIR' or 'tl:NAME'")
    parser.add_argument("--sae", required=True, help="SAE folder (SAELens format) or RELEASE:ID")
    parser.add_argument("--text", help="text file, cut into BOS-led contexts")
    parser.add_argument("--tokens", help="a .pt file holding [prompts, ctx] token ids")
    parser.add_argument("--features", help="comma-separated feature indices")
    parser.add_argument(
        "--top", type=int, default=8, help="most active features without --features"
    )
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="(default: auto)")
    parser.add_argument("--contexts", type=int, default=8, help="top contexts per feature")
    parser.add_argument("--context-size", type=int, default=128, help="tokens per context")
    parser.add_argument("--max-prompts", type=int, default=64, help="contexts to use at most")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        features = None
        if args.features:
            try:
                features = [int(f) for f in args.features.split(",") if f.strip()]
            except ValueError:
                raise ValueError(
                    f"--features expects comma-separated integers, got {args.features!r}"
                ) from None
        model, tokenizer = load_model(args.model)
        sae = load_sae(args.sae)
        tokens = load_tokens(
            text=args.text, tokens=args.tokens, tokenizer=tokenizer,
            context_size=args.context_size, max_prompts=args.max_prompts,
        )  # fmt: skip
        dashboard = build_dashboard(
            model, sae, tokens, args.out, features=features, top=args.top, tokenizer=tokenizer,
            engine=args.engine, n_contexts=args.contexts, overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(dashboard.pages)} feature pages ({dashboard.engine}) to {dashboard.out_dir}")
    if dashboard.note:
        print(f"  SAEDashboard not used: {dashboard.note}")
    print(f"  open {dashboard.index.resolve().as_uri()}")
    return 0
