"""The ``sae-lens-attn`` command line (also ``python -m sae_lens_attn``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sae_lens_attn.cli import analyze, dashboard, demo, evaluate


def _info(_args: argparse.Namespace) -> int:
    import sae_lens

    import sae_lens_attn
    from sae_lens_attn.backends.architectures import HF_ARCHITECTURES
    from sae_lens_attn.config.sae_configs import ATTN_TRAINING_CLASSES

    print(f"sae-lens-attn {sae_lens_attn.__version__} (SAELens {sae_lens.__version__})")
    print("attention SAE architectures registered with SAELens:")
    for name, (_, cfg_cls) in ATTN_TRAINING_CLASSES.items():
        print(f"  {name:<16} saved as '{cfg_cls.inference_architecture}'")
    print("model types with a backend:")
    for model_type, backend in sae_lens_attn.SUPPORTED_MODEL_TYPES.items():
        print(f"  {model_type:<40} {backend}")
    print("Hugging Face architectures in the table:")
    for name, arch in HF_ARCHITECTURES.items():
        print(f"  {name:<24} z = input of {arch.out_proj_path(0).replace('.0.', '.<L>.')}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sae_lens_attn.pretrained import publish

    ids = args.id or [Path(folder).name for folder in args.sae_dirs]
    if len(ids) != len(args.sae_dirs):
        print(
            f"error: {len(ids)} --id for {len(args.sae_dirs)} SAE folders; give one per folder",
            file=sys.stderr,
        )
        return 2
    bad = [link for link in args.link or [] if "=" not in link]
    if bad:
        print(f"error: --link expects KEY=URL, got {bad}", file=sys.stderr)
        return 2
    links = dict(link.split("=", 1) for link in args.link or [])
    try:
        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        result = publish(
            dict(zip(ids, args.sae_dirs, strict=True)),
            args.out,
            release=args.release,
            repo_id=args.repo_id,
            metrics=metrics,
            model_name=args.model_name,
            links=links,
            overwrite=args.overwrite,
            push=args.push,
            private=args.private,
        )
    except (ValueError, FileExistsError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-attn",
        description="Sparse autoencoders on attention layer outputs (hook_z) for SAELens.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser(
        "info", help="show versions, registered architectures and supported models"
    )
    info.set_defaults(run=_info)
    publish = commands.add_parser(
        "publish",
        help="write saved SAEs as a release: SAELens folders, model card, SAELens YAML entry",
        description="Write saved attention SAEs as a release folder (SAELens-native SAE folders, "
        "README.md model card, upstream/pretrained_saes.yaml and upstream/test_<release>.py for a "
        "SAELens pull request), and with --push upload it to the Hugging Face Hub as one commit. "
        "Metrics come from --metrics; to measure them on tokens use sae_lens_attn.publish.",
    )
    publish.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="saved SAE folders")
    publish.add_argument("--release", required=True, help="release name (no '/')")
    publish.add_argument("--repo-id", required=True, help="Hugging Face repository owner/name")
    publish.add_argument("--out", required=True, help="folder to write")
    publish.add_argument(
        "--id", action="append", help="SAE id per folder, in order (default: folder names)"
    )
    publish.add_argument("--model-name", help="model name for the YAML entry (e.g. gpt2-small)")
    publish.add_argument(
        "--metrics",
        help="JSON file: {sae_id: {l0, ce_loss_recovered, dead_pct, explained_variance}}",
    )
    publish.add_argument("--link", action="append", metavar="KEY=URL", help="YAML entry link")
    publish.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    publish.add_argument("--push", action="store_true", help="upload to the Hugging Face Hub")
    publish.add_argument("--private", action="store_true", help="create the repository private")
    publish.set_defaults(run=_publish)
    analyze.add_parser(commands)
    evaluate.add_parser(commands)
    dashboard.add_parser(commands)
    demo.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-attn`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
