"""User releases: register_release, releases files named by SAE_LENS_ATTN_RELEASES, the format."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading import pretrained_saes_directory as saes_directory
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_LOADERS,
    get_conversion_loader_name,
)
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

import sae_lens_attn as sla
from sae_lens_attn.cli.main import main
from sae_lens_attn.pretrained import dump_releases_yaml, parse_releases_yaml, register_pretrained

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
    register_pretrained()  # the variable changed after import
    assert SAE.from_pretrained("team-file", "L0").cfg.metadata.layer == 0
    assert SAE.from_pretrained("team-file-2", "L1").cfg.metadata.layer == 1
    assert sla.get_release("team-file").ids == ["L0"]
    first.write_text(dump_releases_yaml([team_release("team-file", ids=(0, 1))]))  # edited
    register_pretrained()
    assert SAE.from_pretrained("team-file", "L1").cfg.metadata.layer == 1
    monkeypatch.delenv(sla.RELEASES_ENV_VAR)
    register_pretrained()
    assert "team-file" not in get_pretrained_saes_directory()
    with pytest.raises(ValueError, match=r"unknown release 'team-file'"):
        sla.get_release("team-file")


class LoaderReached(Exception):
    """Raised by a stand-in for SAELens's own loader, so nothing is downloaded."""


def bad_releases_files(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """Releases files that cannot be used, each with (a regex of) the reason it is left out."""
    good = team_release("team-good", ids=(0,))
    cases = {
        "missing": (folder / "missing.yaml", "cannot be read .FileNotFoundError"),
        "folder": (folder / "a-folder", "cannot be read .IsADirectoryError"),
        "binary": (folder / "weights.bin", "is not a text file"),
        "nul": (folder / "nul.yaml", "is not a text file .it holds NUL bytes"),
        "yaml": (folder / "broken.yaml", "is not valid YAML"),
        "list": (folder / "list.yaml", "must map release names to releases"),
        "release": (folder / "nomodel.yaml", r"release 'team-attn' in .*nomodel.yaml lacks \['model'\]"),
        "twice": (folder / "twice.yaml", "lists the SAE id 'L0' twice"),
        "key twice": (folder / "keys.yaml", "gives the key 'team-dup' twice .line 3"),
        "saelens": (folder / "saelens.yaml", "'gpt2-small-res-jb' in .*saelens.yaml is left out: SAELens has a release of the same name"),
        "ours": (folder / "ours.yaml", "'gpt2-small-attn-z' in .*ours.yaml is left out: it is a release of sae_lens_attn"),
        "each other": (folder / "again.yaml", "'team-good' in .*again.yaml is left out: it is also in .*good.yaml"),
    }  # fmt: skip
    (folder / "a-folder").mkdir()
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "nul.yaml").write_bytes(b"team: \x00\x01\n")
    (folder / "broken.yaml").write_text("team: [unclosed\n")
    (folder / "list.yaml").write_text("- just\n- a list\n")
    (folder / "nomodel.yaml").write_text("team-attn:\n  repo_id: team/attn-saes\n  saes: []\n")
    entry = dump_releases_yaml([team_release("team-twice", ids=(0,))])
    (folder / "twice.yaml").write_text(
        entry.replace("  saes:\n", "  saes:\n  - id: L0\n    path: p\n")
    )
    (folder / "keys.yaml").write_text(
        "team-dup: {repo_id: a/b, model: m, saes: [{id: x, path: p}]}\n\nteam-dup: {}\n"
    )
    (folder / "saelens.yaml").write_text(dump_releases_yaml([team_release("gpt2-small-res-jb")]))
    (folder / "ours.yaml").write_text(dump_releases_yaml([team_release("gpt2-small-attn-z")]))
    (folder / "good.yaml").write_text(dump_releases_yaml([good]))
    (folder / "again.yaml").write_text(dump_releases_yaml([good]))
    return cases


def test_bad_releases_files_warn_once_and_never_break_saelens_releases(
    team_hub, monkeypatch
) -> None:
    cases = bad_releases_files(team_hub)
    paths = [str(path) for path, _ in cases.values()]
    paths.insert(len(paths) - 1, str(team_hub / "good.yaml"))  # good.yaml before again.yaml
    monkeypatch.setenv(sla.RELEASES_ENV_VAR, os.pathsep.join(paths))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_pretrained()
    messages = [str(w.message) for w in caught]
    assert all(m.startswith(sla.RELEASES_ENV_VAR) for m in messages), messages
    for name, (path, reason) in cases.items():
        hits = [m for m in messages if str(path) in m and re.search(reason, m)]
        assert len(hits) == 1, (name, messages)
    assert len(messages) == len(cases)
    with warnings.catch_warnings(record=True) as again:  # once: not at every lookup
        warnings.simplefilter("always")
        register_pretrained()
        sla.get_release("team-good")
    assert not again

    directory = get_pretrained_saes_directory()
    assert sla.get_release("team-good") == team_release("team-good", ids=(0,))  # good file kept
    saelens_own = directory["gpt2-small-res-jb"]  # SAELens's entry, not the colliding one
    assert saelens_own.repo_id == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert get_conversion_loader_name("gpt2-small-res-jb") == "sae_lens"
    assert directory["gpt2-small-attn-z"] == sla.get_release("gpt2-small-attn-z").to_lookup()
    assert (
        sla.get_release("gpt2-small-attn-z").repo_id == "ckkissane/attn-saes-gpt2-small-all-layers"
    )

    calls = []

    def saelens_loader(**kwargs):
        calls.append((kwargs["repo_id"], kwargs["folder_name"]))
        raise LoaderReached

    monkeypatch.setitem(NAMED_PRETRAINED_SAE_LOADERS, "sae_lens", saelens_loader)
    with pytest.raises(LoaderReached):  # the lookup resolved; SAELens's own loader was called
        SAE.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    assert calls == [
        ("jbloom/GPT2-Small-SAEs-Reformatted", saelens_own.saes_map["blocks.0.hook_resid_pre"])
    ]
    monkeypatch.delenv(sla.RELEASES_ENV_VAR)
    register_pretrained()
    assert "team-good" not in get_pretrained_saes_directory()


@pytest.mark.slow
def test_a_releases_file_named_before_import_only_warns_in_a_fresh_process(tmp_path) -> None:
    missing = tmp_path / "nowhere.yaml"
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import sae_lens_attn\n"
        "from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory\n"
        "print([str(w.message) for w in caught if 'SAE_LENS_ATTN' in str(w.message)])\n"
        "print(get_pretrained_saes_directory()['gpt2-small-res-jb'].repo_id)\n"
    )
    env = {**os.environ, sla.RELEASES_ENV_VAR: str(missing)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    warned, repo = out.stdout.strip().splitlines()[-2:]
    assert warned.count(sla.RELEASES_ENV_VAR) == 1 and str(missing) in warned
    assert repo == "jbloom/GPT2-Small-SAEs-Reformatted"


@pytest.mark.slow
def test_saelens_behaviour_the_directory_relies_on() -> None:
    """Pins what sae_lens_attn.pretrained.directory needs of SAELens: one cached dict, read by
    every lookup through the one function, which nothing rebinds."""
    import sae_lens.evals
    import sae_lens.loading.pretrained_sae_loaders as loaders
    import sae_lens.saes.sae as sae_module

    for module in (sae_module, loaders, sae_lens.evals):
        assert module.get_pretrained_saes_directory is get_pretrained_saes_directory
    assert type(get_pretrained_saes_directory).__name__ == "_lru_cache_wrapper"
    assert get_pretrained_saes_directory.__module__ == "sae_lens.loading.pretrained_saes_directory"
    assert get_pretrained_saes_directory() is get_pretrained_saes_directory()
    assert sae_module.NAMED_PRETRAINED_SAE_LOADERS is NAMED_PRETRAINED_SAE_LOADERS
    assert "gpt2-small-attn-z" in get_pretrained_saes_directory()
    assert saes_directory.get_repo_id_and_folder_name("gpt2-small-attn-z", "blocks.3")[0] == (
        "ckkissane/attn-saes-gpt2-small-all-layers"
    )
    get_pretrained_saes_directory.cache_clear()  # a new dict, from SAELens's YAML alone
    assert "gpt2-small-attn-z" not in get_pretrained_saes_directory()
    assert "gpt2-small-res-jb" in get_pretrained_saes_directory()
    assert list(sla.pretrained.list_releases()) == ["gpt2-small-attn-z", "stdlib-2l-attn-z"]
    assert "gpt2-small-attn-z" in get_pretrained_saes_directory()


def test_register_release_takes_only_releases() -> None:
    entry = team_release().to_yaml_entry()
    for given in (entry, "team-attn", None):
        with pytest.raises(
            TypeError,
            match=r"register_release expects a sae_lens_attn.Release, got .*supported: Release",
        ):
            sla.register_release(given)  # type: ignore[arg-type]


def test_two_saes_of_one_release_never_share_an_id(tmp_path, capsys) -> None:
    saes = {"L0": tiny_attn_sae(0, seed=0), "l0": tiny_attn_sae(1, seed=1)}
    with pytest.raises(ValueError, match="SAE ids 'L0' and 'l0' name the same folder"):
        sla.publish(saes, tmp_path / "out", release="x", repo_id="me/x")
    folders = []
    for parent in ("a", "b"):  # two folders of the same name
        folder = tmp_path / parent / "blocks.0.attn.hook_z"
        tiny_attn_sae(0, seed=len(folders)).save_model(folder)
        folders.append(str(folder))
    argv = [
        "publish",
        *folders,
        "--release",
        "x",
        "--repo-id",
        "me/x",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "SAE ids ['blocks.0.attn.hook_z'] are given to more than one" in capsys.readouterr().err
    assert main([*argv, "--id", "a", "--id", "a"]) == 2
    assert "SAE ids ['a'] are given to more than one" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()
