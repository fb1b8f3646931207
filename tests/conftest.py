"""Tiny models built from configs: everything here runs offline in seconds."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

D_VOCAB = 64
N_CTX = 16


def build_model(
    *, n_kv_heads: int | None = None, attn_only: bool = True, seed: int = 0
) -> HookedTransformer:
    """A 2-layer model with random weights and a non-zero value bias, so conventions differ."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=N_CTX,
        d_head=8,
        n_heads=4,
        n_key_value_heads=n_kv_heads,
        d_vocab=D_VOCAB,
        d_mlp=None if attn_only else 64,
        act_fn="gelu",
        attn_only=attn_only,
        positional_embedding_type="rotary" if n_kv_heads else "standard",
        normalization_type="LN",
        original_architecture="LlamaForCausalLM" if n_kv_heads else "GPT2LMHeadModel",
        seed=seed,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            attn: Any = block.attn
            bias = attn._b_V if n_kv_heads else attn.b_V
            bias.normal_(0, 0.5)
            attn.b_O.normal_(0, 0.1)
    return model.eval()


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
