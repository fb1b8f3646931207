"""Converter for the attention SAEs of Kissane et al. (``.pt`` state dict + ``<name>_cfg.json``).

Their files hold ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]`` and
``b_dec [d_in]`` in fp32, and a config with ``act_name`` (``blocks.L.attn.hook_z``), ``act_size``
(d_in), ``dict_size`` (d_sae), ``layer``, ``model_name``, ``seq_len`` and the training
hyperparameters. The files do not record the head structure: the release states it in
``config_overrides`` (``n_heads``, optionally ``n_kv_heads``, ``hf_architecture``, ...). They were
trained on TransformerLens models loaded with ``from_pretrained`` defaults, so z is ``"folded"``
unless the release says otherwise.

The loader and config getter follow SAELens's loader protocols and are registered under
``KISSANE_CONVERSION_FUNC`` in ``NAMED_PRETRAINED_SAE_LOADERS`` / ``..._CONFIG_GETTERS``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import sae_lens
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
from sae_lens import StandardSAEConfig
from sae_lens.util import str_to_dtype
from torch import Tensor

from sae_lens_attn.backends.base import check_convention
from sae_lens_attn.config.metadata import attention_metadata
from sae_lens_attn.site import AttnSite

KISSANE_CONVERSION_FUNC = "sae_lens_attn_kissane"
"""Loader name of this format in SAELens's tables and in releases' ``conversion_func``."""
WEIGHT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
"""Tensors of a Kissane et al. state dict."""
REQUIRED_CONFIG_KEYS = ("act_name", "act_size", "dict_size", "layer", "model_name")
"""Keys of ``<name>_cfg.json`` the conversion reads."""

_SAE_CONFIG_FIELDS = {f.name for f in fields(StandardSAEConfig)} - {"metadata"}
_ENC_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def config_file_for(weights_file: str) -> str:
    """The config file that goes with a weights file: ``x.pt`` → ``x_cfg.json``."""
    if not weights_file.endswith(".pt"):
        raise ValueError(
            f"expected a Kissane et al. weights file ending in '.pt', got {weights_file!r}"
        )
    return weights_file.removesuffix(".pt") + "_cfg.json"


def get_kissane_config_from_hf(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAELens config of one SAE, from its ``_cfg.json`` (no weights are downloaded).

    Args:
        repo_id: Hugging Face repository of the release.
        folder_name: the SAE's weights file in the repository (``...pt``).
        device: device recorded in the config.
        force_download: download again even if cached.
        cfg_overrides: the release's ``config_overrides`` plus what SAELens adds (device, dtype,
            neuronpedia id); must give ``n_heads``.

    Returns:
        A SAELens 6 config dict: ``standard`` architecture, ``reshape_activations="hook_z"`` and
        the attention metadata.
    """
    cfg_file = config_file_for(folder_name)
    path = _download(repo_id, cfg_file, force_download, f"config of {folder_name}")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{repo_id}/{cfg_file} is not valid JSON (truncated?): {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{repo_id}/{cfg_file} must hold a JSON object (a Kissane et al. config), got "
            f"{type(raw).__name__}"
        )
    return kissane_config_to_saelens(
        raw, cfg_overrides or {}, device=device, source=f"{repo_id}/{folder_name}"
    )


def kissane_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor | None]:
    """Config, state dict and (absent) log-sparsity of one Kissane et al. SAE.

    The ``.pt`` file is read with ``torch.load(weights_only=True)``; its tensors must have the
    shapes its config states.

    Returns:
        (SAELens config dict, ``{W_enc, W_dec, b_enc, b_dec}``, ``None``): these files carry no
        feature sparsity.
    """
    cfg = get_kissane_config_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    path = _download(repo_id, folder_name, force_download, "weights file")
    state_dict = load_state_dict(path, map_location=device)
    check_weights(state_dict, cfg["d_in"], cfg["d_sae"], source=f"{repo_id}/{folder_name}")
    dtype = str_to_dtype(cfg["dtype"])
    return cfg, {key: state_dict[key].to(dtype) for key in WEIGHT_KEYS}, None


def kissane_config_to_saelens(
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    device: str | None = None,
    source: str = "config",
) -> dict[str, Any]:
    """Convert a Kissane et al. config (plus the release's overrides) to a SAELens 6 config dict.

    Raises:
        ValueError: a required key is missing, the hook is not hook_z, the layer disagrees with
            the hook, or ``act_size`` is not ``n_heads * d_head``.
    """
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in raw]
    if missing:
        raise ValueError(
            f"{source}: config lacks {missing}; a Kissane et al. config has "
            f"{list(REQUIRED_CONFIG_KEYS)}"
        )
    layer = AttnSite.layer_of(raw["act_name"])
    if layer != raw["layer"]:
        raise ValueError(
            f"{source}: config says layer={raw['layer']!r} but act_name={raw['act_name']!r}"
        )
    rest = dict(overrides)
    n_heads = rest.pop("n_heads", None)
    if n_heads is None:
        raise ValueError(
            f"{source}: Kissane et al. configs do not record the number of heads; the release "
            "must give n_heads (and optionally n_kv_heads, d_head) in config_overrides"
        )
    d_in = raw["act_size"]
    if not isinstance(d_in, int) or not isinstance(n_heads, int) or d_in % n_heads:
        raise ValueError(
            f"{source}: act_size={d_in!r} is not n_heads*d_head for n_heads={n_heads!r}"
        )
    site = AttnSite(
        layer=layer,
        n_heads=n_heads,
        n_kv_heads=rest.pop("n_kv_heads", n_heads),
        d_head=rest.pop("d_head", d_in // n_heads),
    ).check_sae_width(d_in)
    attention = attention_metadata(
        site,
        check_convention(rest.pop("value_bias_convention", "folded")),
        model_name=raw["model_name"],
        hf_architecture=rest.pop("hf_architecture", None),
        model_from_pretrained_kwargs=rest.pop("model_from_pretrained_kwargs", None),
    )
    top_level = {key: rest.pop(key) for key in list(rest) if key in _SAE_CONFIG_FIELDS}
    metadata: dict[str, Any] = {
        "sae_lens_version": sae_lens.__version__,
        "sae_lens_training_version": None,
        "hook_head_index": None,
        "context_size": raw.get("seq_len"),
        "prepend_bos": True,
        **attention,
        "converted_from": {"format": "kissane", "source": source, "config": dict(raw)},
        **rest,
    }
    return {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": raw["dict_size"],
        "dtype": _ENC_DTYPES.get(raw.get("enc_dtype", "fp32"), "float32"),
        "device": device or "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
        **top_level,
        "metadata": metadata,
    }


def load_state_dict(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Read a ``.pt`` state dict with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: the file is a pickle that needs code (classes or functions beyond tensors and
            plain containers) to load, is truncated or corrupt, or is not a ``{name: tensor}``
            mapping.
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next(
            (line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line),
            str(err).splitlines()[0],
        )
        raise ValueError(
            f"refusing to load {path}: it is a pickle that carries code or objects other than "
            f"tensors, which torch.load(weights_only=True) does not run ({reason}). Only plain "
            "state dicts of tensors are accepted; re-save the tensors with trusted code."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable torch .pt file (truncated or corrupt): {err or type(err).__name__}"
        ) from None
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"expected a state dict {{name: tensor}} in {path}, got {type(obj).__name__}"
        )
    return dict(obj)


def check_weights(state_dict: Mapping[str, Tensor], d_in: int, d_sae: int, *, source: str) -> None:
    """Raise ``ValueError`` unless ``state_dict`` holds exactly the tensors its config implies."""
    expected = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
    }
    if set(state_dict) != set(expected):
        raise ValueError(
            f"{source}: expected tensors {sorted(expected)}, found {sorted(state_dict)}"
        )
    wrong = {
        key: tuple(state_dict[key].shape)
        for key, shape in expected.items()
        if tuple(state_dict[key].shape) != shape
    }
    if wrong:
        raise ValueError(
            f"{source}: weight shapes disagree with the config (d_in={d_in}, d_sae={d_sae}): "
            + ", ".join(
                f"{key} is {shape}, expected {expected[key]}" for key, shape in wrong.items()
            )
        )


def _download(repo_id: str, filename: str, force_download: bool, what: str) -> str:
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:  # before its base class
        raise ConnectionError(hub_unreachable_message(repo_id, filename, what)) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"the {what} is missing: {filename!r} is not in the Hugging Face repository "
            f"{repo_id!r} (nor in the local cache when offline); Kissane et al. SAEs need "
            f"both <name>.pt and <name>_cfg.json. ({type(err).__name__})"
        ) from err


def hub_unreachable_message(repo_id: str, filename: str, what: str) -> str:
    """Why a file of the Hub could not be had: offline mode, or no network, and not cached."""
    from huggingface_hub import constants

    cause = (
        "offline mode is on (HF_HUB_OFFLINE=1), so nothing is downloaded"
        if constants.HF_HUB_OFFLINE
        else "the Hugging Face Hub could not be reached (no network, a proxy or a firewall)"
    )
    return (
        f"could not get the {what} {filename!r} of {repo_id!r}: {cause}, and it is not in the "
        f"local cache ({constants.HF_HUB_CACHE}). Connect to the network"
        + (" and unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "")
        + " to download it once, or use the embedded default model and its release, which "
        "need no network"
    )
