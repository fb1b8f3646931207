"""The ``sae-lens-attn`` command line (also ``python -m sae_lens_attn``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _info(_args: argparse.Namespace) -> int:
    import sae_lens

    import sae_lens_attn
    from sae_lens_attn.architectures import HF_ARCHITECTURES
    from sae_lens_attn.sae_config import ATTN_TRAINING_CLASSES

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-attn`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
