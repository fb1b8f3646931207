"""The command line: help of every subcommand, version, count flags, the error boundary,
releases."""

from __future__ import annotations

import argparse
import json
import re
from importlib.resources import files
from typing import Any

import pytest
import sae_lens
import yaml

import sae_lens_attn as sla
from sae_lens_attn.cli import info
from sae_lens_attn.cli.main import SUBCOMMANDS, build_parser, main


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def count_flags() -> list[tuple[str, str, int]]:
    """(subcommand, flag, minimum) of every option whose type is ``arguments.count``."""
    found = []
    for name, sub in subparsers().items():
        for action in sub._actions:
            parse: Any = action.type
            if getattr(parse, "__name__", None) == "count":
                minimum = 0 if _accepts(parse, "0") else 1
                found.append((name, action.option_strings[0], minimum))
    return found


def _accepts(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except argparse.ArgumentTypeError:
        return False
    return True


def test_every_subcommand_is_one_module_of_the_list() -> None:
    assert sorted(subparsers()) == sorted(m.__name__.rsplit(".", 1)[-1] for m in SUBCOMMANDS)
    assert {"info", "releases", "analyze", "evaluate", "dashboard", "demo", "publish"} <= set(
        subparsers()
    )


def test_top_level_help_lists_every_subcommand_and_the_exit_status(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-lens-attn")
    for name in subparsers():
        assert re.search(rf"\n    {name}\s", out), name
    assert "--version" in out and "--debug" in out and "130  interrupted" in out


@pytest.mark.parametrize("name", sorted(subparsers()))
def test_help_of_every_subcommand(name, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sae-lens-attn {name}")
    assert "--debug" in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == (
        f"sae-lens-attn {sla.__version__} (SAELens {sae_lens.__version__})\n"
    )


def test_count_flags_are_counts() -> None:
    found = {(name, flag) for name, flag, _ in count_flags()}
    expected = {
        ("analyze", "--top"), ("analyze", "--context-size"), ("analyze", "--max-prompts"),
        ("evaluate", "--context-size"), ("evaluate", "--max-prompts"),
        ("evaluate", "--batch-size"), ("dashboard", "--top"), ("dashboard", "--contexts"),
        ("dashboard", "--context-size"), ("dashboard", "--max-prompts"),
        ("demo", "--train-tokens"), ("demo", "--eval-contexts"), ("demo", "--features"),
        ("demo", "--layer"),
    }  # fmt: skip
    assert expected <= found


@pytest.mark.parametrize(("name", "flag", "minimum"), count_flags())
def test_count_flags_refuse_values_below_their_minimum(name, flag, minimum, capsys) -> None:
    for bad in (str(minimum - 1), "-5", "2.5", "many"):
        with pytest.raises(SystemExit) as exc:
            main([name, flag, bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err, err
        assert f"integer >= {minimum}, got " in err and "Traceback" not in err


def test_feature_lists_are_checked_by_the_parser(capsys) -> None:
    for bad in ("3,x", "-1", ","):
        with pytest.raises(SystemExit) as exc:
            main(["dashboard", "--out", "d", "--sae", "s", "--features", bad])
        assert exc.value.code == 2
        assert "expected comma-separated integers >= 0" in capsys.readouterr().err


def test_an_input_error_is_one_line_and_exit_1(capsys) -> None:
    assert main(["releases", "no-such-release"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown release 'no-such-release'. Attention releases: [")
    assert "gpt2-small-attn-z" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where) -> None:
    argv = ["--debug", "releases", "no-such-release"]
    if where == "after":
        argv = ["releases", "no-such-release", "--debug"]
    with pytest.raises(ValueError, match="unknown release 'no-such-release'"):
        main(argv)


def test_a_usage_error_exits_2(capsys) -> None:
    assert main(["analyze", "--sae", "x"]) == 2
    assert capsys.readouterr().err == "error: analyze needs --sae and --out (or --list)\n"


def test_refused_output_folders_are_reported_before_any_loading(
    tmp_path, monkeypatch, capsys
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out, message in [
        (".", "it is the current folder"),
        (str(tmp_path), "it is the current folder"),
    ]:
        for command in (
            ["analyze", "--sae", "not-loaded", "--out", out, "--overwrite"],
            ["dashboard", "--sae", "not-loaded", "--out", out, "--overwrite"],
            ["evaluate", "--sae", "not-loaded", "--out", out, "--overwrite"],
        ):
            assert main(command) == 1
            assert message in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    assert main(["analyze", "--sae", "not-loaded", "--out", str(mine), "--overwrite"]) == 1
    assert (
        "holds files that sae-lens-attn did not write ('data.csv'; no " in capsys.readouterr().err
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (mine / "data.csv").read_text() == "1,2"


def test_interrupt_exits_130_and_bugs_keep_their_traceback(monkeypatch, capsys) -> None:
    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def buggy(_args: argparse.Namespace) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "run", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])


def packaged_release_ids() -> dict[str, list[str]]:
    """Releases of the package's YAML file, read directly."""
    text = files("sae_lens_attn.pretrained").joinpath("releases.yaml").read_text()
    return {
        name: [sae["id"] for sae in entry["saes"]] for name, entry in yaml.safe_load(text).items()
    }


def test_list_releases_holds_the_packaged_and_registered_releases() -> None:
    listed = sla.list_releases()
    for name, ids in packaged_release_ids().items():
        assert listed[name] == ids
    assert "stdlib-2l-attn-z" in listed and "blocks.1" in listed["stdlib-2l-attn-z"]
    assert list(listed) == sorted(listed)
    release = sla.Release(
        name="cli-test-attn-z",
        repo_id="me/cli-test",
        model="tiny",
        saes=(sla.ReleaseSAE("blocks.0", "blocks.0.attn.hook_z"),),
    )
    sla.register_release(release)
    try:
        assert sla.list_releases()["cli-test-attn-z"] == ["blocks.0"]
    finally:
        sla.unregister_release("cli-test-attn-z")
    assert "cli-test-attn-z" not in sla.list_releases()


def test_releases_command_lists_the_same_releases(capsys) -> None:
    assert main(["releases", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == sla.list_releases()
    assert main(["releases"]) == 0
    out = capsys.readouterr().out
    for name, ids in sla.list_releases().items():
        assert f"{name}  (model " in out and f"{len(ids)} SAEs: {', '.join(ids)}" in out
    assert main(["releases", "gpt2-small-attn-z", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "gpt2-small-attn-z": packaged_release_ids()["gpt2-small-attn-z"]
    }
