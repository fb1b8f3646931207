from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn.cli.main import main
from sae_lens_attn.outputs import OUTPUT_MARKER

ROOT = Path(__file__).parent.parent


def test_cli_info_lists_architectures_and_backends(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "attn_topk" in out and "transformer_lens.HookedTransformer" in out


def test_cli_rejects_unknown_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_attn", "info"], capture_output=True, text=True, check=True
    )
    assert "attn_standard" in result.stdout


def test_train_attn_saes_saves_every_layer_and_refuses_to_overwrite(
    model, tokens, tmp_path
) -> None:
    kwargs = {
        "training_tokens": 512,
        "out_dir": tmp_path,
        "architecture": "topk",
        "train_batch_size_tokens": 64,
        "buffer_size_tokens": 256,
        "d_sae": 48,
        "k": 4,
    }
    saved = sla.train_attn_saes(model, [0, 1], sla.TokenBatches(tokens, 4), **kwargs)
    for layer, folder in saved.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            OUTPUT_MARKER,
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
        ]
        sae = SAE.load_from_disk(folder)
        assert sla.AttnSite.from_sae(sae, model).layer == layer
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], (
        "temporary folders left behind"
    )
    before = (saved[0] / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="earlier sae output of sae-lens-attn; pass"):
        sla.train_attn_saes(model, [0], sla.TokenBatches(tokens, 4), **kwargs)
    assert (saved[0] / "sae_weights.safetensors").read_bytes() == before


@pytest.mark.slow
def test_recipe_smoke_run(tmp_path) -> None:
    script = ROOT / "recipes" / "train_attn_saes_all_layers.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer 1: AttnSite(layer=1, n_heads=4" in result.stdout
    assert (tmp_path / "blocks.0.attn.hook_z" / "cfg.json").exists()
