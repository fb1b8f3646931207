"""Attention SAE configs through SAELens's own runner; vanilla SAELens loads what we save."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    StandardTrainingSAEConfig,
    TrainingSAEConfig,
)
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class

import sae_lens_attn as sla
from sae_lens_attn import AttnSite, backend_for
from sae_lens_attn.config import registration

from .factories import run_saelens_runner

TESTS_DIR = Path(__file__).parent

ARCH_KWARGS = {
    "standard": {"l1_coefficient": 1.0},
    "topk": {"k": 4},
    "jumprelu": {},
    "batchtopk": {"k": 4},
}


@pytest.fixture(scope="module", params=list(ARCH_KWARGS))
def trained(request, model, tmp_path_factory) -> tuple[str, Path]:
    architecture = request.param
    out = tmp_path_factory.mktemp(f"attn_{architecture}")
    cfg = sla.attn_sae_training_config(
        model, 1, architecture, d_sae=64, **ARCH_KWARGS[architecture]
    )
    run_saelens_runner(model, cfg, "blocks.1.attn.hook_z", out)
    return architecture, out


def test_attn_architectures_are_registered_by_name() -> None:
    for name in ("attn_standard", "attn_topk", "attn_jumprelu", "attn_batchtopk"):
        assert name in SAE_TRAINING_CLASS_REGISTRY
    cfg = TrainingSAEConfig.from_dict(
        {"architecture": "attn_topk", "d_in": 32, "d_sae": 64, "n_heads": 4, "k": 3}
    )
    assert isinstance(cfg, sla.AttnTopKTrainingSAEConfig)
    assert (cfg.k, cfg.n_heads, cfg.reshape_activations) == (3, 4, "hook_z")


def test_saved_sae_is_native_saelens_with_attention_metadata(trained) -> None:
    architecture, out = trained
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"} <= set(os.listdir(out))
    cfg = json.loads((out / "cfg.json").read_text())
    base = {"batchtopk": "jumprelu"}.get(architecture, architecture)
    assert cfg["architecture"] == base
    assert cfg["reshape_activations"] == "hook_z"
    meta = cfg["metadata"]
    assert {
        k: meta[k] for k in ("hook_name", "layer", "n_heads", "n_kv_heads", "d_head", "model_name")
    } == {
        "hook_name": "blocks.1.attn.hook_z",
        "layer": 1,
        "n_heads": 4,
        "n_kv_heads": 4,
        "d_head": 8,
        "model_name": "tiny-attn",
    }
    assert meta["value_bias_convention"] == "included"  # the test model keeps a non-zero b_V
    assert meta["hf_module_path"] == "transformer.h.1.attn.c_proj"
    assert meta["training_architecture"] == f"attn_{architecture}"


def test_save_load_gives_identical_outputs(trained, model, tokens) -> None:
    _, out = trained
    sae = SAE.load_from_disk(out)
    z = (
        backend_for(model)
        .capture(tokens, [AttnSite.from_model(model, 1)], convention="included")[1]
        .z
    )
    reloaded = SAE.load_from_disk(out)
    torch.testing.assert_close(sae(z), reloaded(z))
    assert sae(z).shape == z.shape  # reshape_activations="hook_z": [.., n_heads, d_head] in and out
    torch.testing.assert_close(sae(z), sae.decode(sae.encode(z)))
    assert AttnSite.from_sae(sae) == AttnSite.from_model(model, 1)


VANILLA_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, os.path.dirname({tests_dir!r}))
    from tests.factories import build_model
    from sae_lens import SAE, HookedSAETransformer
    base = build_model()
    model = HookedSAETransformer(base.cfg)
    model.load_state_dict(base.state_dict())
    sae = SAE.load_from_disk({sae_dir!r})
    tokens = torch.load({tokens_path!r})
    logits = model.run_with_saes(tokens, saes=[sae])
    assert "sae_lens_attn" not in sys.modules, "the vanilla check imported the plugin"
    torch.save({{"logits": logits, "clean": model(tokens)}}, {out_path!r})
    """
)


@pytest.mark.slow
def test_vanilla_saelens_loads_and_runs_what_we_save(trained, model, tokens, tmp_path) -> None:
    _, out = trained
    tokens_path, out_path = tmp_path / "tokens.pt", tmp_path / "logits.pt"
    torch.save(tokens, tokens_path)
    script = VANILLA_SCRIPT.format(
        tests_dir=str(TESTS_DIR),
        sae_dir=str(out),
        tokens_path=str(tokens_path),
        out_path=str(out_path),
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    vanilla = torch.load(out_path)
    torch.testing.assert_close(vanilla["clean"], model(tokens))

    sae = SAE.load_from_disk(out)
    site = AttnSite.from_sae(sae, model)
    with backend_for(model).splicing(
        {site: sae}, convention=sae.cfg.metadata.value_bias_convention
    ):
        ours = model(tokens)
    torch.testing.assert_close(vanilla["logits"], ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, model(tokens), atol=1e-3)


def test_plain_saelens_hook_z_sae_needs_the_model_for_its_heads(model, tmp_path) -> None:
    run_saelens_runner(
        model, StandardTrainingSAEConfig(d_in=32, d_sae=48), "blocks.0.attn.hook_z", tmp_path
    )
    sae = SAE.load_from_disk(tmp_path)
    assert sae.cfg.reshape_activations == "none"  # what SAELens's runner alone saves
    with pytest.raises(ValueError, match="does not record n_heads.*pass model="):
        AttnSite.from_sae(sae)
    assert AttnSite.from_sae(sae, model) == AttnSite(0, 4, 4, 8)


def test_sae_for_another_models_site_is_refused(trained, gqa_model) -> None:
    _, out = trained
    with pytest.raises(
        ValueError, match="trained for another model's site: n_kv_heads=4 in the SAE but 2"
    ):
        AttnSite.from_sae(SAE.load_from_disk(out), gqa_model)


def test_sae_width_must_be_n_heads_times_d_head(trained, tmp_path) -> None:
    _, out = trained
    sae = SAE.load_from_disk(out)
    sae.cfg.metadata.d_head = 10
    with pytest.raises(
        ValueError,
        match=r"SAE d_in=32 does not match the site blocks.1.attn.hook_z: expected n_heads\*d_head = 4\*10 = 40",
    ):
        AttnSite.from_sae(sae)
    with pytest.raises(ValueError, match="d_in=30 is not n_heads\\*d_head for n_heads=4"):
        sla.AttnStandardTrainingSAEConfig(d_in=30, d_sae=64, n_heads=4)


def test_non_hook_z_hook_is_refused_by_the_runner(model, tmp_path) -> None:
    cfg = sla.AttnStandardTrainingSAEConfig(d_in=32, d_sae=48, n_heads=4)
    with pytest.raises(
        ValueError, match="expected a hook_z hook name.*got 'blocks.1.hook_resid_pre'"
    ):
        run_saelens_runner(model, cfg, "blocks.1.hook_resid_pre", tmp_path)


def test_unknown_architecture_lists_valid_ones(model) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown attention SAE architecture 'gated'; valid: \['standard', 'topk', 'jumprelu', 'batchtopk'\]",
    ):
        sla.attn_sae_training_config(model, 0, "gated")  # type: ignore[arg-type]


@pytest.mark.slow
def test_registration_is_idempotent() -> None:
    import sae_lens_attn.config.sae_configs as sae_config

    importlib.reload(sae_config)
    importlib.reload(importlib.import_module("sae_lens_attn.config.registration"))
    importlib.reload(sla)
    registration.register_training_classes()
    assert (
        SAE_TRAINING_CLASS_REGISTRY["attn_topk"][1]
        is importlib.import_module("sae_lens_attn.config.sae_configs").AttnTopKTrainingSAEConfig
    )
    subprocess.run(
        [sys.executable, "-c", "import sae_lens_attn, importlib; importlib.reload(sae_lens_attn)"],
        check=True,
    )


def test_foreign_registration_under_our_name_is_an_error(monkeypatch) -> None:
    monkeypatch.setitem(
        SAE_TRAINING_CLASS_REGISTRY, "attn_standard", SAE_TRAINING_CLASS_REGISTRY["standard"]
    )
    with pytest.raises(ValueError, match="'attn_standard' is already registered by sae_lens"):
        registration.register_training_classes()
    assert (
        register_sae_training_class
    )  # SAELens's own registration raises on duplicates; ours must not
