"""``sae-lens-attn analyze``: run named analyzers on a model, an SAE and text; write tables and plots."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_attn.analysis import AnalysisInput, Analyzer, Corpus, get, head_attribution, names
from sae_lens_attn.analysis.analyzers import chosen_features
from sae_lens_attn.analysis.analyzers.basic import peak_dfa
from sae_lens_attn.analysis.registry import Table, capture_needs
from sae_lens_attn.cli.arguments import UsageError, count, integers, key_value
from sae_lens_attn.cli.inputs import load_model, load_sae, load_tokens
from sae_lens_attn.outputs import OUTPUT_MARKER, atomic_output, check_output
from sae_lens_attn.validation import token_texts
from sae_lens_attn.viz.analysis_plots import table_plots
from sae_lens_attn.viz.causal_plots import causal_table_plots
from sae_lens_attn.viz.induction_plots import induction_table_plots
from sae_lens_attn.viz.plots import dfa_tokens_html, head_attribution_heatmap, html_page

OUTPUT_KIND = "analysis"
"""Kind of output folder ``analyze`` writes (see ``sae_lens_attn.outputs``)."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "analyze",
        help="run named analyzers on a model, an SAE and text; write tables and plots",
        description="Run analyzers (see --list) and write their tables (CSV or JSON) and plots "
        "(head-attribution heatmap PNG, DFA-highlighted tokens HTML, and feature-logit, "
        "family-count and head-family PNGs, prefix-induction PNGs, an RDFA tree HTML and the "
        "proxy-histogram PNG, and ablation, patching and induction-ablation PNGs for those "
        "analyzers) into --out.",
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
        "--features",
        type=integers,
        help="comma-separated feature indices (default: the --top features with the largest "
        "activation at a position that is not padding nor a special token)",
    )
    parser.add_argument(
        "--top",
        type=count(),
        default=8,
        help="features to analyze when --features is not given (default: 8)",
    )
    parser.add_argument(
        "--context-size",
        type=count(),
        default=128,
        help="tokens per context for --text (default: 128)",
    )
    parser.add_argument(
        "--max-prompts", type=count(), default=64, help="contexts to use at most (default: 64)"
    )
    parser.add_argument(
        "--format", choices=["csv", "json"], default="csv", help="table format (default: csv)"
    )
    parser.add_argument(
        "--option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="an analyzer option, repeatable, the value read as JSON where it parses: "
        "position=40, prefix_lengths=[1,2,4], match=fuzzy (see each analyzer's module)",
    )
    parser.add_argument(
        "--upstream-sae",
        action="append",
        default=[],
        metavar="SAE",
        help="an SAE of an earlier layer, for rdfa (folder or RELEASE:ID; repeatable)",
    )
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument(
        "--induction-heads",
        type=integers,
        help="induction_features: the layer's heads to count as induction heads, e.g. 0,1",
    )
    heads.add_argument(
        "--induction-threshold",
        type=float,
        help="induction_features: share of the layer's best induction score a head needs to "
        "count as an induction head (default: 0.9)",
    )
    parser.add_argument("--out", help="output folder: new, empty, or (with --overwrite) ours")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --out an earlier analyze wrote"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in names():
            print(f"{name:<20} {get(name).description}")
        return 0
    if not args.sae or not args.out:
        raise UsageError("analyze needs --sae and --out (or --list)")
    wanted = [name.strip() for name in args.analyzers.split(",") if name.strip()]
    analyzers = {
        name: get(name) for name in wanted
    }  # unknown names fail here, listing the valid ones
    out = check_output(args.out, kind=OUTPUT_KIND, overwrite=args.overwrite)

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
        options["features"] = args.features
    if args.induction_heads is not None:
        options["induction_heads"] = args.induction_heads
    if args.induction_threshold is not None:
        options["relative_head_score"] = args.induction_threshold
    options |= {key: _option_value(value) for key, value in args.option}
    if args.upstream_sae:
        options["upstream_saes"] = [load_sae(spec) for spec in args.upstream_sae]
    with atomic_output(out, kind=OUTPUT_KIND, overwrite=args.overwrite) as tmp:
        write_analysis(
            model, sae, tokens, list(analyzers.values()), tmp, tokenizer=tokenizer,
            options=options, table_format=args.format,
        )  # fmt: skip
    written = sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER)
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def write_analysis(
    model: Any,
    sae: Any,
    tokens: Tensor,
    analyzers: Sequence[Analyzer],
    folder: Path,
    *,
    tokenizer: Any = None,
    options: Mapping[str, Any] | None = None,
    table_format: str = "csv",
    progress: bool = True,
) -> dict[str, Table]:
    """What ``analyze`` writes into ``folder``: each analyzer's tables and every plot, from one
    ``Corpus`` (one capture holding what all of them need, one encode of the SAE)."""
    corpus = Corpus(model, tokens, keep=capture_needs([*analyzers, _PLOTS]))
    inputs = AnalysisInput.from_corpus(corpus, sae, tokenizer=tokenizer, options=options)
    tables: dict[str, Table] = {}
    for analyzer in tqdm(analyzers, desc="analyzers", unit="analyzer", disable=not progress):
        for table_name, table in analyzer(inputs).items():
            _write_table(table, folder / f"{table_name}.{table_format}")
            tables[table_name] = table
    _plots(inputs, folder)
    table_plots(tables, folder)
    induction_table_plots(tables, folder)
    causal_table_plots(tables, folder)
    return tables


def _write_table(table: Table, path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(table, indent=1, default=float))
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else [])
        writer.writeheader()
        writer.writerows(table)


class _PlotNeeds:
    """What the plots of every ``analyze`` read: DFA at the peaks."""

    needs = frozenset({"pattern", "values"})


_PLOTS = _PlotNeeds()


def _plots(inputs: AnalysisInput, folder: Path) -> None:
    """The head-attribution heatmap and the DFA page, from the same features and the same DFA
    the analyzers used (computed once per command)."""
    features = chosen_features(inputs)
    shares = head_attribution(inputs.sae, inputs.model)[features]
    head_attribution_heatmap(shares, features, folder / "head_attribution.png")
    peak = peak_dfa(inputs, features)
    sections = []
    for column, feature in enumerate(features):
        fired = peak.fired[:, column]
        if not fired.any():
            sections.append(
                f"<h3>feature {feature}: never fires in the given tokens; nothing attributed</h3>"
            )
            continue
        prompt = int(peak.acts[:, column].masked_fill(~fired, float("-inf")).argmax())
        query = int(peak.positions[prompt, column])
        text = token_texts(inputs.tokenizer, inputs.tokens[prompt, : query + 1].tolist())
        pre_act = float(peak.pre_act[prompt, column])
        sections.append(
            dfa_tokens_html(
                text,
                peak.by_src[prompt, : query + 1, column],
                query,
                title=f"feature {feature}: pre-activation {pre_act:.3f} "
                f"at prompt {prompt}, position {query}",
            )
        )
    (folder / "dfa.html").write_text(html_page("DFA over source tokens", sections))


def _option_value(text: str) -> Any:
    """``--option`` values: JSON where they parse (numbers, lists, true), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
