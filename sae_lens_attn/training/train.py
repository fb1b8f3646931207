"""Training attention SAEs: configs built from a model, and all layers from one stream."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import save_file

from sae_lens_attn.backends import backend_for
from sae_lens_attn.config.sae_configs import (
    ATTN_TRAINING_CLASSES,
    AttnArchitecture,
    AttnTrainingSAEConfig,
)
from sae_lens_attn.outputs import staging_dir
from sae_lens_attn.site import AttnSite
from sae_lens_attn.store import AttnActivationStore, TokenBatch


def attn_sae_training_config(
    model: Any,
    layer: int,
    architecture: AttnArchitecture = "standard",
    **kwargs: Any,
) -> AttnTrainingSAEConfig:
    """The training config of an attention SAE for ``layer`` of ``model``.

    Fills ``d_in``, the head structure, the hook name, the value-bias convention the backend
    delivers and the Hugging Face architecture from the model; ``kwargs`` are the base SAELens
    config's own fields (``d_sae``, ``k``, ``l1_coefficient``, ...).

    Example:
        >>> cfg = attn_sae_training_config(model, 1, "topk", d_sae=2048, k=16)
        >>> runner_cfg = LanguageModelSAERunnerConfig(sae=cfg, hook_name=cfg.metadata.hook_name, ...)
    """
    name = f"attn_{architecture}"
    if name not in ATTN_TRAINING_CLASSES:
        raise ValueError(
            f"unknown attention SAE architecture {architecture!r}; valid: "
            f"{list(get_args(AttnArchitecture))}"
        )
    backend = backend_for(model)
    site = backend.site(layer)
    cfg_cls: Any = ATTN_TRAINING_CLASSES[name][1]
    cfg: AttnTrainingSAEConfig = cfg_cls(
        d_in=site.d_in,
        n_heads=site.n_heads,
        n_kv_heads=site.n_kv_heads,
        value_bias_convention=backend.native_convention,
        hf_architecture=backend.hf_architecture_name,
        **kwargs,
    )
    cfg.metadata.hook_name = site.hook_name
    return cfg


def train_attn_saes(
    model: Any,
    layers: Sequence[int],
    token_batches: Iterable[TokenBatch],
    *,
    training_tokens: int,
    out_dir: str | Path,
    architecture: AttnArchitecture = "standard",
    model_name: str | None = None,
    train_batch_size_tokens: int = 4096,
    buffer_size_tokens: int = 65536,
    lr: float = 3e-4,
    exclude_special_tokens: Sequence[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **sae_kwargs: Any,
) -> dict[int, Path]:
    """Train one attention SAE per layer from a single activation stream and save them.

    Every model pass serves all ``layers`` (SAELens's ``MultiSAETrainer`` steps the SAEs in
    lockstep). Each SAE is written, SAELens-native, to ``out_dir/blocks.L.attn.hook_z``
    (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``); folders appear whole
    or not at all.

    Returns:
        layer → folder of its saved SAE.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    sites = [AttnSite.from_model(model, layer) for layer in layers]
    targets = {site.layer: out_dir / site.hook_name for site in sites}
    taken = [str(p) for p in targets.values() if p.exists() and any(p.iterdir())]
    if taken and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite non-empty SAE folders {taken}; pass overwrite=True"
        )
    configs = [attn_sae_training_config(model, s.layer, architecture, **sae_kwargs) for s in sites]
    saes: dict[str, TrainingSAE[Any]] = {}
    for site, cfg in zip(sites, configs, strict=True):
        cfg.metadata.model_name = model_name
        saes[site.hook_name] = ATTN_TRAINING_CLASSES[cfg.architecture()][0](cfg)
    store = AttnActivationStore(
        model,
        sites,
        token_batches,
        train_batch_size_tokens=train_batch_size_tokens,
        buffer_size_tokens=buffer_size_tokens,
        convention=configs[0].value_bias_convention or "folded",
        exclude_special_tokens=exclude_special_tokens,
        seed=seed,
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=training_tokens,
        train_batch_size_samples=train_batch_size_tokens,
        lr=lr,
        lr_end=lr,
    )
    trainer = MultiSAETrainer(trainer_cfg, saes, {name: name for name in saes}, store)
    trainer.fit()
    for site in sites:
        sparsity = trainer.trainers[site.hook_name].log_feature_sparsity
        _save_atomically(saes[site.hook_name], sparsity, targets[site.layer])
    return targets


def _save_atomically(sae: TrainingSAE[Any], log_sparsity: torch.Tensor, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    try:
        sae.save_inference_model(tmp)
        save_file({"sparsity": log_sparsity.contiguous()}, tmp / SPARSITY_FILENAME)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
