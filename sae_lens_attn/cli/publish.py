"""``sae-lens-attn publish``: saved SAEs as a release folder, optionally pushed to the Hub."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sae_lens_attn.cli.arguments import UsageError, key_value


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "publish",
        help="write saved SAEs as a release: SAELens folders, model card, SAELens YAML entry",
        description="Write saved attention SAEs as a release folder (SAELens-native SAE folders, "
        "README.md model card, upstream/pretrained_saes.yaml and upstream/test_<release>.py for a "
        "SAELens pull request), and with --push upload it to the Hugging Face Hub as one commit. "
        "Metrics come from --metrics; to measure them on tokens use sae_lens_attn.publish.",
    )
    parser.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="saved SAE folders")
    parser.add_argument("--release", required=True, help="release name (no '/')")
    parser.add_argument("--repo-id", required=True, help="Hugging Face repository owner/name")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument(
        "--id", action="append", help="SAE id per folder, in order (default: folder names)"
    )
    parser.add_argument("--model-name", help="model name for the YAML entry (e.g. gpt2-small)")
    parser.add_argument(
        "--metrics",
        help="JSON file: {sae_id: {l0, ce_loss_recovered, dead_pct, explained_variance}}",
    )
    parser.add_argument(
        "--link", action="append", type=key_value, metavar="KEY=URL", help="YAML entry link"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a release an earlier publish wrote"
    )
    parser.add_argument("--push", action="store_true", help="upload to the Hugging Face Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_lens_attn.pretrained import publish
    from sae_lens_attn.pretrained.metrics import read_metrics_file

    ids = args.id or [Path(folder).name for folder in args.sae_dirs]
    if len(ids) != len(args.sae_dirs):
        raise UsageError(
            f"{len(ids)} --id for {len(args.sae_dirs)} SAE folders; give one per folder"
        )
    repeated = sorted({sae_id for sae_id in ids if ids.count(sae_id) > 1})
    if repeated:
        raise UsageError(
            f"SAE ids {repeated} are given to more than one SAE folder; each SAE of a release "
            "needs its own id (folders of the same name need --id, one per folder)"
        )
    metrics = read_metrics_file(args.metrics) if args.metrics else None
    result = publish(
        dict(zip(ids, args.sae_dirs, strict=True)),
        args.out,
        release=args.release,
        repo_id=args.repo_id,
        metrics=metrics,
        model_name=args.model_name,
        links=dict(args.link or []),
        overwrite=args.overwrite,
        push=args.push,
        private=args.private,
    )
    print(
        f"published release {result.release.name!r} ({len(result.sae_dirs)} SAEs) to {result.out_dir}"
    )
    print(f"  model card:      {result.model_card}")
    print(f"  SAELens entry:   {result.yaml_entry}")
    print(f"  SAELens test:    {result.loader_test}")
    if result.commit:
        print(f"  pushed to https://huggingface.co/{args.repo_id} (commit {result.commit})")
    print(result.yaml_entry.read_text(), end="")
    return 0
