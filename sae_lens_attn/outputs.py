"""Atomic output folders: every command and function that writes a folder goes through here.

``atomic_output(target, kind=..., overwrite=...)`` yields a hidden staging folder beside
``target``; on success it moves the old ``target`` aside, renames the staging folder in, and
only then deletes the old one. A kill at any moment leaves the old or the new folder whole (after
a kill between the two renames, the old one waits under a hidden name and the next write to
``target`` puts it back). Nothing is deleted that this module did not write:

- every folder it writes carries ``OUTPUT_MARKER``, a small JSON file listing the folder's kind
  and every file and folder in it;
- a non-empty ``target`` without that marker, or holding entries the marker does not list, is
  refused, with or without ``overwrite``; so is a marker listing an entry that does not lie inside
  its folder (absolute, ``..``, or reached through a symbolic link), and so are the current
  folder, any folder holding it, the home folder and symbolic links;
- an old folder is deleted entry by entry from its list (its marker last), never with
  ``rmtree``; a staging folder, all of it written by the caller, is deleted marker last;
- staging and set-aside folders of killed runs (same host, process gone, marker present) are
  cleaned up the next time ``target`` is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

OUTPUT_MARKER = ".sae-lens-attn-output.json"
"""File inside every folder written by ``atomic_output``: who wrote it, its kind, its contents."""
WRITER = "sae-lens-attn"

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_SIDE_FOLDER = re.compile(
    r"\.(?P<name>.+)\.sla-(?P<role>new|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+"
)


@contextmanager
def atomic_output(target: str | Path, *, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Write the folder ``target`` whole or not at all: yields the empty folder to write into.

    Args:
        target: the folder to produce. Its parent folders are created.
        kind: what the folder holds (``"dashboard"``, ``"sae"``, ...); an earlier output of
            another kind is never replaced.
        overwrite: replace an earlier output of the same kind that this module wrote.

    Raises:
        FileExistsError: ``target`` may not be written (see ``check_output``), checked on entry
            and again just before the new folder is moved in.

    Examples:
        >>> with atomic_output("board", kind="dashboard", overwrite=True) as folder:
        ...     (folder / "index.html").write_text("<html>...</html>")
    """
    target = Path(target)
    check_output(target, kind=kind, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _side_folder(target, "new")
    staging.mkdir()  # 0777 less the umask, like any folder the user makes
    try:
        staging_marker = {"writer": WRITER, "kind": kind, "state": "staging"}
        (staging / OUTPUT_MARKER).write_text(json.dumps(staging_marker), encoding="utf-8")
        yield staging
        _write_marker(
            staging, {"writer": WRITER, "kind": kind, "state": "complete", **_list(staging)}
        )
        check_output(target, kind=kind, overwrite=overwrite)
        _swap_in(staging, target)
    except BaseException:
        if _is_folder(staging):
            with suppress(OSError):  # never hide the error that got us here
                _remove_staging(staging)  # written by this run only
        raise


def check_output(target: str | Path, *, kind: str, overwrite: bool = False) -> Path:
    """``target`` if ``atomic_output`` may write it, else raise; call it before long work.

    Writable: a missing or empty folder; with ``overwrite``, also an earlier output of the same
    ``kind`` holding nothing but what its marker lists. Restores an earlier output that a killed
    run left set aside, and cleans that run's staging folders, first.

    Raises:
        FileExistsError: ``target`` is the current folder, holds it, is the home folder, is a
            symbolic link or not a folder; or holds files this module did not write; or holds
            an output of another kind; or an earlier output and ``overwrite`` is false.
    """
    target = Path(target)
    _refuse_special(target)
    _recover(target)
    if not target.exists():
        return target
    if not target.is_dir():
        raise FileExistsError(f"refusing to write {target}: it exists and is not a folder")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    marker = read_marker(target)
    if marker is None:
        raise FileExistsError(
            f"refusing to write into {target}: it holds files that {WRITER} did not write "
            f"({_examples(entries)}; no {OUTPUT_MARKER} lists them); give a new or empty folder"
        )
    outside = _entries_outside(target, marker)
    if outside:
        raise FileExistsError(
            f"refusing to replace {target}: its {OUTPUT_MARKER} lists {_examples(outside)}, which "
            f"{'do' if len(outside) > 1 else 'does'} not lie inside the folder ({WRITER} only "
            "lists what it wrote there); the marker was altered: give another folder"
        )
    unlisted = _unlisted(target, marker)
    if unlisted:
        raise FileExistsError(
            f"refusing to replace {target}: besides the {marker['kind']} output {WRITER} wrote "
            f"there, it holds {_examples(unlisted)}, which {WRITER} did not write; move them out "
            "or give another folder"
        )
    if marker["kind"] != kind:
        raise FileExistsError(
            f"refusing to replace {target}: it holds a {marker['kind']} output of {WRITER}, not "
            f"a {kind}; give another folder"
        )
    if not overwrite:
        raise FileExistsError(
            f"refusing to replace {target}: it holds an earlier {kind} output of {WRITER}; pass "
            "overwrite=True (--overwrite) to replace it"
        )
    return target


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The complete marker of a folder ``atomic_output`` wrote, or ``None`` (none, unreadable,
    another writer's, or a staging folder's)."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(marker, dict)
        and marker.get("writer") == WRITER
        and marker.get("state") == "complete"
        and isinstance(marker.get("kind"), str)
        and all(isinstance(marker.get(key), list) for key in ("files", "folders"))
        and all(isinstance(name, str) for key in ("files", "folders") for name in marker[key])
    )
    return marker if valid else None


def _refuse_special(target: Path) -> None:
    if target.is_symlink():
        raise FileExistsError(
            f"refusing to write {target}: it is a symbolic link (to {os.readlink(target)}); give "
            "the folder's own path"
        )
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        what = "the current folder" if resolved == cwd else "a folder holding the current one"
        raise FileExistsError(
            f"refusing to write {target}: it is {what}; give a new folder, e.g. {target / 'out'}"
        )
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):  # no home folder known
        return
    if resolved == home or resolved in home.parents:
        raise FileExistsError(
            f"refusing to write {target}: it is the home folder or holds it; give a new folder"
        )


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; the old ``target`` (checked ours or empty) goes first."""
    aside = None
    if target.exists():
        if any(target.iterdir()):
            aside = _side_folder(target, "old")
            os.rename(target, aside)
        else:
            os.rmdir(target)  # refuses if a file appeared meanwhile
    try:
        os.rename(staging, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        _remove_listed(aside)


def _recover(target: Path) -> None:
    """Put back an output a killed run set aside; clean killed runs' staging and old folders."""
    parent = target.parent
    if not parent.is_dir():
        return
    stale = []
    for entry in parent.iterdir():
        match = _SIDE_FOLDER.fullmatch(entry.name)
        if match is None or match["name"] != target.name or not _is_folder(entry):
            continue
        if match["host"] != _HOST or _alive(int(match["pid"])):
            continue  # another host's, or a run still going
        stale.append((entry.stat().st_mtime, match["role"], entry))
    for _, role, entry in sorted(stale, reverse=True):  # newest first
        if not any(entry.iterdir()):
            entry.rmdir()  # killed before its marker was written, or after it was removed
        elif role == "old" and read_marker(entry) is not None:
            if not target.exists():
                os.rename(entry, target)
            else:
                _remove_listed(entry)
        elif role == "new" and (entry / OUTPUT_MARKER).is_file():
            _remove_staging(entry)


def _remove_staging(folder: Path) -> None:
    """Delete a staging folder (all of it written by this module's caller), its marker last, so
    that a kill halfway leaves it recognisable for the next cleanup."""
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            if not (root == str(folder) and name == OUTPUT_MARKER):
                os.unlink(os.path.join(root, name))
        for name in dirs:
            path = os.path.join(root, name)
            if os.path.islink(path):
                os.unlink(path)
            else:
                os.rmdir(path)
    with suppress(FileNotFoundError):
        os.unlink(folder / OUTPUT_MARKER)
    os.rmdir(folder)


def _remove_listed(folder: Path) -> None:
    """Delete what the marker of ``folder`` lists, its marker last, then the folder; leave
    anything else (with a warning)."""
    marker = read_marker(folder)
    if marker is None:
        warnings.warn(f"left {folder} in place: its {OUTPUT_MARKER} is missing", stacklevel=3)
        return
    outside = _entries_outside(folder, marker)
    if outside:
        warnings.warn(
            f"left {folder} in place: its {OUTPUT_MARKER} lists {_examples(outside)}, outside it",
            stacklevel=3,
        )
        return
    for name in marker["files"]:
        path = folder / name
        if path.is_symlink() or path.is_file():
            os.unlink(path)
    for name in sorted(marker["folders"], key=lambda n: -n.count("/")):
        with suppress(OSError):  # not empty: holds what we did not write
            os.rmdir(folder / name)
    if any(p.name != OUTPUT_MARKER for p in folder.iterdir()):
        warnings.warn(
            f"left {folder} in place: it holds files {WRITER} did not write", stacklevel=3
        )
        return
    os.unlink(folder / OUTPUT_MARKER)
    os.rmdir(folder)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _list(folder: Path) -> dict[str, list[str]]:
    """Every file and folder under ``folder`` (relative, ``/``-separated), marker left out."""
    files, folders = [], []
    for root, dirs, names in os.walk(folder):
        here = Path(root).relative_to(folder)
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                dirs.remove(name)
                names.append(name)
            else:
                folders.append((here / name).as_posix())
        files.extend((here / name).as_posix() for name in names)
    if OUTPUT_MARKER in files:
        files.remove(OUTPUT_MARKER)
    return {"files": sorted(files), "folders": sorted(folders)}


def _entries_outside(folder: Path, marker: dict[str, Any]) -> list[str]:
    """The marker's entries that do not name a path inside ``folder``: empty, absolute, holding
    ``..``, or leading out through a symbolic link (a listed file may itself be a link: it is
    unlinked, never followed, so only the folders above it must resolve inside)."""
    root = folder.resolve()
    outside = []
    for key in ("files", "folders"):
        for name in marker[key]:
            parts = Path(name).parts
            if not parts or ".." in parts or Path(name).is_absolute() or name.startswith("/"):
                outside.append(name)
                continue
            path = folder.joinpath(*parts)
            reached = (path if key == "folders" else path.parent).resolve()
            if reached != root and root not in reached.parents:
                outside.append(name)
    return outside


def _unlisted(folder: Path, marker: dict[str, Any]) -> list[str]:
    present = _list(folder)
    return sorted(
        (set(present["files"]) - set(marker["files"]))
        | (set(present["folders"]) - set(marker["folders"]))
    )


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    """Replace the marker of ``folder`` at once: a kill leaves the old marker or the new one."""
    partial = folder / f"{OUTPUT_MARKER}.partial"
    partial.write_text(json.dumps(marker, indent=1), encoding="utf-8")
    os.replace(partial, folder / OUTPUT_MARKER)


def _side_folder(target: Path, role: str) -> Path:
    name = f".{target.name}.sla-{role}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    return target.parent / name


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (PermissionError), or a platform without signal 0
        return True
    return True


def _examples(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")
