"""The recipes of ``recipes/``: each ``--smoke`` run end to end in a subprocess, and its outputs."""

from __future__ import annotations

import ast
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn.training.resampling import cosine_warmup_factor

from .factories import FROM_PRETRAINED_DEFAULTS

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs"
)

RECIPES = Path(__file__).parent.parent / "recipes"
NEW_RECIPES = (
    "reproduce_kissane_gpt2_small.py",
    "train_attn_saes_hf_nnsight.py",
    "publish_release.py",
    "ioi_attention_saes.py",
)
SAE_FILES = ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]


def run_smoke(recipe: str, out: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(RECIPES / recipe), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def load_attention_sae(folder: Path, site: sla.AttnSite) -> SAE:
    """Load with plain SAELens; check the attention metadata and that it splices at hook_z."""
    assert sorted(p.name for p in folder.iterdir() if p.name in SAE_FILES) == SAE_FILES
    sae = SAE.load_from_disk(folder)
    assert sae.cfg.reshape_activations == "hook_z"
    meta = sae.cfg.metadata
    assert meta.hook_name == site.hook_name
    assert (meta.layer, meta.n_heads, meta.n_kv_heads, meta.d_head) == (
        site.layer,
        site.n_heads,
        site.n_kv_heads,
        site.d_head,
    )
    assert sla.AttnSite.from_sae(sae) == site
    z = torch.randn(2, 5, site.n_heads, site.d_head)
    assert sae(z).shape == z.shape
    return sae


@pytest.mark.parametrize("recipe", NEW_RECIPES)
def test_recipe_documents_every_option_and_its_needs(recipe: str) -> None:
    source = (RECIPES / recipe).read_text(encoding="utf-8")
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree) or ""
    for needed in ("Data and hardware", "--smoke", "measured", "Run:"):
        assert needed in docstring, f"{recipe}'s docstring does not say {needed!r}"
    options = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
    ]
    assert len(options) >= 4
    for option in options:
        flag = ast.literal_eval(option.args[0])
        helps = [kw.value for kw in option.keywords if kw.arg == "help"]
        assert helps and ast.literal_eval(helps[0]).strip(), f"{recipe}: {flag} has no help"
    modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [
        a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
    ]
    assert "sae_lens_attn" in modules
    private = [m for m in modules if m.startswith("sae_lens_attn.")]
    assert not private, f"{recipe} imports {private}; recipes use the public `sla.<name>` only"
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "sla"
    }
    assert used and used <= set(sla.__all__), f"{recipe} uses non-public {used - set(sla.__all__)}"


def recipe_constant(recipe: str, name: str) -> object:
    """A module-level literal of a recipe, read from its source (recipes run on import)."""
    tree = ast.parse((RECIPES / recipe).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{recipe} defines no {name}")


def test_kissane_dead_direction_cutoffs_are_the_published_ones() -> None:
    """The recipe's per-layer cutoffs are those in the published file names (`_dc{:.2e}_`)."""
    table = recipe_constant("reproduce_kissane_gpt2_small.py", "PAPER_DEAD_DIRECTION_CUTOFF")
    release = sla.get_release("gpt2-small-attn-z")
    published = {}
    for layer in range(12):
        match = re.search(r"_dc([0-9.e+-]+)_", release.sae(f"blocks.{layer}").path)
        assert match, release.sae(f"blocks.{layer}").path
        published[layer] = float(match.group(1))
    assert table == published
    assert {published[8], published[10], published[11]} == {1e-5, 3.16e-6}  # not all 1e-6


@pytest.mark.slow
def test_reproduce_kissane_smoke_resamples_and_saves_every_layer(tmp_path) -> None:
    stdout = run_smoke("reproduce_kissane_gpt2_small.py", tmp_path)
    resampled = [int(n) for n in re.findall(r"resampled (\d+) dead features", stdout)]
    assert len(resampled) == 4, stdout  # 2 layers × 2 resamplings
    assert sum(resampled) > 0, "the smoke run's resampling never triggered"
    assert "layer 1: l1_coeff 3.0, dictionary 256, dead_direction_cutoff 1e-06" in stdout
    for layer in (0, 1):
        site = sla.AttnSite(layer=layer, n_heads=4, n_kv_heads=4, d_head=16)
        sae = load_attention_sae(tmp_path / site.hook_name, site)
        assert sae.cfg.architecture() == "standard" and sae.cfg.d_sae == 256
        meta = sae.cfg.metadata
        assert meta.value_bias_convention == "folded"
        assert meta.model_from_pretrained_kwargs == FROM_PRETRAINED_DEFAULTS
        assert meta.context_size == 128 and meta.model_name == "smoke-2l-attn-only"

    # the schedule as run: resample after steps 10 and 20 on 5-step windows (5 × 256 tokens)
    log = json.loads((tmp_path / "training_log.json").read_text(encoding="utf-8"))
    lr, warmup = log["lr"], log["schedule"]["warmup_steps"]
    assert log["schedule"]["resample_steps"] == [10, 20] and warmup == 5
    assert [r["window_tokens"] for r in log["resamplings"]] == [5 * 256] * 4
    assert [r["resampled"] for r in log["resamplings"]] == resampled
    assert set(log["dead_direction_cutoff"].values()) == {1e-6}
    # each layer's lr: a cosine warm-up 0.1·lr → lr over 5 steps from step 1, and from the step
    # after each resampling that changed the layer; constant lr otherwise
    for hook_name, changes in log["lr_changes"].items():
        starts = [1] + [
            r["step"] + 1
            for r in log["resamplings"]
            if r["hook_name"] == hook_name and r["resampled"] > 0
        ]
        expected = [
            [start + j, pytest.approx(lr * cosine_warmup_factor(j, warmup, 0.1))]
            for start in starts
            for j in range(warmup + 1)
        ]
        assert changes == expected, hook_name
        assert changes[0][1] == pytest.approx(0.1 * lr)


@pytest.mark.slow
def test_hf_nnsight_smoke_trains_with_the_saelens_runner_on_gqa_llama(tmp_path) -> None:
    stdout = run_smoke("train_attn_saes_hf_nnsight.py", tmp_path)
    site = sla.AttnSite(layer=1, n_heads=4, n_kv_heads=2, d_head=16)
    assert f"smoke-llama-2l: {site}" in stdout
    sae = load_attention_sae(tmp_path, site)
    assert sae.cfg.architecture() == "topk" and sae.cfg.d_sae == 4 * site.d_in
    meta = sae.cfg.metadata
    assert (meta.hf_architecture, meta.hf_module_path) == (
        "LlamaForCausalLM",
        "model.layers.1.self_attn.o_proj",
    )
    assert meta.model_name == "smoke-llama-2l"


@pytest.mark.slow
def test_publish_release_smoke_publishes_and_loads_back_by_name(tmp_path) -> None:
    out = tmp_path / "release"
    stdout = run_smoke("publish_release.py", out)
    release = "smoke-bytes-2l-attn-z-mine"
    for layer in (0, 1):
        site = sla.AttnSite(layer=layer, n_heads=4, n_kv_heads=4, d_head=16)
        load_attention_sae(out / f"blocks.{layer}", site)
        assert f"loaded {release}/blocks.{layer}: {site}, reshape_activations=hook_z" in stdout
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f'SAE.from_pretrained("{release}", "blocks.0")' in card
    entry = yaml.safe_load((out / "upstream" / "pretrained_saes.yaml").read_text(encoding="utf-8"))
    assert entry[release]["repo_id"] == f"me/{release}"
    assert [sae["id"] for sae in entry[release]["saes"]] == ["blocks.0", "blocks.1"]
    assert all(isinstance(sae["l0"], float) for sae in entry[release]["saes"])
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_ioi_smoke_tables_figure_16a_and_figure_5(tmp_path) -> None:
    stdout = run_smoke("ioi_attention_saes.py", tmp_path)
    assert "AttnSite(layer=1, n_heads=4, n_kv_heads=4, d_head=16) with 256 features" in stdout
    assert "Figure 16a: zero-ablating each of the" in stdout and "Figure 5: noising" in stdout
    with (tmp_path / "figure16a.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {row["template"] for row in table} == {"ABBA", "BABA", "all"}
    for template in ("ABBA", "BABA", "all"):
        rows = [row for row in table if row["template"] == template]
        assert [row["rank"] for row in rows] == [str(r) for r in range(1, 11)] + [""]
        assert rows[-1]["feature"] == "error term"
        effects = [abs(float(row["mean_delta"])) for row in rows[:-1]]
        assert effects == sorted(effects, reverse=True)
    with (tmp_path / "figure5.csv").open() as f:
        figure5 = list(csv.DictReader(f))
    assert len(figure5) == 3 * 2 * 3  # corruptions × layers × (ABBA, BABA, all)
    assert {row["corruption"] for row in figure5} == {
        "and_to_alongside",
        "shift_positions",
        "flip_names",
    }
    clean = {row["template"]: row["clean"] for row in figure5}
    for row in figure5:  # the same clean prompts throughout; a corruption changes the metric
        assert row["clean"] == clean[row["template"]]
        assert float(row["corrupt"]) != float(row["clean"])
    # layer 2 is the model's third of four: its z at S2 still reaches the end, through layer 3
    assert any(float(row["patched"]) != float(row["clean"]) for row in figure5)
