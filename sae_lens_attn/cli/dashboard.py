"""``sae-lens-attn dashboard``: feature dashboards (DFA, head attribution) that open from disk."""

from __future__ import annotations

import argparse
from typing import Any

from sae_lens_attn.cli.arguments import count, integers
from sae_lens_attn.cli.inputs import load_model, load_sae, load_tokens
from sae_lens_attn.outputs import check_output
from sae_lens_attn.viz.dashboard import ENGINES, build_dashboard
from sae_lens_attn.viz.dashboard.build import OUTPUT_KIND


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
    parser.add_argument("--features", type=integers, help="comma-separated feature indices")
    parser.add_argument(
        "--top",
        type=count(),
        default=8,
        help="without --features: the features with the largest activation at a position that "
        "is not padding nor a special token (default: 8)",
    )
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="(default: auto)")
    parser.add_argument("--contexts", type=count(), default=8, help="top contexts per feature")
    parser.add_argument("--context-size", type=count(), default=128, help="tokens per context")
    parser.add_argument("--max-prompts", type=count(), default=64, help="contexts to use at most")
    parser.add_argument(
        "--upstream-sae",
        action="append",
        default=[],
        metavar="SAE",
        help="an SAE of an earlier layer, for the recursive-DFA panel (folder or RELEASE:ID; "
        "repeatable; a layer without one counts as an error term)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --out an earlier dashboard wrote"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, kind=OUTPUT_KIND, overwrite=args.overwrite)  # before loading
    model, tokenizer = load_model(args.model)
    sae = load_sae(args.sae)
    tokens = load_tokens(
        text=args.text, tokens=args.tokens, tokenizer=tokenizer,
        context_size=args.context_size, max_prompts=args.max_prompts,
    )  # fmt: skip
    dashboard = build_dashboard(
        model, sae, tokens, args.out, features=args.features, top=args.top, tokenizer=tokenizer,
        engine=args.engine, n_contexts=args.contexts, overwrite=args.overwrite,
        upstream_saes=[load_sae(spec) for spec in args.upstream_sae],
    )  # fmt: skip
    print(f"wrote {len(dashboard.pages)} feature pages ({dashboard.engine}) to {dashboard.out_dir}")
    if dashboard.note:
        print(f"  SAEDashboard not used: {dashboard.note}")
    print(f"  open {dashboard.index.resolve().as_uri()}")
    return 0
