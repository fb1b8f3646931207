"""Dead-feature resampling as Kissane et al. trained their GPT-2 Small attention SAEs: Anthropic's
scheme (*Towards Monosemanticity*, 2023), its schedule, and the learning-rate warm-up after it.

What their code does (``ckkissane/attention-output-saes``: ``anthropic_resample`` and
``reset_optimizer`` in ``common/utils.py``, the loop in ``train.py``), and what this module does:

- **Which features** (``select_dead_features``): those whose firing frequency over the last
  ``anthropic_resample_last`` steps is *at or below* ``dead_direction_cutoff`` (``freqs <= cutoff``;
  the published configs use 1e-6, 3.16e-6 or 1e-5 depending on the layer).
- **When** (``ResampleSchedule``): after every ``re_init_every`` steps, ``num_resamples`` times
  (published: every 25,000 steps, 4 times, frequencies over the last 12,500 steps).
- **How** (``resample_dead_features``), for a pool of inputs ``x_i`` (100 training batches):

  1. input ``i`` is drawn with probability ``∝ (‖x_i − x̂_i‖²)²``, the square of its
     reconstruction loss, one draw per dead feature, without replacement (with replacement only
     when fewer inputs than dead features have a loss);
  2. the dead feature's decoder row becomes ``(x_i − b_dec) / ‖x_i − b_dec‖``: the part of the
     input that the decoder bias does not already supply, normalised;
  3. its encoder column becomes that direction times 0.2 (``anthropic_neuron_resample_scale``) ×
     the mean norm of the alive features' encoder columns, and its encoder bias becomes 0;
  4. Adam's ``exp_avg`` and ``exp_avg_sq`` of exactly those encoder columns, decoder rows and
     encoder biases are reset to 0.

  Everything else (alive features, ``b_dec``, other parameters) is left bit-for-bit as it was.
- **Learning rate after it** (``ResampleWarmupLR``): a cosine warm-up from 0.1 × lr
  (``sched_lr_factor``) back to lr over 1,000 steps (``sched_epochs``), at the start of training
  and after every resampling that changed something; lr is constant otherwise. (Their
  ``CosineAnnealingLR(T_max=1000, eta_min=0.1·lr)`` is stepped to its minimum at the start and at
  each resampling, then once per step until it is back at lr.)

Differences from their code: where no input of the pool has a reconstruction loss,
``resample_dead_features`` raises instead of skipping silently (theirs skips when any one batch
of the pool is reconstructed to < 1e-6); a zero ``x_i − b_dec`` is never drawn (theirs divides by
``‖·‖ + 1e-8``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from sae_lens.saes.sae import TrainingSAE
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

_CHUNK = 8192


@dataclass(frozen=True)
class ResampleSchedule:
    """When dead features are resampled, over which steps their frequency is counted, and the
    learning-rate warm-up that follows; the defaults are Kissane et al.'s published GPT-2 Small
    configs (``re_init_every``, ``num_resamples``, ``anthropic_resample_last``, ``sched_epochs``,
    ``sched_lr_factor``). Steps are counted as *completed* optimizer steps."""

    every: int = 25_000
    """Steps between resamplings (``re_init_every``): resample after steps every, 2·every, ...."""
    count: int = 4
    """Number of resamplings (``num_resamples``)."""
    window: int = 12_500
    """Firing frequencies are counted over the last ``window`` steps before each resampling
    (``anthropic_resample_last``); at most ``every``."""
    warmup_steps: int = 1_000
    """Length of the cosine learning-rate warm-up after each resampling (``sched_epochs``)."""
    warmup_start: float = 0.1
    """Learning rate at the start of a warm-up, as a fraction of lr (``sched_lr_factor``)."""

    def __post_init__(self) -> None:
        for name in ("every", "count", "window", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.every < 1 or not 1 <= self.window <= self.every:
            raise ValueError(
                f"expected every >= 1 and 1 <= window <= every, got every={self.every}, "
                f"window={self.window}"
            )
        _check_warmup(self.warmup_steps, self.warmup_start)

    @property
    def resample_steps(self) -> tuple[int, ...]:
        """The completed-step counts after which features are resampled."""
        return tuple(self.every * k for k in range(1, self.count + 1))

    def is_resample_step(self, step: int) -> bool:
        """Whether to resample after ``step`` completed steps."""
        return step in self.resample_steps

    def starts_window(self, step: int) -> bool:
        """Whether firing counts restart after ``step`` completed steps, so that the next
        resampling sees exactly the last ``window`` steps (and nothing before a resampling)."""
        return step > 0 and (step % self.every == 0 or (step + self.window) % self.every == 0)


def cosine_warmup_factor(steps_since_start: int, warmup_steps: int, start: float = 0.1) -> float:
    """Learning-rate multiplier ``steps_since_start`` steps into a cosine warm-up.

    ``start + (1 − start)·(1 − cos(π·t/T))/2`` for ``0 <= t < T`` (``start`` at ``t = 0``), 1 from
    ``t = T`` on (and before any warm-up, ``t < 0``). This is the second half-period of
    ``CosineAnnealingLR(T_max=T, eta_min=start·lr)``, as Kissane et al. ran it.

    Raises:
        ValueError: ``warmup_steps`` is negative or ``start`` is not in (0, 1].
    """
    _check_warmup(warmup_steps, start)
    if steps_since_start < 0 or steps_since_start >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * (1.0 - math.cos(math.pi * steps_since_start / warmup_steps)) / 2


class ResampleWarmupLR(LRScheduler):
    """Constant learning rate with a cosine warm-up at the start and after each ``restart()``.

    The j-th optimizer step after a (re)start uses ``lr · cosine_warmup_factor(j, warmup_steps,
    start)``: ``start · lr`` first, lr again from the ``warmup_steps``-th on. Call ``step()``
    after each ``optimizer.step()`` as usual, and ``restart()`` right after resampling.

    Examples:
        >>> trainer.lr_scheduler = ResampleWarmupLR(trainer.optimizer, warmup_steps=1000)
        >>> ...  # after resample_dead_features(trainer.sae, ..., trainer.optimizer):
        >>> trainer.lr_scheduler.restart()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int = 1_000,
        start: float = 0.1,
        warmup_at_start: bool = True,
    ) -> None:
        """
        Args:
            optimizer: the optimizer whose learning rates (its groups' ``initial_lr``, else
                ``lr``) are the targets of the warm-up.
            warmup_steps: steps from ``start · lr`` back to lr.
            start: fraction of lr the warm-up starts from.
            warmup_at_start: warm up at the first step too (Kissane et al.: yes).

        Raises:
            ValueError: ``warmup_steps`` is negative or ``start`` is not in (0, 1].
        """
        _check_warmup(warmup_steps, start)
        self.warmup_steps = warmup_steps
        self.start = start
        self.restarted_at = 0 if warmup_at_start else -1
        super().__init__(optimizer)

    def get_lr(self) -> list[float | Tensor]:
        """The learning rates of the next optimizer step (called by ``step()``)."""
        return list(self._lrs())

    def restart(self) -> None:
        """Start a warm-up now: the next optimizer step uses ``start · lr``."""
        self.restarted_at = self.last_epoch
        lrs = self._lrs()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = list(lrs)

    def _lrs(self) -> list[float]:
        since = self.last_epoch - self.restarted_at if self.restarted_at >= 0 else -1
        factor = cosine_warmup_factor(since, self.warmup_steps, self.start)
        return [float(base) * factor for base in self.base_lrs]


def select_dead_features(
    frequency: Float[Tensor, " d_sae"], cutoff: float
) -> Bool[Tensor, " d_sae"]:
    """Features to resample: firing frequency at or below ``cutoff`` (compared in float64).

    Args:
        frequency: share of the counted tokens at which each feature was active.
        cutoff: ``dead_direction_cutoff`` (Kissane et al.: 1e-6 to 1e-5 by layer); 0 selects the
            features that never fired.

    Raises:
        ValueError: ``frequency`` is not a 1-d floating-point tensor of values in [0, 1], or
            ``cutoff`` is not a finite number in [0, 1).
    """
    if (
        not isinstance(frequency, Tensor)
        or frequency.ndim != 1
        or not frequency.is_floating_point()
    ):
        got = (
            f"{frequency.dtype} of shape {tuple(frequency.shape)}"
            if isinstance(frequency, Tensor)
            else type(frequency).__name__
        )
        raise ValueError(f"frequency must be a 1-d floating-point tensor [d_sae], got {got}")
    if (
        isinstance(cutoff, bool)
        or not isinstance(cutoff, int | float)
        or not math.isfinite(cutoff)
        or not 0 <= cutoff < 1
    ):
        raise ValueError(f"cutoff must be a frequency in [0, 1), got {cutoff!r}")
    values = frequency.double()
    if bool(((values < 0) | (values > 1) | values.isnan()).any()):
        raise ValueError(
            "frequency must hold shares of tokens in [0, 1], got values from "
            f"{values.min().item()} to {values.max().item()}"
        )
    return values <= cutoff


@torch.no_grad()
def resample_dead_features(
    sae: TrainingSAE[Any],
    inputs: Float[Tensor, " n_inputs d_in"],
    dead_mask: Bool[Tensor, " d_sae"],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    encoder_scale: float = 0.2,
    generator: torch.Generator | None = None,
) -> int:
    """Give every dead feature of ``sae`` a new direction drawn from poorly reconstructed inputs.

    A drawn input ``x`` gives the direction ``(x − b_dec) / ‖x − b_dec‖`` (see the module
    docstring for the whole procedure).

    Args:
        sae: a SAELens training SAE with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
            ``b_enc [d_sae]`` and ``b_dec [d_in]`` (standard, topk, batchtopk, jumprelu; a
            jumprelu threshold is left as it is). Changed in place.
        inputs: activations as the SAE reads them during training (after any activation
            scaling the trainer applies), e.g. a hundred training batches of flattened z.
        dead_mask: ``True`` for the features to resample, e.g. ``select_dead_features(...)``.
        optimizer: the optimizer over ``sae``'s parameters (e.g. ``SAETrainer.optimizer``); its
            per-entry state tensors (Adam's ``exp_avg``, ``exp_avg_sq``) are zeroed at the
            resampled entries. Step counters are shared by all entries and left alone.
        encoder_scale: norm of a new encoder column relative to the mean norm of the alive
            features' columns (Anthropic and Kissane et al.: 0.2). Without alive features the
            reference norm is 1.
        generator: CPU generator of the draws, for reproducible resampling.

    Returns:
        The number of features resampled (``dead_mask.sum()``).

    Raises:
        TypeError: ``sae`` is not a SAELens ``TrainingSAE`` with ``W_enc``, ``W_dec``, ``b_enc``,
            ``b_dec``.
        ValueError: ``dead_mask`` or ``inputs`` have the wrong shape or dtype, ``encoder_scale``
            is not a positive number, ``generator`` is not a CPU generator, or every input is
            reconstructed exactly or equals ``b_dec`` (nothing to sample from).

    Examples:
        >>> dead = select_dead_features(fired / n_tokens, cutoff=1e-6)
        >>> n = sla.resample_dead_features(trainer.sae, acts, dead, trainer.optimizer)
    """
    W_enc, W_dec, b_enc, b_dec = _feature_parameters(sae)
    d_in, d_sae = W_enc.shape
    _check_mask(dead_mask, d_sae)
    _check_inputs(inputs, d_in)
    if (
        not isinstance(encoder_scale, int | float)
        or isinstance(encoder_scale, bool)
        or not math.isfinite(encoder_scale)
        or encoder_scale <= 0
    ):
        raise ValueError(f"encoder_scale must be a positive finite number, got {encoder_scale!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")

    dead = dead_mask.to(W_dec.device)
    dead_idx = dead.nonzero().squeeze(-1)
    n_dead = int(dead_idx.numel())
    if n_dead == 0:
        return 0

    x = inputs.to(W_dec.device, W_dec.dtype)
    centred = x - b_dec  # (n_inputs, d_in): what the features must add to the decoder bias
    norms = centred.norm(dim=-1)
    weights = _squared_losses(sae, x).double().cpu()
    weights[norms.cpu() == 0] = 0.0  # an input equal to b_dec has no direction to give
    if not torch.isfinite(weights).all():
        raise ValueError("the SAE's reconstruction loss is not finite on some inputs")
    n_candidates = int((weights > 0).sum())
    if n_candidates == 0:
        raise ValueError(
            f"cannot resample {n_dead} dead features: of the {x.shape[0]} inputs, every one is "
            "reconstructed exactly or equals b_dec, so no input has a loss to draw by"
        )
    picks = torch.multinomial(
        weights, n_dead, replacement=n_dead > n_candidates, generator=generator
    ).to(x.device)
    directions = centred[picks] / norms[picks, None]  # (n_dead, d_in), unit rows

    alive = ~dead
    reference = W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else W_enc.new_tensor(1.0)
    W_dec.data[dead_idx] = directions
    W_enc.data[:, dead_idx] = (directions * (encoder_scale * reference)).T
    b_enc.data[dead_idx] = 0.0

    if optimizer is not None:
        for param, index in (
            (W_enc, (slice(None), dead_idx)),
            (W_dec, dead_idx),
            (b_enc, dead_idx),
        ):
            # the optimizer's state is keyed by the Parameter objects themselves
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value[index] = 0
    return n_dead


def _check_warmup(warmup_steps: Any, start: Any) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if (
        isinstance(start, bool)
        or not isinstance(start, int | float)
        or not math.isfinite(start)
        or not 0 < start <= 1
    ):
        raise ValueError(
            f"the warm-up's start must be a fraction of lr in (0, 1] (Kissane et al.: 0.1), "
            f"got {start!r}"
        )


def _squared_losses(sae: TrainingSAE[Any], x: Tensor) -> Float[Tensor, " n_inputs"]:
    """``‖x_i − x̂_i‖²²`` squared, per input, computed in chunks."""
    losses = [
        (sae.decode(sae.encode(chunk)) - chunk).pow(2).sum(dim=-1).pow(2)
        for chunk in x.split(_CHUNK)
    ]
    return torch.cat(losses)


def _feature_parameters(sae: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not isinstance(sae, TrainingSAE):
        raise TypeError(
            f"resample_dead_features takes a SAELens TrainingSAE (it reads flattened inputs "
            f"[n, d_in] and is a training-time operation), got {type(sae).__name__}"
        )
    missing = [name for name in ("W_enc", "W_dec", "b_enc", "b_dec") if not hasattr(sae, name)]
    if missing:
        raise TypeError(
            f"{type(sae).__name__} has no {missing}: resampling needs W_enc [d_in, d_sae], "
            "W_dec [d_sae, d_in], b_enc [d_sae] and b_dec [d_in] (standard, topk, batchtopk, "
            "jumprelu SAEs)"
        )
    W_enc: Tensor = sae.W_enc
    W_dec: Tensor = sae.W_dec
    b_enc: Tensor = sae.b_enc  # type: ignore[assignment]  # nn.Module.__getattr__
    b_dec: Tensor = sae.b_dec
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise TypeError(
            f"unexpected SAE parameter shapes: W_enc {tuple(W_enc.shape)}, W_dec "
            f"{tuple(W_dec.shape)}, b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}; "
            "expected [d_in, d_sae], [d_sae, d_in], [d_sae], [d_in]"
        )
    return W_enc, W_dec, b_enc, b_dec


def _check_mask(dead_mask: Any, d_sae: int) -> None:
    if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool:
        got = dead_mask.dtype if isinstance(dead_mask, Tensor) else type(dead_mask).__name__
        raise ValueError(f"dead_mask must be a bool tensor of shape ({d_sae},), got {got}")
    if tuple(dead_mask.shape) != (d_sae,):
        raise ValueError(
            f"dead_mask must have shape (d_sae,) = ({d_sae},), one entry per feature, got "
            f"{tuple(dead_mask.shape)}"
        )


def _check_inputs(inputs: Any, d_in: int) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        got = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a floating-point tensor [n_inputs, {d_in}], got {got}")
    if inputs.ndim != 2 or inputs.shape[1] != d_in or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must have shape [n_inputs >= 1, d_in={d_in}] (flattened z, heads "
            f"concatenated), got {tuple(inputs.shape)}"
        )
