"""Publishing: native folders, model card, upstream kit, Hub push, round trips through the Hub cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, cast

import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from sae_lens import SAE
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.training.activation_scaler import ActivationScaler
from safetensors.torch import load_file

import sae_lens_attn as sla
from sae_lens_attn.cli.main import main
from sae_lens_attn.outputs import OUTPUT_MARKER
from sae_lens_attn.pretrained.model_card import head_shares

from .hub_cache import add_repo, folder_files, use_hub_cache

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs"
)

RELEASE = "tiny-attn-z"
REPO = "me/tiny-attn-z"
IDS = ("blocks.0.attn.hook_z", "blocks.1.attn.hook_z")


def make_saes(model, seed: int = 0) -> dict[str, SAE]:
    """Random standard SAEs on both layers of the test model, configured by sae_lens_attn."""
    saes = {}
    for layer, sae_id in enumerate(IDS):
        cfg = sla.attn_sae_training_config(model, layer, "standard", d_sae=48)
        cfg.metadata.model_name = "tiny-attn"  # type: ignore[attr-defined]
        sae = SAE.from_dict(cfg.get_inference_sae_cfg_dict())
        g = torch.Generator().manual_seed(seed + layer)
        scale, shift = {"W_enc": 0.3, "W_dec": 0.3, "b_enc": 1.0, "b_dec": 0.1}, {"b_enc": -1.5}
        with torch.no_grad():
            for name, param in sae.named_parameters():  # sparse: b_enc is mostly negative
                param.copy_(
                    torch.randn(param.shape, generator=g) * scale[name] + shift.get(name, 0)
                )
        saes[sae_id] = sae
    return saes


@pytest.fixture(scope="module")
def published(model, tokens, tmp_path_factory) -> sla.PublishResult:
    out = tmp_path_factory.mktemp("publish") / "tiny-attn-z"
    return sla.publish(
        make_saes(model),
        out,
        release=RELEASE,
        repo_id=REPO,
        model=model,
        tokens=tokens,
        exclude_tokens=[0],
        links={"model": "https://example.org/tiny-attn"},
        progress=False,
    )


@pytest.fixture
def hub(published, tmp_path, monkeypatch) -> pathlib.Path:
    """The published folder as the Hub would serve it (``upstream/`` is never uploaded)."""
    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    add_repo(cache, REPO, folder_files(published.out_dir, skip=("upstream", OUTPUT_MARKER)))
    return cache


def test_published_folders_are_saelens_native_with_attention_metadata(published) -> None:
    assert sorted(p.name for p in published.out_dir.iterdir()) == sorted(
        [*IDS, "README.md", "upstream", OUTPUT_MARKER]
    )
    for layer, sae_id in enumerate(IDS):
        folder = published.out_dir / sae_id
        assert sorted(p.name for p in folder.iterdir()) == [
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
        ]
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["reshape_activations"] == "hook_z" and cfg["architecture"] == "standard"
        meta = cfg["metadata"]
        assert (meta["hook_name"], meta["layer"], meta["n_heads"], meta["d_head"]) == (
            sae_id,
            layer,
            4,
            8,
        )
        assert meta["model_name"] == "tiny-attn" and meta["value_bias_convention"] == "included"
        log_sparsity = load_file(folder / "sparsity.safetensors")["sparsity"]
        assert log_sparsity.shape == (48,) and log_sparsity.max() <= 1e-9  # log10(density + 1e-10)
        dead = 100 * (log_sparsity < -9.9).float().mean().item()
        assert published.metrics[sae_id].dead_pct == pytest.approx(dead)
    assert not [p for p in published.out_dir.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_measured_metrics_are_the_numbers_saelens_evals_compute(published, model, tokens) -> None:
    """l0 and explained variance (what SAELens's benchmark checks) and CE loss recovered."""

    class TokenBatches:
        """Hands SAELens's evals our tokens in order: the one thing they ask of a store."""

        def __init__(self) -> None:
            self.batches = iter(tokens.split(8))

        def get_batch_tokens(self, n: int) -> torch.Tensor:
            batch = next(self.batches)
            assert batch.shape[0] == n
            return batch

    for sae_id, sae in make_saes(model).items():
        sae.turn_off_forward_pass_hook_z_reshaping()  # SAELens's evals flatten hook_z themselves
        sparsity, features = get_sparsity_and_variance_metrics(
            sae, model, cast(Any, TokenBatches()), ActivationScaler(), n_batches=3, compute_l2_norms=False,
            compute_sparsity_metrics=True, compute_variance_metrics=True,
            compute_featurewise_density_statistics=True, eval_batch_size_prompts=8,
            model_kwargs={}, ignore_tokens=[0],
        )  # fmt: skip
        recons = get_downstream_reconstruction_metrics(
            sae, model, cast(Any, TokenBatches()), ActivationScaler(), compute_kl=False, compute_ce_loss=True,
            n_batches=3, eval_batch_size_prompts=8,
        )  # fmt: skip
        ours = published.metrics[sae_id]
        assert ours.n_tokens == tokens.numel() - tokens.shape[0]  # every BOS left out
        assert ours.l0 == pytest.approx(sparsity["l0"], rel=1e-5)
        assert 0 < ours.l0 < 48
        assert ours.explained_variance == pytest.approx(sparsity["explained_variance"], abs=1e-5)
        assert ours.ce_loss_recovered == pytest.approx(recons["ce_loss_score"], rel=1e-4)
        dead = 100 * (torch.tensor(features["feature_density"]) == 0).double().mean().item()
        assert ours.dead_pct == pytest.approx(dead)


def test_model_card_reports_metrics_head_attribution_and_loading(published, model) -> None:
    card = published.model_card.read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    for sae_id, m in published.metrics.items():
        row = next(line for line in card.splitlines() if line.startswith(f"| `{sae_id}` | `"))
        for value in (f"{m.l0:.2f}", f"{m.ce_loss_recovered:.3f}", f"{m.dead_pct:.1f}"):
            assert f"| {value} |" in row
        assert f"measured on {m.n_tokens} tokens (included z)" in card
    # each head's share of the decoder norm, averaged over live features, by hand (4 heads × 8)
    W_dec = make_saes(model)[IDS[1]].W_dec.detach().double()
    norms = torch.stack([W_dec[:, h * 8 : (h + 1) * 8].norm(dim=1) for h in range(4)], dim=1)
    live = norms.sum(1) > 0
    expected = (norms[live] / norms[live].sum(1, keepdim=True)).mean(0)
    row = next(line for line in card.splitlines() if line.startswith(f"| `{IDS[1]}` | h"))
    shown = [float(value) for value in row.rstrip(" |").split("|")[-1].split()]
    assert shown == pytest.approx(expected.tolist(), abs=5e-4)
    assert f'SAE.from_pretrained("{REPO}", "{IDS[0]}")' in card
    assert f'SAE.from_pretrained("{RELEASE}", "{IDS[0]}")' in card


def test_head_attribution_of_a_decoder_writing_to_one_head() -> None:
    site = sla.AttnSite(layer=0, n_heads=4, n_kv_heads=4, d_head=8)
    W_dec = torch.zeros(6, 32)
    W_dec[:5, 16:24] = torch.randn(5, 8)  # head 2 only; the last feature is dead (all zero)
    torch.testing.assert_close(head_shares(W_dec, site), torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_card_head_shares_are_head_attribution_averaged_over_live_features(model) -> None:
    sae = make_saes(model)[IDS[0]]
    with torch.no_grad():
        sae.W_dec[5] = 0.0  # a dead feature: no share, left out of the mean
    site = sla.AttnSite.from_sae(sae)
    rows = sla.analysis.head_attribution(sae)
    live = [f for f in range(sae.cfg.d_sae) if f != 5]
    torch.testing.assert_close(head_shares(sae.W_dec, site), rows[live].mean(0))
    with pytest.raises(ValueError, match="every decoder row is zero"):
        head_shares(torch.zeros_like(sae.W_dec), site)


def test_the_card_names_the_installed_version_without_importing_the_package(
    published, monkeypatch
) -> None:
    from sae_lens_attn.pretrained import publishing

    installed = importlib.metadata.version("sae-lens-attn")
    assert publishing.package_version() == installed
    card = (published.out_dir / "README.md").read_text()
    assert f"Written by sae-lens-attn {installed} (SAELens " in card
    source = inspect.getsource(publishing)
    assert "from sae_lens_attn import" not in source and "import sae_lens_attn\n" not in source

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(publishing, "version", not_installed)
    assert publishing.package_version() == publishing.UNKNOWN_VERSION == "0+unknown"


def test_yaml_entry_is_what_saelens_reads(published) -> None:
    entry = yaml.safe_load(published.yaml_entry.read_text())
    assert list(entry) == [RELEASE]
    release = sla.Release.from_yaml_entry(RELEASE, entry[RELEASE])
    assert release == published.release
    assert (release.repo_id, release.model, release.conversion_func) == (REPO, "tiny-attn", None)
    for sae in release.saes:
        assert sae.path == sae.id
        assert sae.l0 == round(published.metrics[sae.id].l0, 2)  # type: ignore[arg-type]
        assert sae.variance_explained == round(published.metrics[sae.id].explained_variance, 4)  # type: ignore[arg-type]


def test_emitted_loader_test_passes_against_the_published_release(
    published, hub, monkeypatch
) -> None:
    monkeypatch.setenv(sla.RELEASES_ENV_VAR, str(published.yaml_entry))
    sla.pretrained.register_pretrained()  # reads the variable set after import
    spec = importlib.util.spec_from_file_location("emitted_loader_test", published.loader_test)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()
    monkeypatch.delenv(sla.RELEASES_ENV_VAR)
    sla.pretrained.register_pretrained()
    assert RELEASE not in get_pretrained_saes_directory()


PLUGIN_SCRIPT = """
import socket, sys, torch
def refuse(*args, **kwargs):
    raise OSError("this process must not reach the network")
socket.socket.connect = refuse
socket.create_connection = refuse
import sae_lens_attn  # registers gpt2-small-attn-z and reads SAE_LENS_ATTN_RELEASES
from sae_lens import SAE
z = torch.load({z_path!r})
out = {{}}
for sae_id in {ids!r}:
    sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity({release!r}, sae_id)
    out[sae_id] = (sae(z), sparsity, sae_lens_attn.AttnSite.from_sae(sae).layer)
torch.save(out, {out_path!r})
"""

VANILLA_SCRIPT = """
import sys, torch
from sae_lens import SAE
z = torch.load({z_path!r})
out = {{sae_id: SAE.from_pretrained({repo!r}, sae_id)(z) for sae_id in {ids!r}}}
assert "sae_lens_attn" not in sys.modules, "the vanilla check imported the plugin"
torch.save(out, {out_path!r})
"""


@pytest.mark.slow
def test_round_trip_in_fresh_processes_by_release_and_by_repo_id(
    published, hub, model, tmp_path
) -> None:
    z = torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(3))
    z_path, plugin_out, vanilla_out = (tmp_path / n for n in ("z.pt", "plugin.pt", "vanilla.pt"))
    torch.save(z, z_path)
    env = {**os.environ, sla.RELEASES_ENV_VAR: str(published.yaml_entry)}
    plugin = PLUGIN_SCRIPT.format(
        z_path=str(z_path), ids=IDS, release=RELEASE, out_path=str(plugin_out)
    )
    subprocess.run([sys.executable, "-c", plugin], check=True, env=env, timeout=300)
    env.pop(sla.RELEASES_ENV_VAR)
    vanilla = VANILLA_SCRIPT.format(
        z_path=str(z_path), ids=IDS, repo=REPO, out_path=str(vanilla_out)
    )
    subprocess.run([sys.executable, "-c", vanilla], check=True, env=env, timeout=300)
    by_release, by_repo = torch.load(plugin_out), torch.load(vanilla_out)
    for layer, (sae_id, sae) in enumerate(make_saes(model).items()):
        expected = sae(z)
        out, sparsity, site_layer = by_release[sae_id]
        assert torch.equal(out, expected) and torch.equal(by_repo[sae_id], expected)
        assert site_layer == layer
        written = load_file(published.sae_dirs[sae_id] / "sparsity.safetensors")["sparsity"]
        assert torch.equal(sparsity, written)


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi`` offline: every call must bind to the real method's
    signature, and a commit is written as a new revision of a local Hub cache."""

    def __init__(self, cache: pathlib.Path) -> None:
        self.cache = cache
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        inspect.signature(HfApi.create_repo).bind(self, **kwargs)
        self.calls.append(("create_repo", kwargs))

    def create_commit(self, **kwargs):
        inspect.signature(HfApi.create_commit).bind(self, **kwargs)
        operations = list(kwargs["operations"])
        assert all(isinstance(op, CommitOperationAdd) for op in operations)
        snapshot = add_repo(
            self.cache,
            kwargs["repo_id"],
            {op.path_in_repo: pathlib.Path(str(op.path_or_fileobj)) for op in operations},
        )
        self.calls.append(("create_commit", {**kwargs, "operations": operations}))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{snapshot.name}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid=snapshot.name,
        )


def test_push_creates_the_repo_and_one_commit_without_upstream(
    published, tmp_path, monkeypatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    hub = FakeHub(cache)
    metrics = {sae_id: m.as_dict() for sae_id, m in published.metrics.items()}
    result = sla.publish(
        published.sae_dirs, tmp_path / "out", release="pushed-attn-z", repo_id="me/pushed",
        metrics=metrics, push=True, hf_api=hub, private=True,
    )  # fmt: skip
    assert [name for name, _ in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][1] == {
        "repo_id": "me/pushed",
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    uploaded = sorted(op.path_in_repo for op in hub.calls[1][1]["operations"])
    assert uploaded == sorted(
        ["README.md"]
        + [
            f"{i}/{f}"
            for i in IDS
            for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
        ]
    )
    assert result.commit is not None and len(result.commit) == 40
    pushed = SAE.from_pretrained("me/pushed", IDS[1])
    z = torch.randn(3, 4, 8)
    assert torch.equal(pushed(z), SAE.load_from_disk(published.sae_dirs[IDS[1]])(z))
    assert result.metrics == {k: sla.SAEMetrics.from_mapping(v) for k, v in metrics.items()}


def test_given_metrics_are_reported_and_missing_ones_never_invented(published, tmp_path) -> None:
    result = sla.publish(
        published.sae_dirs, tmp_path / "out", release="given-attn-z", repo_id="me/given",
        metrics={IDS[0]: {"l0": 7.25, "explained_variance": 0.5}},
    )  # fmt: skip
    card = result.model_card.read_text()
    assert f"| `{IDS[0]}` | `{IDS[0]}` | 4 × 8 | standard | 48 | 7.25 | — | — | 0.500 |" in card
    assert f"| `{IDS[1]}` | `{IDS[1]}` | 4 × 8 | standard | 48 | — | — | — | — |" in card
    entry = yaml.safe_load(result.yaml_entry.read_text())["given-attn-z"]
    assert entry["saes"] == [
        {"id": IDS[0], "path": IDS[0], "l0": 7.25, "variance_explained": 0.5},
        {"id": IDS[1], "path": IDS[1]},
    ]
    with pytest.raises(
        ValueError,
        match=r"unknown metrics \['l1'\] for SAE 'blocks.0.attn.hook_z'; valid: \['l0', 'ce_loss_recovered', 'dead_pct', 'explained_variance'\]",
    ):
        sla.publish(
            published.sae_dirs,
            tmp_path / "o2",
            release="x",
            repo_id="me/x",
            metrics={IDS[0]: {"l1": 1.0}},
        )
    with pytest.raises(ValueError, match=r"metrics given for unknown SAE ids \['blocks.7'\]"):
        sla.publish(
            published.sae_dirs,
            tmp_path / "o3",
            release="x",
            repo_id="me/x",
            metrics={"blocks.7": {"l0": 1.0}},
        )


def test_publishing_never_overwrites_without_overwrite_and_is_atomic(
    published, model, tmp_path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    kwargs: dict[str, Any] = {"release": "safe-attn-z", "repo_id": "me/safe"}
    for overwrite in (False, True):  # a folder of the user's files is never replaced
        with pytest.raises(
            FileExistsError,
            match=r"refusing to write into .*out: it holds files that sae-lens-attn did not write "
            r"\('keep.txt'; no ",
        ):
            sla.publish(published.sae_dirs, out, overwrite=overwrite, **kwargs)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    sla.publish(published.sae_dirs, out, **kwargs)  # an empty folder is written into
    with pytest.raises(FileExistsError, match="earlier release output of sae-lens-attn; pass"):
        sla.publish(published.sae_dirs, out, **kwargs)
    sla.publish(published.sae_dirs, out, overwrite=True, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*IDS, "README.md", "upstream", OUTPUT_MARKER]
    )
    with pytest.raises(ValueError, match="has no feature densities for sparsity.safetensors"):
        sla.publish(make_saes(model), tmp_path / "never", **kwargs)  # SAE objects, nothing measured
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_bad_publish_inputs_are_refused(published, model, tmp_path) -> None:
    dirs = published.sae_dirs
    with pytest.raises(ValueError, match="'gpt2-small-res-jb' is already a SAELens release"):
        sla.publish(dirs, tmp_path / "a", release="gpt2-small-res-jb", repo_id="me/x")
    with pytest.raises(ValueError, match="release name 'me/x' contains '/'"):
        sla.publish(dirs, tmp_path / "a", release="me/x", repo_id="me/x")
    with pytest.raises(ValueError, match="invalid SAE id '../escape'"):
        sla.publish({"../escape": dirs[IDS[0]]}, tmp_path / "a", release="x", repo_id="me/x")
    with pytest.raises(ValueError, match="pass both model= and tokens=, or neither"):
        sla.publish(dirs, tmp_path / "a", release="x", repo_id="me/x", model=model)
    with pytest.raises(ValueError, match=r"model_name='gpt2' but the SAEs record"):
        sla.publish(dirs, tmp_path / "a", release="x", repo_id="me/x", model_name="gpt2")
    plain = SAE.load_from_disk(dirs[IDS[0]])
    plain.cfg.reshape_activations = "none"
    with pytest.raises(
        ValueError, match="has reshape_activations='none'; published attention SAEs take z as"
    ):
        sla.publish({"plain": plain}, tmp_path / "a", release="x", repo_id="me/x")
    with pytest.raises(
        FileNotFoundError,
        match=r"is not a saved SAE folder, it lacks \['cfg.json', 'sae_weights.safetensors'\]",
    ):
        sla.publish({"empty": tmp_path}, tmp_path / "a", release="x", repo_id="me/x")
    assert not (tmp_path / "a").exists()


def test_cli_publish_writes_the_release_and_refuses_to_overwrite(
    published, tmp_path, capsys
) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({sae_id: m.as_dict() for sae_id, m in published.metrics.items()}))
    out = tmp_path / "cli-out"
    argv = ["publish", *map(str, published.sae_dirs.values()), "--release", "cli-attn-z",
            "--repo-id", "me/cli", "--out", str(out), "--link", "model=https://example.org/tiny"]  # fmt: skip
    assert main([*argv, "--metrics", str(metrics)]) == 0
    stdout = capsys.readouterr().out
    entry = yaml.safe_load(stdout[stdout.index("# Entry for SAELens") :])["cli-attn-z"]
    assert [sae["id"] for sae in entry["saes"]] == list(IDS)  # ids default to folder names
    assert entry["links"] == {"model": "https://example.org/tiny"}
    assert [sae["l0"] for sae in entry["saes"]] == [
        round(published.metrics[sae_id].l0, 2)  # type: ignore[arg-type]
        for sae_id in IDS
    ]
    assert (out / "upstream" / "test_cli_attn_z.py").is_file()
    assert main(argv) == 1
    assert "earlier release output of sae-lens-attn; pass" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--id", "a", "--id", "b"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [OUTPUT_MARKER, "README.md", "a", "b", "upstream"]
    assert main([*argv, "--id", "only-one"]) == 2
    assert "1 --id for 2 SAE folders" in capsys.readouterr().err
