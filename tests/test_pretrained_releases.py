"""User releases: register_release, releases files named by SAE_LENS_ATTN_RELEASES, the format."""

from __future__ import annotations

import pathlib

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

import sae_lens_attn as sla
from sae_lens_attn.pretrained import dump_releases_yaml, parse_releases_yaml

from .hub_cache import add_repo, folder_files, use_hub_cache

REPO = "team/attn-saes"


def tiny_attn_sae(layer: int, seed: int) -> SAE:
    """A random standard SAE on hook_z of a 4-head × 8 site, as sae_lens_attn saves them."""
    sae = SAE.from_dict(
        {
            "architecture": "standard",
            "d_in": 32,
            "d_sae": 16,
            "reshape_activations": "hook_z",
            "metadata": {
                "hook_name": f"blocks.{layer}.attn.hook_z",
                "model_name": "tiny-attn",
                "layer": layer,
                "n_heads": 4,
                "n_kv_heads": 4,
                "d_head": 8,
                "value_bias_convention": "included",
            },
        }
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return sae


@pytest.fixture
def team_hub(tmp_path, monkeypatch) -> pathlib.Path:
    """A hub cache with two SAELens-native SAE folders in ``team/attn-saes``."""
    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    files = {}
    for layer in (0, 1):
        folder = tmp_path / "saes" / f"blocks.{layer}.attn.hook_z"
        tiny_attn_sae(layer, seed=layer).save_model(folder)
        files.update({f"{folder.name}/{k}": v for k, v in folder_files(folder).items()})
    add_repo(cache, REPO, files)
    return tmp_path


def team_release(name: str = "team-attn", ids: tuple[int, ...] = (0, 1)) -> sla.Release:
    return sla.Release(
        name=name,
        repo_id=REPO,
        model="tiny-attn",
        saes=tuple(sla.ReleaseSAE(f"L{n}", f"blocks.{n}.attn.hook_z", l0=3.5) for n in ids),
    )


@pytest.fixture
def registered():
    names: list[str] = []
    yield names
    for name in names:
        sla.unregister_release(name)


def test_yaml_format_round_trips_and_reads_as_saelens_reads() -> None:
    release = team_release()
    assert parse_releases_yaml(dump_releases_yaml([release])) == {"team-attn": release}
    directory = get_pretrained_saes_directory()
    for name in ("gpt2-small-res-jb", "gpt2-small-hook-z-kk", "gpt2-small-attn-z"):
        assert sla.Release.from_lookup(directory[name]).to_lookup() == directory[name]
    ours = sla.get_release("gpt2-small-attn-z")
    assert ours.to_lookup() == directory["gpt2-small-attn-z"]
    assert parse_releases_yaml(dump_releases_yaml([ours]))["gpt2-small-attn-z"] == ours


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"repo_id": "a/b", "model": "m"}, r"lacks \['saes'\]"),
        ({"repo_id": "a/b", "model": "m", "saes": [], "colour": 1}, r"unknown keys \['colour'\]"),
        ({"repo_id": "a/b", "model": "m", "saes": [{"id": "x"}]}, r"lacks \['path'\]"),
        ({"repo_id": "ab", "model": "m", "saes": [{"id": "x", "path": "p"}]}, "must be 'owner/name'"),
        ({"repo_id": "a/b", "model": "m", "saes": [{"id": "x", "path": "p", "l0": "many"}]}, "l0 must be a finite number"),
        ({"repo_id": "a/b", "model": "m", "saes": [{"id": "x", "path": "p"}] * 2}, "lists the SAE id 'x' twice"),
        ({"repo_id": "a/b", "model": "m", "saes": []}, "lists no SAEs"),
    ],
)  # fmt: skip
def test_invalid_release_entries_are_refused(entry, message) -> None:
    with pytest.raises(ValueError, match=rf"release 'r' in team.yaml.*{message}"):
        sla.Release.from_yaml_entry("r", entry, source="team.yaml")


def test_registered_release_resolves_by_name(team_hub, registered) -> None:
    release = sla.register_release(team_release())
    registered.append(release.name)
    sae = SAE.from_pretrained("team-attn", "L1")
    direct = SAE.load_from_disk(team_hub / "saes" / "blocks.1.attn.hook_z")
    z = torch.randn(2, 3, 4, 8)
    assert torch.equal(sae(z), direct(z))
    assert get_pretrained_saes_directory()["team-attn"].expected_l0 == {"L0": 3.5, "L1": 3.5}
    assert sla.register_release(team_release()) == release  # the same again: nothing changes
    with pytest.raises(
        ValueError, match="already registered with different contents; pass replace=True"
    ):
        sla.register_release(team_release(ids=(0,)))
    sla.register_release(team_release(ids=(0,)), replace=True)
    with pytest.raises(
        ValueError, match=r"ID L1 not found in release team-attn. Valid IDs are \['L0'\]"
    ):
        SAE.from_pretrained("team-attn", "L1")
    sla.unregister_release("team-attn")
    registered.clear()
    with pytest.raises(ValueError, match="Release team-attn not found"):
        SAE.from_pretrained("team-attn", "L0")
    with pytest.raises(
        ValueError, match=r"no release 'team-attn' was registered.*registered: \[(?!.*team-attn)"
    ):
        sla.unregister_release("team-attn")


def test_release_names_of_saelens_and_of_this_package_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match="'gpt2-small-res-jb' is already a SAELens release .repo jbloom/GPT2-Small-SAEs-Reformatted",
    ):
        sla.register_release(team_release("gpt2-small-res-jb"))
    with pytest.raises(ValueError, match="'gpt2-small-attn-z' is a release of sae_lens_attn"):
        sla.register_release(team_release("gpt2-small-attn-z"))
    with pytest.raises(
        ValueError, match="contains '/': SAELens reads such names as Hugging Face repository ids"
    ):
        team_release("team/attn")
    bad = sla.Release(
        name="odd",
        repo_id=REPO,
        model="m",
        saes=(sla.ReleaseSAE("a", "a"),),
        conversion_func="magic",
    )
    with pytest.raises(
        ValueError,
        match=r"unknown conversion_func 'magic'; valid: \[.*'sae_lens'.*'sae_lens_attn_kissane'",
    ):
        sla.register_release(bad)


def test_releases_file_named_by_environment_resolves_by_name(team_hub, monkeypatch) -> None:
    first = team_hub / "team.yaml"
    first.write_text(dump_releases_yaml([team_release("team-file", ids=(0,))]))
    second = team_hub / "more.yaml"
    second.write_text(dump_releases_yaml([team_release("team-file-2", ids=(1,))]))
    monkeypatch.setenv(sla.RELEASES_ENV_VAR, f"{first}:{second}")
    assert SAE.from_pretrained("team-file", "L0").cfg.metadata.layer == 0
    assert SAE.from_pretrained("team-file-2", "L1").cfg.metadata.layer == 1
    assert sla.get_release("team-file").ids == ["L0"]
    first.write_text(dump_releases_yaml([team_release("team-file", ids=(0, 1))]))  # edited
    assert SAE.from_pretrained("team-file", "L1").cfg.metadata.layer == 1
    monkeypatch.delenv(sla.RELEASES_ENV_VAR)
    assert "team-file" not in get_pretrained_saes_directory()
    with pytest.raises(ValueError, match=r"unknown release 'team-file'"):
        sla.get_release("team-file")


def test_releases_file_errors_name_the_file(team_hub, monkeypatch) -> None:
    path = team_hub / "team.yaml"
    monkeypatch.setenv(sla.RELEASES_ENV_VAR, str(path))
    with pytest.raises(
        FileNotFoundError, match="SAE_LENS_ATTN_RELEASES names .*team.yaml', which does not exist"
    ):
        get_pretrained_saes_directory()
    path.write_text(dump_releases_yaml([team_release("gpt2-small-res-jb")]))
    with pytest.raises(
        ValueError,
        match="release 'gpt2-small-res-jb' in a releases file named by SAE_LENS_ATTN_RELEASES .* collides with SAELens's release",
    ):
        SAE.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    path.write_text(dump_releases_yaml([team_release("gpt2-small-attn-z")]))
    with pytest.raises(ValueError, match="'gpt2-small-attn-z' in .*team.yaml .* is defined twice"):
        get_pretrained_saes_directory()
    path.write_text("team-attn:\n  repo_id: team/attn-saes\n  saes: []\n")
    with pytest.raises(ValueError, match=r"release 'team-attn' in .*team.yaml lacks \['model'\]"):
        get_pretrained_saes_directory()
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="team.yaml must map release names to releases"):
        get_pretrained_saes_directory()
    monkeypatch.delenv(sla.RELEASES_ENV_VAR)
    assert "gpt2-small-attn-z" in get_pretrained_saes_directory()  # fixed by unsetting it
