"""Atomic folder writes: build in a hidden sibling folder, then rename into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def staging_dir(target: str | Path, parent: str | Path | None = None) -> Path:
    """A new empty folder beside ``target`` (in ``parent`` if given) to build ``target`` in.

    Unlike ``tempfile.mkdtemp``'s private 0700 folder, it gets the permissions an ordinary
    ``mkdir`` would (0777 less the umask), since it becomes the user's output folder.
    """
    target = Path(target)
    where = Path(parent) if parent is not None else target.parent
    where.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=where))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder
