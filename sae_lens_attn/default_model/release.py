"""The package-local release ``stdlib-2l-attn-z``: the default model's SAEs, read from the package.

SAELens resolves ``SAE.from_pretrained("stdlib-2l-attn-z", "blocks.1")`` through its own path:
its pretrained directory (where ``register_default_release`` puts the release through
``sae_lens_attn.pretrained.directory``) names the conversion function ``PACKAGED_CONVERSION_FUNC``,
whose loader, registered in SAELens's ``NAMED_PRETRAINED_SAE_LOADERS``, reads the SAELens-native files
(``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``) from the installed package
instead of the Hugging Face hub. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.loading.pretrained_sae_loaders import (
    get_sae_lens_config_from_disk,
    read_sae_components_from_disk,
)
from safetensors import safe_open

from sae_lens_attn.config.metadata import read_attention_metadata
from sae_lens_attn.default_model import model as model_files
from sae_lens_attn.pretrained import Release, ReleaseSAE
from sae_lens_attn.pretrained.directory import register_converter, register_packaged_release
from sae_lens_attn.site import AttnSite

RELEASE_NAME = "stdlib-2l-attn-z"
"""Name of the release of the default model's attention SAEs."""
RELEASE_REPO_ID = "sae-lens-attn/stdlib-2l-attn-z"
"""The release's ``repo_id``: a name for the package's files, never looked up on the hub."""
PACKAGED_CONVERSION_FUNC = "sae_lens_attn_packaged"
"""Name of the package-local loader in SAELens's loader tables."""
N_LAYERS = 2
"""Layers of the default model, one SAE each."""


def sae_folder(folder_name: str) -> Path:
    """The folder of the packaged SAE ``folder_name`` (``blocks.L.attn.hook_z``)."""
    return model_files.PACKAGE_DIR / model_files.SAES_DIR / folder_name


def get_packaged_sae_config(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAELens config of a packaged SAE, read from the package (SAELens config-getter protocol).

    ``force_download`` is accepted for the protocol and ignored: nothing is downloaded.

    Raises:
        ValueError: ``repo_id`` is not this release's, or ``cfg.json`` is corrupted or its
            attention metadata is inconsistent (named).
        FileNotFoundError: the SAE's ``cfg.json`` is missing (named).
    """
    folder = _folder(repo_id, folder_name)
    cfg_path = _verified(folder / SAE_CFG_FILENAME)
    model_files.read_json(cfg_path)
    cfg = get_sae_lens_config_from_disk(folder, device, cfg_overrides)
    read_attention_metadata(cfg.get("metadata", {}), d_in=cfg.get("d_in"), source=str(cfg_path))
    return cfg


def packaged_sae_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """Config, weights and log-sparsity of a packaged SAE (SAELens loader protocol).

    Returns:
        (SAELens config dict, state dict, ``log10`` feature densities).

    Raises:
        ValueError: a file is corrupted or truncated, or its tensors do not fit ``cfg.json``;
            the message names the file.
        FileNotFoundError: a file is missing (named).
    """
    cfg = get_packaged_sae_config(repo_id, folder_name, device, force_download, cfg_overrides)
    folder = _folder(repo_id, folder_name)
    weights_path = _verified(folder / SAE_WEIGHTS_FILENAME)
    try:
        cfg, state_dict = read_sae_components_from_disk(cfg, weights_path, device=device)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(
            f"cannot read the SAE weights {str(weights_path)!r} (corrupted or truncated?): {err}"
        ) from None
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    wrong = {
        key: tuple(state_dict[key].shape) if key in state_dict else None
        for key, shape in expected.items()
        if key not in state_dict or tuple(state_dict[key].shape) != shape
    }
    if wrong:
        raise ValueError(
            f"the SAE weights {str(weights_path)!r} do not fit its cfg.json (d_in={d_in}, "
            f"d_sae={d_sae}): expected shapes {expected}, got {wrong} (None: missing)"
        )
    sparsity_path = _verified(folder / SPARSITY_FILENAME)
    try:
        with safe_open(str(sparsity_path), framework="pt", device=device) as f:  # type: ignore[no-untyped-call]
            log_sparsity = f.get_tensor("sparsity")
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(
            f"cannot read the SAE sparsity {str(sparsity_path)!r} (corrupted or truncated?): {err}"
        ) from None
    if tuple(log_sparsity.shape) != (d_sae,):
        raise ValueError(
            f"the SAE sparsity {str(sparsity_path)!r} has shape {tuple(log_sparsity.shape)}, "
            f"expected ({d_sae},)"
        )
    return cfg, state_dict, log_sparsity


def default_release() -> Release:
    """The release: ``blocks.L`` and ``blocks.L.hook_z`` for each layer, with shipped metrics."""
    metrics = _shipped_sae_metrics()
    saes = []
    for layer in range(N_LAYERS):
        folder = AttnSite(layer, 1, 1, 1).hook_name  # the hook name does not depend on the heads
        measured = metrics.get(f"blocks.{layer}", {})
        for sae_id in (f"blocks.{layer}", f"blocks.{layer}.hook_z"):
            saes.append(
                ReleaseSAE(
                    id=sae_id,
                    path=folder,
                    l0=measured.get("l0"),
                    variance_explained=measured.get("explained_variance"),
                )
            )
    return Release(
        name=RELEASE_NAME,
        repo_id=RELEASE_REPO_ID,
        model=model_files.MODEL_NAME,
        saes=tuple(saes),
        conversion_func=PACKAGED_CONVERSION_FUNC,
        links={"model": "sae_lens_attn.load_default_model()"},
    )


def register_default_release() -> Release:
    """Register the package-local loader and the release with SAELens (idempotent, offline).

    Raises:
        ValueError: another package registered a loader under ``PACKAGED_CONVERSION_FUNC``.
    """
    register_converter(PACKAGED_CONVERSION_FUNC, packaged_sae_loader, get_packaged_sae_config)
    return register_packaged_release(default_release())


def _shipped_sae_metrics() -> dict[str, dict[str, float]]:
    path = model_files.PACKAGE_DIR / model_files.METRICS_FILE
    if not path.is_file():  # the release still resolves; loading then names the missing files
        return {}
    saes = model_files.read_json(path).get("saes", {})
    return saes if isinstance(saes, dict) else {}


def _folder(repo_id: str, folder_name: str) -> Path:
    if repo_id != RELEASE_REPO_ID:
        raise ValueError(
            f"the packaged loader {PACKAGED_CONVERSION_FUNC!r} serves only {RELEASE_REPO_ID!r}, "
            f"got repo_id {repo_id!r}"
        )
    valid = [AttnSite(layer, 1, 1, 1).hook_name for layer in range(N_LAYERS)]
    if folder_name not in valid:
        raise ValueError(
            f"no packaged SAE folder {folder_name!r} in {RELEASE_REPO_ID!r}; valid: {valid}"
        )
    return sae_folder(folder_name)


def _verified(path: Path) -> Path:
    root = model_files.PACKAGE_DIR
    return model_files.verified(root, path.relative_to(root).as_posix())
