"""Session fixtures over ``factories``' tiny models: everything here runs offline in seconds."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch
from transformer_lens import HookedTransformer

from .factories import D_VOCAB, N_CTX, build_model


@pytest.fixture(scope="session")
def model() -> HookedTransformer:
    return build_model()


@pytest.fixture(scope="session")
def gqa_model() -> HookedTransformer:
    return build_model(n_kv_heads=2, attn_only=False, seed=1)


@pytest.fixture(params=["mha", "gqa"], scope="session")
def any_model(
    request: pytest.FixtureRequest, model: HookedTransformer, gqa_model: HookedTransformer
) -> HookedTransformer:
    return model if request.param == "mha" else gqa_model


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(1, D_VOCAB, (24, N_CTX), generator=generator)
    rows[:, 0] = 0  # BOS
    return rows
