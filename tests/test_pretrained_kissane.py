"""Release gpt2-small-attn-z through SAELens's real download path, on a hub cache we write."""

from __future__ import annotations

import collections
import io
import json
import pathlib
import re

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.loading import pretrained_saes_directory as saes_directory_module
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    NAMED_PRETRAINED_SAE_LOADERS,
    load_sae_config_from_huggingface,
    sae_lens_huggingface_loader,
)
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens import HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn import backend_for
from sae_lens_attn.pretrained import KISSANE_CONVERSION_FUNC, register_pretrained
from sae_lens_attn.pretrained.kissane import config_file_for

from .factories import FROM_PRETRAINED_DEFAULTS
from .hub_cache import add_repo, use_hub_cache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs"
)

RELEASE = "gpt2-small-attn-z"
REPO = "ckkissane/attn-saes-gpt2-small-all-layers"
D_IN = 768  # GPT-2 Small: 12 heads × 64
TINY = {layer: 16 if layer in (5, 7) else 8 for layer in range(12)}  # tiny dict sizes per layer


def kissane_cfg(layer: int, dict_size: int) -> dict:
    """A config with every key Kissane et al.'s training script writes."""
    return {
        "seed": 49,
        "batch_size": 4096,
        "buffer_mult": 384,
        "lr": 0.0012,
        "num_tokens": 2000000000,
        "l1_coeff": 1.0,
        "beta1": 0.9,
        "beta2": 0.99,
        "dict_mult": dict_size // D_IN,
        "seq_len": 128,
        "enc_dtype": "fp32",
        "model_name": "gpt2-small",
        "site": "z",
        "layer": layer,
        "device": "cuda",
        "reinit": "reinit",
        "head": "cat",
        "concat_heads": True,
        "resample_scheme": "anthropic",
        "anthropic_neuron_resample_scale": 0.2,
        "dead_direction_cutoff": 1e-06,
        "re_init_every": 25000,
        "anthropic_resample_last": 12500,
        "resample_factor": 0.01,
        "num_resamples": 4,
        "wandb_project_name": "gpt2-L0-20240117",
        "wandb_entity": "ckkissane",
        "save_state_dict_every": 50000,
        "b_dec_init": "zeros",
        "sched_type": "cosine_warmup",
        "sched_epochs": 1000,
        "sched_lr_factor": 0.1,
        "sched_warmup_epochs": 1000,
        "sched_finish": True,
        "anthropic_resample_batches": 100,
        "eval_every": 1000,
        "model_batch_size": 512,
        "buffer_size": 1572864,
        "buffer_batches": 12288,
        "act_name": f"blocks.{layer}.attn.hook_z",
        "act_size": D_IN,
        "dict_size": dict_size,
        "name": f"gpt2-small_{layer}_{dict_size}_z",
    }


def state_dict_bytes(d_in: int, d_sae: int, seed: int, **shapes: tuple[int, ...]) -> bytes:
    """A Kissane et al. state dict (an OrderedDict of fp32 tensors) as ``torch.save`` writes it."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    sd = collections.OrderedDict(
        W_enc=torch.randn(*shapes.get("W_enc", (d_in, d_sae)), generator=g) * 0.1,
        W_dec=W_dec / W_dec.norm(dim=-1, keepdim=True),
        b_enc=torch.randn(d_sae, generator=g) * 0.1,
        b_dec=torch.randn(d_in, generator=g) * 0.1,
    )
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    return buffer.getvalue()


def release_paths() -> dict[int, str]:
    release = sla.get_release(RELEASE)
    return {layer: release.sae(f"blocks.{layer}").path for layer in range(12)}


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> pathlib.Path:
    """A cache holding the release's 24 files: real file names and configs, tiny dictionaries."""
    root = tmp_path_factory.mktemp("hf_home")
    files: dict[str, bytes | pathlib.Path] = {}
    for layer, path in release_paths().items():
        files[path] = state_dict_bytes(D_IN, TINY[layer], seed=layer)
        files[config_file_for(path)] = json.dumps(kissane_cfg(layer, TINY[layer])).encode()
    add_repo(root / "hub", REPO, files)
    return root


@pytest.fixture
def hub(hub_root, monkeypatch) -> pathlib.Path:
    return use_hub_cache(monkeypatch, hub_root)


@pytest.mark.slow
def test_release_is_in_saelens_directory_and_comes_back_after_cache_clear() -> None:
    directory = get_pretrained_saes_directory()
    lookup = directory[RELEASE]
    assert lookup.repo_id == REPO and lookup.model == "gpt2-small"
    assert lookup.conversion_func == KISSANE_CONVERSION_FUNC
    ids = [f"blocks.{n}" for n in range(12)] + [f"blocks.{n}.hook_z" for n in range(12)]
    assert list(lookup.saes_map) == ids
    get_pretrained_saes_directory.cache_clear()
    rebuilt = get_pretrained_saes_directory()
    assert rebuilt is not directory and RELEASE not in rebuilt  # SAELens rebuilt its own YAML
    register_pretrained()
    assert get_pretrained_saes_directory() is rebuilt and rebuilt[RELEASE] == lookup
    assert "gpt2-small-res-jb" in rebuilt  # SAELens's own releases are still there
    assert saes_directory_module.get_repo_id_and_folder_name(RELEASE, "blocks.7")[0] == REPO


def test_file_names_are_those_of_saelens_kk_release() -> None:
    """Same files as SAELens's gpt2-small-hook-z-kk; blocks.N and blocks.N.hook_z are one SAE."""
    directory = get_pretrained_saes_directory()
    kk = directory["gpt2-small-hook-z-kk"]
    assert kk.repo_id == REPO and kk.conversion_func == "connor_rob_hook_z"
    kk_paths = {layer: kk.saes_map[f"blocks.{layer}.hook_z"] for layer in range(12)}
    assert release_paths() == kk_paths
    lookup = directory[RELEASE]
    for layer in range(12):
        assert lookup.saes_map[f"blocks.{layer}.hook_z"] == lookup.saes_map[f"blocks.{layer}"]
        assert f"_L{layer}_" in kk_paths[layer]


def test_config_has_attention_metadata_and_dictionary_size_per_layer(tmp_path, monkeypatch) -> None:
    """Full-size configs (dict_size as in the file names): no weights needed for the config."""
    cache = use_hub_cache(monkeypatch, tmp_path)
    sizes = {
        layer: int(re.search(r"_ds(\d+)_", path).group(1))  # type: ignore[union-attr]
        for layer, path in release_paths().items()
    }
    add_repo(
        cache,
        REPO,
        {
            config_file_for(path): json.dumps(kissane_cfg(layer, sizes[layer])).encode()
            for layer, path in release_paths().items()
        },
    )
    d_sae = {
        layer: load_sae_config_from_huggingface(RELEASE, f"blocks.{layer}")["d_sae"]
        for layer in range(12)
    }
    assert d_sae == {layer: 49152 if layer in (5, 7) else 24576 for layer in range(12)}
    cfg = load_sae_config_from_huggingface(RELEASE, "blocks.5.hook_z")
    assert (cfg["architecture"], cfg["d_in"], cfg["reshape_activations"]) == (
        "standard",
        768,
        "hook_z",
    )
    meta = cfg["metadata"]
    assert {k: meta[k] for k in ("hook_name", "layer", "n_heads", "n_kv_heads", "d_head")} == {
        "hook_name": "blocks.5.attn.hook_z",
        "layer": 5,
        "n_heads": 12,
        "n_kv_heads": 12,
        "d_head": 64,
    }
    assert meta["value_bias_convention"] == "folded"
    assert meta["model_from_pretrained_kwargs"] == FROM_PRETRAINED_DEFAULTS
    assert meta["hf_architecture"] == "GPT2LMHeadModel"
    assert meta["hf_module_path"] == "transformer.h.5.attn.c_proj"
    assert (meta["model_name"], meta["context_size"], meta["dataset_path"]) == (
        "gpt2-small",
        128,
        "Skylion007/openwebtext",
    )
    assert meta["converted_from"]["config"]["l1_coeff"] == 1.0


@pytest.mark.parametrize("layer", range(12))
def test_from_pretrained_loads_every_layer(hub, layer) -> None:
    sae, cfg_dict, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(RELEASE, f"blocks.{layer}")
    original = torch.load(io.BytesIO(state_dict_bytes(D_IN, TINY[layer], seed=layer)))
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sae, key).detach(), original[key], rtol=0, atol=0)
    assert sae.cfg.d_sae == TINY[layer] and cfg_dict["d_sae"] == TINY[layer]
    assert sparsity is None  # Kissane et al.'s files have no feature sparsity
    assert sla.AttnSite.from_sae(sae) == sla.AttnSite(layer, 12, 12, 64)
    assert sae.cfg.metadata.model_from_pretrained_kwargs == FROM_PRETRAINED_DEFAULTS
    z = torch.randn(2, 3, 12, 64, generator=torch.Generator().manual_seed(layer))
    alias = SAE.from_pretrained(RELEASE, f"blocks.{layer}.hook_z")
    assert torch.equal(sae(z), alias(z)) and sae(z).shape == z.shape
    expected = torch.relu(
        (z.flatten(-2) - original["b_dec"]) @ original["W_enc"] + original["b_enc"]
    )
    torch.testing.assert_close(sae.encode(z), expected)


def test_outputs_match_saelens_own_kk_loader(hub) -> None:
    ours = SAE.from_pretrained(RELEASE, "blocks.3")
    theirs = SAE.from_pretrained("gpt2-small-hook-z-kk", "blocks.3.hook_z")
    z = torch.randn(4, 5, 12, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(z), theirs(z))
    assert theirs.cfg.metadata.n_heads is None and ours.cfg.metadata.n_heads == 12


def test_spliced_by_hooked_sae_transformer_as_by_our_backend(hub) -> None:
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=768, n_ctx=8, d_head=64, n_heads=12, d_vocab=32, attn_only=True,
        act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    model = HookedSAETransformer(cfg).eval()
    sae = SAE.from_pretrained(RELEASE, "blocks.0")
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    site = sla.AttnSite.from_sae(sae, model)
    with backend_for(model).splicing(
        {site: lambda z: sae.decode(sae.encode(z))}, convention="folded"
    ):
        ours = model(tokens)
    torch.testing.assert_close(model.run_with_saes(tokens, saes=[sae]), ours)
    assert not torch.allclose(ours, model(tokens))


def test_unknown_release_and_unknown_id_list_what_exists(hub) -> None:
    with pytest.raises(ValueError, match="Release gpt2-small-attn-zz not found"):
        SAE.from_pretrained("gpt2-small-attn-zz", "blocks.0")
    with pytest.raises(
        ValueError, match=r"unknown release 'gpt2-small-attn-zz'.*\['gpt2-small-attn-z'[,\]]"
    ):
        sla.get_release("gpt2-small-attn-zz")
    with pytest.raises(
        ValueError,
        match=r"ID blocks.12 not found in release gpt2-small-attn-z. Valid IDs are \['blocks.0', 'blocks.1'",
    ):
        SAE.from_pretrained(RELEASE, "blocks.12")
    with pytest.raises(
        ValueError,
        match=r"no SAE with id 'blocks.12'; valid ids: \['blocks.0'.*'blocks.11.hook_z'\]",
    ):
        sla.get_release(RELEASE).sae("blocks.12")


class Touch:
    """A pickle that runs code when unpickled without weights_only (it creates a file)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def bad_release(tmp_path, monkeypatch):
    """A release in Kissane et al.'s format whose SAEs are each broken in one way."""
    cache = use_hub_cache(monkeypatch, tmp_path)
    good = state_dict_bytes(D_IN, 8, seed=0)
    evil = io.BytesIO()
    torch.save({"W_enc": torch.zeros(D_IN, 8), "hook": Touch(tmp_path / "pwned")}, evil)
    files: dict[str, bytes | pathlib.Path] = {
        "shape.pt": state_dict_bytes(D_IN, 8, seed=0, W_enc=(D_IN, 4)),
        "nocfg.pt": good,
        "trunc.pt": good[: len(good) // 2],
        "evil.pt": evil.getvalue(),
        "badjson.pt": good,
        "nohead.pt": good,
        "empty.pt": b"",
        "emptycfg.pt": good,
        "listcfg.pt": good,
    }
    for name in ("shape", "trunc", "evil", "nohead", "empty"):
        files[f"{name}_cfg.json"] = json.dumps(kissane_cfg(0, 8)).encode()
    files["badjson_cfg.json"] = json.dumps(kissane_cfg(0, 8)).encode()[:40]
    files["emptycfg_cfg.json"] = b""
    files["listcfg_cfg.json"] = b"[1, 2]"
    add_repo(cache, "someone/broken-attn-saes", files)
    overrides = {"n_heads": 12}
    release = sla.Release(
        name="test-broken-kissane",
        repo_id="someone/broken-attn-saes",
        model="gpt2-small",
        saes=tuple(
            sla.ReleaseSAE(name, f"{name}.pt")
            for name in (
                "shape",
                "nocfg",
                "trunc",
                "evil",
                "badjson",
                "empty",
                "emptycfg",
                "listcfg",
            )
        ),
        conversion_func=KISSANE_CONVERSION_FUNC,
        config_overrides=overrides,
    )
    no_heads = sla.Release(
        name="test-kissane-no-heads",
        repo_id="someone/broken-attn-saes",
        model="gpt2-small",
        saes=(sla.ReleaseSAE("nohead", "nohead.pt"),),
        conversion_func=KISSANE_CONVERSION_FUNC,
    )
    sla.register_release(release)
    sla.register_release(no_heads)
    yield tmp_path
    sla.unregister_release(release.name)
    sla.unregister_release(no_heads.name)


def test_weights_whose_shapes_disagree_with_the_config_are_refused(bad_release) -> None:
    with pytest.raises(
        ValueError,
        match=r"weight shapes disagree with the config \(d_in=768, d_sae=8\): W_enc is \(768, 4\), expected \(768, 8\)",
    ):
        SAE.from_pretrained("test-broken-kissane", "shape")


def test_missing_config_file_is_named(bad_release) -> None:
    with pytest.raises(  # offline, a file missing from the cache may be missing from the repo
        ConnectionError,
        match=r"'nocfg_cfg.json' of 'someone/broken-attn-saes': offline mode is on",
    ):
        SAE.from_pretrained("test-broken-kissane", "nocfg")


def test_truncated_files_are_refused(bad_release) -> None:
    with pytest.raises(
        ValueError, match=r"trunc.pt is not a readable torch .pt file \(truncated or corrupt\)"
    ):
        SAE.from_pretrained("test-broken-kissane", "trunc")
    with pytest.raises(ValueError, match="badjson_cfg.json is not valid JSON"):
        SAE.from_pretrained("test-broken-kissane", "badjson")


def test_zero_byte_files_and_non_object_configs_are_named(bad_release) -> None:
    with pytest.raises(ValueError, match=r"empty.pt is not a readable torch .pt file"):
        SAE.from_pretrained("test-broken-kissane", "empty")
    with pytest.raises(ValueError, match="emptycfg_cfg.json is not valid JSON"):
        SAE.from_pretrained("test-broken-kissane", "emptycfg")
    with pytest.raises(ValueError, match="listcfg_cfg.json must hold a JSON object.*got list"):
        SAE.from_pretrained("test-broken-kissane", "listcfg")


def test_pickle_carrying_code_is_refused_without_running_it(bad_release) -> None:
    with pytest.raises(
        ValueError,
        match=r"refusing to load .*evil.pt: it is a pickle that carries code.*Unsupported global",
    ):
        SAE.from_pretrained("test-broken-kissane", "evil")
    assert not (bad_release / "pwned").exists()


def test_release_must_state_the_head_structure(bad_release) -> None:
    with pytest.raises(
        ValueError, match="do not record the number of heads; the release must give n_heads"
    ):
        SAE.from_pretrained("test-kissane-no-heads", "nohead")


def test_registration_is_idempotent(hub) -> None:
    import sae_lens.saes.sae as sae_module

    register_pretrained()
    register_pretrained()
    # SAELens's own function, never rebound: our releases are in the dict it caches
    assert sae_module.get_pretrained_saes_directory is get_pretrained_saes_directory
    assert type(get_pretrained_saes_directory).__name__ == "_lru_cache_wrapper"
    assert list(get_pretrained_saes_directory()).count(RELEASE) == 1
    assert (
        NAMED_PRETRAINED_SAE_LOADERS[KISSANE_CONVERSION_FUNC].__module__
        == "sae_lens_attn.pretrained.kissane"
    )
    assert KISSANE_CONVERSION_FUNC in NAMED_PRETRAINED_SAE_CONFIG_GETTERS
    assert SAE.from_pretrained(RELEASE, "blocks.2").cfg.d_sae == TINY[2]


def test_foreign_loader_under_our_name_is_an_error(monkeypatch) -> None:
    monkeypatch.setitem(
        NAMED_PRETRAINED_SAE_LOADERS, KISSANE_CONVERSION_FUNC, sae_lens_huggingface_loader
    )
    with pytest.raises(
        ValueError, match="'sae_lens_attn_kissane' is already registered by sae_lens.loading"
    ):
        register_pretrained()
