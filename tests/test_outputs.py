"""The one atomic-output helper: refusals, overwrite, failures and kills at every step, cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sae_lens_attn import outputs
from sae_lens_attn.outputs import OUTPUT_MARKER, atomic_output, check_output, read_marker

OLD = {"a.txt": "old a", "sub/b.txt": "old b", "sub/deep/c.txt": "old c"}
NEW = {"a.txt": "new a", "d.txt": "new d", "sub/e.txt": "new e"}


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but the top marker, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_text()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != OUTPUT_MARKER
    }


def hidden_siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith("."))


def write_output(target: Path, files: dict[str, str], **kwargs) -> None:
    with atomic_output(target, kind=kwargs.pop("kind", "test"), **kwargs) as folder:
        write_files(folder, files)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_new_folder_holds_what_was_written_and_a_marker_listing_it(tmp_path) -> None:
    target = tmp_path / "deeper" / "out"
    write_output(target, OLD)
    assert contents(target) == OLD
    marker = read_marker(target)
    assert marker is not None and marker["kind"] == "test"
    assert marker["files"] == sorted(OLD)
    assert marker["folders"] == ["sub", "sub/deep"]
    assert hidden_siblings(target) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_an_error_inside_leaves_no_trace_and_the_old_folder_whole(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target, kind="test") as folder:
        write_files(folder, NEW)
        raise RuntimeError("boom")
    assert not target.exists() and hidden_siblings(target) == []
    write_output(target, OLD)
    with (
        pytest.raises(KeyboardInterrupt),
        atomic_output(target, kind="test", overwrite=True) as folder,
    ):
        write_files(folder, NEW)
        raise KeyboardInterrupt
    assert contents(target) == OLD and hidden_siblings(target) == []


def test_overwrite_replaces_our_own_folder_and_nothing_else(tmp_path) -> None:
    target = tmp_path / "out"
    (tmp_path / "beside.txt").write_text("user's")
    write_output(target, OLD)
    with pytest.raises(FileExistsError, match="earlier test output.*pass overwrite=True"):
        write_output(target, NEW)
    assert contents(target) == OLD
    write_output(target, NEW, overwrite=True)
    assert contents(target) == NEW
    assert read_marker(target)["files"] == sorted(NEW)  # type: ignore[index]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside.txt", "out"]


def test_an_empty_folder_is_written_into(tmp_path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    write_output(target, NEW)
    assert contents(target) == NEW


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_user_files_is_refused_even_with_overwrite(tmp_path, overwrite) -> None:
    target = tmp_path / "mine"
    write_files(target, {"notes.txt": "mine", "data/x.csv": "1,2"})
    with pytest.raises(FileExistsError, match=r"holds files that sae-lens-attn did not write \("):
        write_output(target, NEW, overwrite=overwrite)
    assert contents(target) == {"notes.txt": "mine", "data/x.csv": "1,2"}
    assert hidden_siblings(target) == []


def test_user_files_added_to_our_folder_block_overwrite(tmp_path) -> None:
    target = tmp_path / "out"
    write_output(target, OLD)
    (target / "sub" / "my_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"it holds 'sub/my_notes.txt', which sae-lens-attn"):
        write_output(target, NEW, overwrite=True)
    assert contents(target) == {**OLD, "sub/my_notes.txt": "mine"}


def test_a_user_file_that_appears_while_writing_is_kept(tmp_path) -> None:
    target = tmp_path / "out"
    write_output(target, OLD)
    with (
        pytest.raises(FileExistsError, match="which sae-lens-attn did not write"),
        atomic_output(target, kind="test", overwrite=True) as folder,
    ):
        write_files(folder, NEW)
        (target / "late.txt").write_text("mine")
    assert contents(target) == {**OLD, "late.txt": "mine"}
    assert hidden_siblings(target) == []


def test_an_output_of_another_kind_is_not_replaced(tmp_path) -> None:
    target = tmp_path / "out"
    write_output(target, OLD, kind="release")
    with pytest.raises(
        FileExistsError, match="holds a release output of sae-lens-attn, not a demo"
    ):
        write_output(target, NEW, kind="demo", overwrite=True)
    assert contents(target) == OLD


def test_current_folder_its_parents_and_home_are_refused(tmp_path, monkeypatch) -> None:
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for target, what in [
        (".", "it is the current folder"),
        (str(work), "it is the current folder"),
        ("..", "it is a folder holding the current one"),
        ("/", "it is a folder holding the current one"),
    ]:
        with pytest.raises(FileExistsError, match=what):
            write_output(Path(target), NEW, overwrite=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="it is the home folder"):
        write_output(tmp_path / "home", NEW, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert [p.name for p in work.iterdir()] == []


def test_a_symlink_and_a_file_are_refused(tmp_path) -> None:
    real = tmp_path / "real"
    write_output(real, OLD)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        write_output(tmp_path / "link", NEW, overwrite=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        write_output(tmp_path / "file", NEW, overwrite=True)
    assert contents(real) == OLD and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failing_rename_leaves_the_old_folder_whole(tmp_path, monkeypatch, failing_call) -> None:
    """Call 1 moves the old folder aside, call 2 renames the new one in."""
    target = tmp_path / "out"
    write_output(target, OLD)
    calls = []
    rename = os.rename

    def failing_rename(src, dst) -> None:
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError("disk gone")
        rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk gone"):
        write_output(target, NEW, overwrite=True)
    assert contents(target) == OLD and hidden_siblings(target) == []
    assert len(calls) == failing_call + (failing_call == 2)  # the second failure puts it back


def test_a_failing_marker_write_leaves_the_old_folder_whole(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out"
    write_output(target, OLD)
    replace = os.replace
    count = []

    def failing_replace(src, dst) -> None:
        count.append(src)
        if len(count) == 1:  # the marker of the finished folder, listing its contents
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_output(target, NEW, overwrite=True)
    assert contents(target) == OLD and hidden_siblings(target) == []


KILLED_RUN = textwrap.dedent(
    """
    import importlib.util, os, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("outputs", sys.argv[1])
    outputs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(outputs)
    target, kill_at, files = Path(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4])
    calls = 0

    def killing(function):
        def call(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os._exit(9)  # no finally, no except: a kill
            return function(*args, **kwargs)
        return call

    for name in ("rename", "replace", "unlink", "rmdir", "mkdir"):
        setattr(os, name, killing(getattr(os, name)))
    with outputs.atomic_output(target, kind="test", overwrite=True) as folder:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    """
)


def run_killed(target: Path, kill_at: int, files: dict[str, str]) -> int:
    args = [sys.executable, "-c", KILLED_RUN, outputs.__file__, str(target), str(kill_at)]
    return subprocess.run([*args, repr(files)], check=False).returncode


def test_a_kill_at_any_step_leaves_the_old_or_the_new_folder_whole(tmp_path) -> None:
    """Kill the writing process at each file-system call in turn (os._exit: no cleanup runs).
    After the kill one of the two folders is whole, under its name or set aside; the next write
    to the same target puts a set-aside old folder back and cleans the rest."""
    target = tmp_path / "out"
    seen = set()
    for kill_at in range(1, 60):
        write_output(target, OLD, overwrite=True)
        code = run_killed(target, kill_at, NEW)
        if code == 0:
            assert contents(target) == NEW and hidden_siblings(target) == []
            break
        assert code == 9
        if target.exists():
            assert contents(target) in (OLD, NEW)
        else:  # between the two renames: the old folder waits aside, whole
            aside = [p for p in tmp_path.iterdir() if ".sla-old-" in p.name]
            assert len(aside) == 1 and contents(aside[0]) == OLD
        after_kill = contents(target) if target.exists() else OLD
        seen.add("new" if after_kill == NEW else "old")
        check_output(target, kind="test", overwrite=True)  # the next run's recovery
        assert contents(target) == after_kill
        assert hidden_siblings(target) == [], f"left after a kill at call {kill_at}"
    else:
        pytest.fail("the write never finished")
    assert seen == {"old", "new"} and kill_at > 8, kill_at  # kills before and after the swap


def test_a_run_killed_while_writing_leaves_a_staging_folder_the_next_run_cleans(tmp_path) -> None:
    target = tmp_path / "out"
    write_output(target, OLD)
    script = KILLED_RUN.replace("(folder / name).write_text(text)", "os._exit(9)")
    args = [sys.executable, "-c", script, outputs.__file__, str(target), "1000", repr(NEW)]
    assert subprocess.run(args, check=False).returncode == 9
    staging = [p.name for p in tmp_path.iterdir() if ".sla-new-" in p.name]
    assert len(staging) == 1 and contents(target) == OLD
    write_output(target, NEW, overwrite=True)
    assert contents(target) == NEW and hidden_siblings(target) == []


def test_only_stale_folders_of_ours_are_cleaned(tmp_path) -> None:
    target = tmp_path / "out"
    dead, host = dead_pid(), outputs._HOST

    def side(role: str, pid: int, tag: str, *, marker: bool, files: dict[str, str]) -> Path:
        folder = (
            tmp_path
            / f".out.sla-{role}-{host if tag != 'other-host' else '000000'}-{pid}-{tag.encode().hex()}"
        )
        folder.mkdir()
        write_files(folder, files)
        if marker:
            (folder / OUTPUT_MARKER).write_text(
                json.dumps({"writer": "sae-lens-attn", "kind": "test", "state": "staging"})
            )
        return folder

    stale = side("new", dead, "stale", marker=True, files=NEW)
    empty = side("new", dead, "empty", marker=False, files={})
    foreign = side("new", dead, "foreign", marker=False, files={"x.txt": "whose?"})
    running = side("new", os.getpid(), "running", marker=True, files=NEW)
    elsewhere = side("new", dead, "other-host", marker=True, files=NEW)
    (tmp_path / ".out.notes").write_text("mine")
    write_output(target, OLD)
    assert not stale.exists() and not empty.exists()
    assert contents(foreign) == {"x.txt": "whose?"}
    assert contents(running) == NEW and contents(elsewhere) == NEW
    assert (tmp_path / ".out.notes").read_text() == "mine"


def test_a_stale_old_folder_is_put_back_or_emptied_of_our_files_only(tmp_path) -> None:
    target = tmp_path / "out"
    write_output(target, OLD)
    aside = tmp_path / f".out.sla-old-{outputs._HOST}-{dead_pid()}-ab"
    target.rename(aside)  # as a kill between the two renames leaves it
    check_output(target, kind="test", overwrite=True)
    assert contents(target) == OLD and hidden_siblings(target) == []
    write_output(tmp_path / "other", OLD)
    (tmp_path / "other").rename(aside)  # a second set-aside folder, now that "out" exists
    (aside / "sub" / "mine.txt").write_text("mine")
    with pytest.warns(UserWarning, match="holds files sae-lens-attn did not write"):
        write_output(target, NEW, overwrite=True)
    assert contents(target) == NEW
    assert contents(aside) == {"sub/mine.txt": "mine"}  # ours deleted, the user's kept


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _tamper(target: Path, *, files: list[str] = (), folders: list[str] = ()) -> None:  # type: ignore[assignment]
    """Add entries to the marker of ``target``, as a hostile or careless edit would."""
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    marker["files"] += list(files)
    marker["folders"] += list(folders)
    (target / OUTPUT_MARKER).write_text(json.dumps(marker))


def _escaping_entries(tmp_path: Path) -> dict[str, dict[str, list[str]]]:
    """Marker entries that name files outside the output folder ``tmp_path / "out"``."""
    victim = tmp_path / "victim.txt"
    return {
        "relative": {"files": ["../victim.txt"]},
        "dot-dot laden": {"files": ["sub/../../victim.txt"], "folders": ["sub/deep/../../.."]},
        "absolute": {"files": [str(victim)]},
        "through a symlink": {"files": ["link/victim.txt"]},
        "symlinked folder": {"folders": ["link"]},
    }


@pytest.mark.parametrize(
    "case", ["relative", "dot-dot laden", "absolute", "through a symlink", "symlinked folder"]
)
def test_a_marker_listing_entries_outside_its_folder_is_refused(tmp_path, case) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    target = tmp_path / "out"
    write_output(target, OLD)
    (target / "link").symlink_to(tmp_path, target_is_directory=True)
    _tamper(target, files=["link"])  # the link itself is listed, as a written symlink would be
    _tamper(target, **_escaping_entries(tmp_path)[case])
    with pytest.raises(FileExistsError, match="lists .* not lie inside the folder"):
        write_output(target, NEW, overwrite=True)
    assert victim.read_text() == "the user's"
    assert contents(target) == OLD
    assert hidden_siblings(target) == []


def test_a_set_aside_folder_with_an_escaping_marker_is_left_in_place(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    target = tmp_path / "out"
    write_output(tmp_path / "other", OLD)
    _tamper(tmp_path / "other", files=["../victim.txt", str(victim)])
    aside = tmp_path / f".out.sla-old-{outputs._HOST}-{dead_pid()}-ab"
    write_output(target, OLD)
    (tmp_path / "other").rename(aside)  # a killed run's set-aside folder, now that "out" exists
    with pytest.warns(UserWarning, match="lists .*victim.txt.*outside it"):
        check_output(target, kind="test", overwrite=True)
    assert victim.read_text() == "the user's"
    assert contents(aside) == OLD


def test_the_cli_refuses_an_escaping_marker_in_one_line(tmp_path, capsys) -> None:
    from sae_lens_attn.cli.main import main

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    out = tmp_path / "out"
    write_output(out, {"summary.md": "old"}, kind="analysis")
    _tamper(out, files=["../victim.txt"])
    assert main(["analyze", "--sae", "not-loaded", "--out", str(out), "--overwrite"]) == 1
    error = capsys.readouterr().err
    assert "'../victim.txt', which does not lie inside the folder" in error
    assert "Traceback" not in error and error.count("\n") == 1
    assert victim.read_text() == "the user's"
