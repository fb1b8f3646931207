"""Training attention SAEs: configs built from a model, and all layers from one stream."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from safetensors.torch import save_file

from sae_lens_attn.backends import backend_for
from sae_lens_attn.config.sae_configs import (
    ATTN_TRAINING_CLASSES,
    AttnArchitecture,
    AttnTrainingSAEConfig,
)
from sae_lens_attn.outputs import atomic_output, check_output
from sae_lens_attn.site import AttnSite
from sae_lens_attn.store import AttnActivationStore, TokenBatch
from sae_lens_attn.validation import check_count

OUTPUT_KIND = "sae"
"""Kind of output folder an SAE is saved as (see ``sae_lens_attn.outputs``)."""
CHECKPOINTS_FOLDER = "checkpoints"
"""Folder of ``out_dir`` that training checkpoints go in, one ``SAMPLES/`` folder each."""


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

    Examples:
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
    progress: bool = True,
    n_checkpoints: int = 0,
    resume: bool = False,
    **sae_kwargs: Any,
) -> dict[int, Path]:
    """Train one attention SAE per layer from a single activation stream and save them.

    Every model pass serves all ``layers`` (SAELens's ``MultiSAETrainer`` steps the SAEs in
    lockstep). Each SAE is written, SAELens-native, to ``out_dir/blocks.L.attn.hook_z``
    (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``); folders appear whole
    or not at all.

    With ``n_checkpoints`` the run saves that many evenly spaced checkpoints (SAELens's
    multi-SAE layout) under ``out_dir/checkpoints/SAMPLES/``; ``resume`` continues from the
    latest of them (weights, optimizer and sample count; the token source starts again from its
    beginning) and ends, like an unbroken run, at ``training_tokens``.

    Returns:
        layer → folder of its saved SAE.

    Raises:
        ValueError: no layers, a count below 1, or ``training_tokens`` fewer than one training batch
            (the SAEs would be saved untrained).
        FileExistsError: a target folder may not be written (``sae_lens_attn.outputs``): it
            holds files this package did not write, or an SAE and ``overwrite`` is False.
        FileNotFoundError: ``resume`` and no checkpoint under ``out_dir/checkpoints``.
    """
    if not layers:
        raise ValueError("train_attn_saes needs at least one layer, got none")
    training_tokens = check_count("training_tokens", training_tokens)
    train_batch_size_tokens = check_count("train_batch_size_tokens", train_batch_size_tokens)
    if training_tokens < train_batch_size_tokens:
        raise ValueError(
            f"training_tokens={training_tokens} is fewer than one batch of "
            f"train_batch_size_tokens={train_batch_size_tokens}: no training step would run; "
            "give training_tokens >= train_batch_size_tokens"
        )
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    sites = [AttnSite.from_model(model, layer) for layer in layers]
    targets = {site.layer: out_dir / site.hook_name for site in sites}
    for target in targets.values():  # before training, so a refusal costs nothing
        check_output(target, kind=OUTPUT_KIND, overwrite=overwrite)
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
    n_checkpoints = check_count("n_checkpoints", n_checkpoints, 0)
    checkpoints = out_dir / CHECKPOINTS_FOLDER
    trainer_cfg = SAETrainerConfig(
        total_training_samples=training_tokens,
        train_batch_size_samples=train_batch_size_tokens,
        lr=lr,
        lr_end=lr,
        n_checkpoints=n_checkpoints,
        checkpoint_path=str(checkpoints) if n_checkpoints else None,
    )
    names = {name: name for name in saes}
    trainer = _StepProgressTrainer(trainer_cfg, saes, names, store, progress=progress)
    if resume:
        latest = latest_checkpoint(out_dir)
        trainer.load_checkpoint(latest)
        # SAELens saves a checkpoint after a step's samples are counted but before its step is:
        # the step count is one short; every step trains one batch, so count them from samples
        for step_counter in (trainer, *trainer.trainers.values()):
            step_counter.n_training_steps = trainer.n_training_samples // train_batch_size_tokens
        trainer.checkpoint_thresholds = [
            t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples
        ]
    trainer.fit()
    for site in sites:
        sparsity = trainer.trainers[site.hook_name].log_feature_sparsity
        _save(saes[site.hook_name], sparsity, targets[site.layer], overwrite)
    return targets


def latest_checkpoint(out_dir: str | Path) -> Path:
    """The checkpoint of ``train_attn_saes(..., n_checkpoints=N)`` into ``out_dir`` with the most
    training samples.

    Raises:
        FileNotFoundError: ``out_dir/checkpoints`` holds no checkpoint.
    """
    folder = Path(out_dir) / CHECKPOINTS_FOLDER
    found = (
        [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    )
    if not found:
        raise FileNotFoundError(
            f"no checkpoint to resume from in {folder}; train with n_checkpoints >= 1 "
            "(--checkpoints N) first, or drop resume (--resume)"
        )
    return max(found, key=lambda p: int(p.name))


class _StepProgressTrainer(MultiSAETrainer):
    """``MultiSAETrainer`` whose progress bar follows every step to the end.

    SAELens's bar advances by 100 steps' samples every 100 steps, so it stays at 0 for runs of
    fewer than 100 steps and stops short of the total by the last partial hundred; here it is
    set to the samples trained (at most the total) after every step, or hidden.
    """

    def __init__(self, *args: Any, progress: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    @torch.no_grad()
    def _update_pbar(
        self, step_outputs: dict[str, TrainStepOutput], pbar: Any, update_interval: int = 100
    ) -> None:
        if not self.progress:
            if not pbar.disable:
                pbar.leave = False
                pbar.clear()
                pbar.disable = True
            return
        done = min(self.n_training_samples, self.cfg.total_training_samples)
        pbar.update(done - pbar.n)
        if self.n_training_steps % update_interval == 1 or done == pbar.total:
            losses = " | ".join(
                f"{name}: {out.loss.item():.4f}" for name, out in step_outputs.items()
            )
            pbar.set_description(f"{self.n_training_steps}| {losses}", refresh=False)


def _save(sae: TrainingSAE[Any], log_sparsity: torch.Tensor, target: Path, overwrite: bool) -> None:
    with atomic_output(target, kind=OUTPUT_KIND, overwrite=overwrite) as folder:
        sae.save_inference_model(folder)
        save_file({"sparsity": log_sparsity.contiguous()}, folder / SPARSITY_FILENAME)
