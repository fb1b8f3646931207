"""Uploading a published release folder to the Hugging Face Hub: one repository, one commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi

from sae_lens_attn.outputs import OUTPUT_MARKER
from sae_lens_attn.pretrained.upstream import UPSTREAM_DIR


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    hf_api: Any = None,
    private: bool = False,
    commit_message: str = "Publish attention SAEs",
) -> str:
    """Upload a published folder (without ``upstream/`` and the output marker) as one commit.

    Args:
        folder: a folder written by ``publish``.
        repo_id: Hugging Face repository, ``owner/name``; created if missing.
        hf_api: the ``huggingface_hub.HfApi`` to use (default: a new one, with the saved token).
        private: create the repository as private.
        commit_message: the commit's message.

    Returns:
        The commit id.
    """
    folder = Path(folder)
    api = HfApi() if hf_api is None else hf_api
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path)
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and path.relative_to(folder).parts[0] != UPSTREAM_DIR
        and path.relative_to(folder).as_posix() != OUTPUT_MARKER
    ]
    info = api.create_commit(
        repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message
    )
    return str(info.oid)
