"""Backends neither keep models alive nor read weights they do not need."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
import transformers

from sae_lens_attn import AttnSite, backend_for

from .hf_twins import VOCAB_SIZE, build_hf, build_twin


def _model(kind: str) -> Any:
    hf_model = build_hf("gpt2")
    return hf_model if kind == "nnsight" else build_twin(hf_model)


@pytest.mark.parametrize("kind", ["nnsight", "transformer_lens"])
def test_dropping_the_model_frees_it(kind) -> None:
    model = _model(kind)
    tokens = torch.randint(0, VOCAB_SIZE, (1, 6))
    backend_for(model).capture(tokens, [AttnSite.from_model(model, 0)])
    held = backend_for(model)
    assert backend_for(model) is held  # one backend per model while it is in use
    alive = weakref.ref(model)
    del model, held
    gc.collect()
    assert alive() is None


def test_a_model_on_the_meta_device_captures_without_reading_its_weights() -> None:
    # nnsight builds models this way for remote (NDIF) runs: the weights are never here.
    config = build_hf("gpt2").config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    backend = backend_for(model)
    site = backend.site(1)
    assert (site.n_heads, site.d_head) == (4, 8)
    with backend.capturing([site], pattern=True, values=True, convention="included") as captures:
        assert list(captures) == [1]
    with (
        pytest.raises(ValueError, match="meta device.*convention='included'"),
        backend.capturing([site], convention="folded"),
    ):
        pass
