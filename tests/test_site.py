from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.backends.architectures import hf_architecture


def test_site_from_model_reads_head_structure(model, gqa_model) -> None:
    site = AttnSite.from_model(model, 1)
    assert site == AttnSite(layer=1, n_heads=4, n_kv_heads=4, d_head=8)
    assert (site.d_in, site.hook_name) == (32, "blocks.1.attn.hook_z")
    gqa = AttnSite.from_model(gqa_model, 0)
    assert (gqa.n_heads, gqa.n_kv_heads, gqa.group_size) == (4, 2, 2)
    assert [gqa.kv_head(h) for h in range(4)] == [0, 0, 1, 1]


def test_hook_names_and_module_paths_come_from_the_site() -> None:
    site = AttnSite(layer=3, n_heads=8, n_kv_heads=2, d_head=16)
    assert site.pattern_hook_name == "blocks.3.attn.hook_pattern"
    assert site.values_hook_name == "blocks.3.attn.hook_v"
    assert (
        hf_architecture("GPT2LMHeadModel").out_proj_path(site.layer)
        == "transformer.h.3.attn.c_proj"
    )
    assert (
        hf_architecture("LlamaForCausalLM").out_proj_path(site.layer)
        == "model.layers.3.self_attn.o_proj"
    )
    assert (
        hf_architecture("GPTNeoXForCausalLM").out_proj_path(site.layer)
        == "gpt_neox.layers.3.attention.dense"
    )
    assert site.head_slice(2) == slice(32, 48)
    assert AttnSite.layer_of(site.hook_name) == 3


def test_site_is_frozen_and_hashable() -> None:
    site = AttnSite(0, 4, 4, 8)
    with pytest.raises(AttributeError):
        site.layer = 1  # type: ignore[misc]
    assert {site: 1}[AttnSite(0, 4, 4, 8)] == 1


@pytest.mark.parametrize("layer", [-1, 2, 10])
def test_layer_out_of_range_names_the_valid_range(model, layer: int) -> None:
    with pytest.raises(ValueError, match=r"layer .* out of range.*2 layers.*valid: 0\.\.1"):
        AttnSite.from_model(model, layer)


@pytest.mark.parametrize(
    "hook_name",
    ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.x.attn.hook_z", None],
)
def test_non_attention_hook_name_is_refused(hook_name) -> None:
    with pytest.raises(
        ValueError, match=r"expected a hook_z hook name 'blocks.<layer>.attn.hook_z'"
    ):
        AttnSite.layer_of(hook_name)


def test_invalid_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        AttnSite(0, 6, 4, 8)
    with pytest.raises(ValueError, match="d_head must be an integer >= 1, got 0"):
        AttnSite(0, 4, 4, 0)


def test_unsupported_model_type_lists_supported_ones() -> None:
    with pytest.raises(
        TypeError,
        match=r"no sae_lens_attn backend supports .*Linear.*supported: .*HookedTransformer",
    ):
        AttnSite.from_model(torch.nn.Linear(2, 2), 0)
    assert "transformer_lens.HookedTransformer" in sla.SUPPORTED_MODEL_TYPES


def test_unknown_hf_architecture_says_how_to_add_one() -> None:
    with pytest.raises(
        ValueError,
        match=r"unsupported Hugging Face architecture 'FooForCausalLM'.*HF_ARCHITECTURES",
    ):
        hf_architecture("FooForCausalLM")


SITE_ALONE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("site_alone", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["site_alone"] = module
spec.loader.exec_module(module)
print(json.dumps(sorted(name for name in sys.modules if name.startswith("sae_lens_attn"))))
"""


def test_the_site_module_loads_without_the_package() -> None:
    """``site.py`` imports nothing of the package at load (the metadata reader, which imports
    it, is imported inside ``from_sae``), so it sits below every other module."""
    path = Path(sla.site.__file__)
    out = subprocess.run(
        [sys.executable, "-c", SITE_ALONE, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
