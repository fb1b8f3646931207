"""Hugging Face Hub caches written the way ``huggingface_hub`` writes them, for offline tests.

Layout: ``<cache>/models--<owner>--<name>/blobs/<sha256>``, ``snapshots/<commit>/<path>`` (a
relative symlink to the blob) and ``refs/main`` (the commit). With ``HF_HUB_OFFLINE=1``,
``hf_hub_download`` resolves ``refs/main`` and returns the snapshot file, as after a download.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import huggingface_hub.utils
import pytest


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """Point ``huggingface_hub`` at ``root/hub`` and switch it offline; returns the cache.

    The environment is set for subprocesses; the module constants are set too, because
    ``huggingface_hub`` (and transformers 4) read the environment only when first imported.
    """
    cache = root / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # transformers 4.x resolves its default cache folder once, at import.
    transformers_hub = importlib.import_module("transformers.utils.hub")
    if hasattr(transformers_hub, "TRANSFORMERS_CACHE"):
        monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(cache))
    # Drop connections opened before the switch (huggingface_hub 0.x/1.x: reset_sessions; 2.x
    # makes its client per call and has close_session).
    hub_utils: Any = huggingface_hub.utils
    (getattr(hub_utils, "reset_sessions", None) or hub_utils.close_session)()
    return cache


def add_repo(cache: Path, repo_id: str, files: Mapping[str, bytes | Path]) -> Path:
    """Write a model repository with ``files`` (path in repo → content) as ``main``.

    Returns:
        The snapshot folder.
    """
    contents = {
        name: data if isinstance(data, bytes) else Path(data).read_bytes()
        for name, data in files.items()
    }
    digest = hashlib.sha1()
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + hashlib.sha256(contents[name]).digest())
    commit = digest.hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every file under ``folder`` by its relative path, leaving out top-level folders ``skip``."""
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] not in skip
    }
