"""``sae-lens-attn info``: versions, registered architectures and supported models."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "info", help="show versions, registered architectures and supported models"
    )
    parser.set_defaults(run=run)


def run(_args: argparse.Namespace) -> int:
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
