"""The attention metadata: one writer, one reader, and every SAE this package makes uses them."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.config.metadata import (
    ATTENTION_METADATA_KEYS,
    attention_metadata,
    read_attention_metadata,
    recorded_site,
)
from sae_lens_attn.pretrained.kissane import kissane_config_to_saelens
from sae_lens_attn.site import FOLDED_MODEL_KWARGS

GQA_SITE = AttnSite(layer=3, n_heads=8, n_kv_heads=2, d_head=16)


def saved_sae(metadata: dict, d_in: int, tmp_path) -> SAE:
    """An SAE with ``metadata``, saved by SAELens and loaded back from disk."""
    sae = SAE.from_dict(
        {
            "architecture": "standard",
            "d_in": d_in,
            "d_sae": 12,
            "reshape_activations": "hook_z",
            "metadata": metadata,
        }
    )
    sae.save_model(tmp_path / "sae")
    return SAE.load_from_disk(tmp_path / "sae")


def test_written_metadata_reads_back_through_a_saved_sae(tmp_path) -> None:
    written = attention_metadata(
        GQA_SITE,
        "included",
        model_name="tiny-llama",
        hf_architecture="LlamaForCausalLM",
        model_from_pretrained_kwargs={"dtype": "float32"},
    )
    assert set(written) == {*ATTENTION_METADATA_KEYS, "model_name"}
    assert (written["hook_name"], written["layer"]) == ("blocks.3.attn.hook_z", 3)
    assert written["hf_module_path"] == "model.layers.3.self_attn.o_proj"
    sae = saved_sae(written, GQA_SITE.d_in, tmp_path)  # SAELens writes and reads cfg.json itself
    on_disk = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert {key: on_disk[key] for key in written} == written
    read = read_attention_metadata(sae.cfg.metadata, d_in=sae.cfg.d_in)
    assert read.site(sae.cfg.d_in) == GQA_SITE == AttnSite.from_sae(sae)
    assert (read.value_bias_convention, read.model_name, read.hf_architecture) == (
        "included",
        "tiny-llama",
        "LlamaForCausalLM",
    )
    assert read.model_from_pretrained_kwargs == {"dtype": "float32"}
    z = torch.randn(2, 5, GQA_SITE.n_heads, GQA_SITE.d_head)
    assert sae(z).shape == z.shape  # SAELens splices it at hook_z as saved


def test_folded_metadata_records_the_kwargs_that_deliver_folded_z() -> None:
    written = attention_metadata(GQA_SITE, "folded", model_from_pretrained_kwargs={"dtype": "bf16"})
    assert written["model_from_pretrained_kwargs"] == {**FOLDED_MODEL_KWARGS, "dtype": "bf16"}
    assert "model_name" not in written  # left to SAELens's runner
    with pytest.raises(ValueError, match="contradicts the 'included' value-bias convention"):
        attention_metadata(GQA_SITE, "included", model_from_pretrained_kwargs=FOLDED_MODEL_KWARGS)
    with pytest.raises(ValueError, match="contradict the 'folded' value-bias convention"):
        attention_metadata(GQA_SITE, "folded", model_from_pretrained_kwargs={"fold_ln": False})


def test_plain_saelens_metadata_reads_with_the_head_structure_unknown() -> None:
    read = read_attention_metadata({"hook_name": "blocks.2.attn.hook_z"})
    assert (read.layer, read.n_heads, read.value_bias_convention) == (2, None, None)
    assert read.site(64) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hook_name": "blocks.3.hook_resid_pre"}, "expected a hook_z hook name"),
        ({"layer": 4}, r"layer=4 but hook_name='blocks.3.attn.hook_z' is layer 3"),
        ({"n_heads": 6}, r"SAE d_in=128 does not match the site .* 6\*16"),
        ({"n_kv_heads": 3}, "not a multiple of n_kv_heads=3"),
        ({"n_heads": None}, "without n_heads"),
        ({"n_heads": 2.5}, "must be an integer"),
        ({"value_bias_convention": "raw"}, r"unknown value_bias_convention 'raw'; valid: \['folded', 'included'\]"),
        ({"hf_architecture": "Nope"}, r"unknown hf_architecture 'Nope'; valid: \[.*'GPT2LMHeadModel'"),
        ({"hf_module_path": "model.layers.4.self_attn.o_proj"}, "z of LlamaForCausalLM at layer 3 is the input of 'model.layers.3.self_attn.o_proj'"),
        ({"model_from_pretrained_kwargs": ["fold_ln"]}, "model_from_pretrained_kwargs must be a mapping"),
    ],
)  # fmt: skip
def test_inconsistent_metadata_is_refused_naming_the_source(change, message) -> None:
    metadata = {
        **attention_metadata(GQA_SITE, "included", hf_architecture="LlamaForCausalLM"),
        **change,
    }
    with pytest.raises(ValueError, match=rf"^cfg.json of x: .*{message}"):
        read_attention_metadata(metadata, d_in=GQA_SITE.d_in, source="cfg.json of x")


def test_every_writer_writes_the_one_schema(tmp_path) -> None:
    """The converter of Kissane et al.'s SAEs writes what the writer writes for their site."""
    raw = {"act_name": "blocks.3.attn.hook_z", "act_size": 128, "dict_size": 12, "layer": 3,
           "model_name": "gpt2-small", "seq_len": 128}  # fmt: skip
    overrides = {"n_heads": 8, "n_kv_heads": 2, "hf_architecture": "LlamaForCausalLM"}
    converted = kissane_config_to_saelens(raw, overrides)["metadata"]
    expected = attention_metadata(
        GQA_SITE, "folded", model_name="gpt2-small", hf_architecture="LlamaForCausalLM"
    )
    assert {key: converted[key] for key in expected} == expected
    sae = saved_sae(converted, 128, tmp_path)
    assert read_attention_metadata(sae.cfg.metadata, d_in=128).site(128) == GQA_SITE


def test_training_configs_save_the_one_schema(gqa_model, tmp_path) -> None:
    """What an attn_* config saves is the writer's output for the model's site."""
    cfg = sla.attn_sae_training_config(gqa_model, 1, "topk", d_sae=32, k=4)
    cfg.metadata.model_name = "tiny-gqa"  # type: ignore[attr-defined]
    site = AttnSite.from_model(gqa_model, 1)
    saved = cfg.get_inference_sae_cfg_dict()["metadata"]
    backend = sla.backend_for(gqa_model)
    expected = attention_metadata(
        site, backend.native_convention, hf_architecture=backend.hf_architecture_name
    )
    assert {key: saved[key] for key in expected} == expected
    sae = saved_sae(saved, site.d_in, tmp_path)
    assert read_attention_metadata(sae.cfg.metadata, d_in=site.d_in).site(site.d_in) == site


def test_recorded_site_fills_what_the_metadata_leaves_out() -> None:
    assert recorded_site(3, 128, 8, 2, 16) == GQA_SITE
    assert recorded_site(3, 128, 8) == AttnSite(3, 8, 8, 16)  # kv heads = heads, d_head = d_in/8
    with pytest.raises(
        ValueError, match=r"SAE d_in=120 does not match .*: expected .* 8\*16 = 128"
    ):
        recorded_site(3, 120, 8, d_head=16)
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads=3"):
        recorded_site(3, 128, 8, 3)


@pytest.mark.parametrize("with_heads", [True, False], ids=["recorded", "plain-saelens"])
def test_from_sae_is_the_reader_and_the_model_site(gqa_model, tmp_path, with_heads) -> None:
    """``AttnSite.from_sae`` is the reader's ``sae_site``; by hand: the model's site when the
    model is given (clashes refused), else the recorded heads, and no guessing without them."""
    site = AttnSite.from_model(gqa_model, 1)
    written = attention_metadata(site, "included")
    metadata = written if with_heads else {"hook_name": written["hook_name"]}
    sae = saved_sae(metadata, site.d_in, tmp_path)
    read = read_attention_metadata(sae.cfg.metadata)
    assert AttnSite.from_sae(sae, gqa_model) == read.sae_site(site.d_in, site) == site
    if with_heads:
        assert AttnSite.from_sae(sae) == read.sae_site(site.d_in) == site
        other = AttnSite(1, site.n_heads, site.n_heads, site.d_head)
        with pytest.raises(
            ValueError, match=r"another model's site: n_kv_heads=2 in the SAE but 4"
        ):
            read.sae_site(site.d_in, other)
    else:
        with pytest.raises(ValueError, match=r"does not record n_heads.*pass model="):
            read.sae_site(site.d_in)
        with pytest.raises(ValueError, match=r"does not record n_heads.*pass model="):
            AttnSite.from_sae(sae)
        wider = AttnSite(1, site.n_heads, site.n_kv_heads, site.d_head * 2)
        with pytest.raises(ValueError, match=r"SAE d_in=32 does not match the site"):
            read.sae_site(site.d_in, wider)  # nothing recorded to clash with: the width decides
