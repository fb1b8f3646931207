"""Dead-feature resampling: Anthropic's scheme (*Towards Monosemanticity*, 2023), as Kissane et al.
used it to train their GPT-2 Small attention SAEs (``resample_scheme="anthropic"``,
``anthropic_neuron_resample_scale=0.2`` in their configs).

For a batch of inputs ``x_i`` (rows of flattened z) and the SAE's reconstructions ``x̂_i``:

1. input ``i`` is drawn with probability ``∝ (‖x_i − x̂_i‖²)²``, the square of its reconstruction
   loss (one draw per dead feature, without replacement while there are enough inputs);
2. the dead feature's decoder row becomes the drawn input normalised to unit norm;
3. its encoder column becomes the same direction scaled to ``encoder_scale`` × the mean norm of the
   alive features' encoder columns, and its encoder bias becomes 0;
4. the optimizer's per-entry state (Adam's moments) of exactly those rows, columns and biases is
   reset to 0, so stale moments do not push the new directions around.

Everything else (alive features, ``b_dec``, other parameters) is left bit-for-bit as it was.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Bool, Float
from sae_lens.saes.sae import TrainingSAE
from torch import Tensor

_CHUNK = 8192


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

    Args:
        sae: a SAELens training SAE with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` and
            ``b_enc [d_sae]`` (standard, topk, batchtopk, jumprelu; a jumprelu threshold is
            left as it is). Changed in place.
        inputs: activations as the SAE reads them during training (after any activation
            scaling the trainer applies), e.g. a few hundred thousand rows of flattened z.
        dead_mask: ``True`` for the features to resample, e.g. ``SAETrainer.dead_neurons``.
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
        TypeError: ``sae`` is not a SAELens ``TrainingSAE`` with ``W_enc``, ``W_dec``, ``b_enc``.
        ValueError: ``dead_mask`` or ``inputs`` have the wrong shape or dtype, ``encoder_scale``
            is not a positive number, ``generator`` is not a CPU generator, or every input is
            reconstructed exactly (nothing to sample from).

    Example:
        >>> n = sla.resample_dead_features(
        ...     trainer.sae, acts, trainer.dead_neurons, trainer.optimizer
        ... )
    """
    W_enc, W_dec, b_enc = _feature_parameters(sae)
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
    weights = _squared_losses(sae, x).double().cpu()
    weights[x.norm(dim=-1).cpu() == 0] = 0.0  # a zero input has no direction to give
    if not torch.isfinite(weights).all():
        raise ValueError("the SAE's reconstruction loss is not finite on some inputs")
    n_candidates = int((weights > 0).sum())
    if n_candidates == 0:
        raise ValueError(
            f"cannot resample {n_dead} dead features: the SAE reconstructs all {x.shape[0]} "
            "non-zero inputs exactly (or every input is zero), so no input has a loss to draw by"
        )
    picks = torch.multinomial(
        weights, n_dead, replacement=n_dead > n_candidates, generator=generator
    ).to(x.device)
    directions = x[picks]
    directions = directions / directions.norm(dim=-1, keepdim=True)  # (n_dead, d_in)

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


def _squared_losses(sae: TrainingSAE[Any], x: Tensor) -> Float[Tensor, " n_inputs"]:
    """``‖x_i − x̂_i‖²²`` squared, per input, computed in chunks."""
    losses = [
        (sae.decode(sae.encode(chunk)) - chunk).pow(2).sum(dim=-1).pow(2)
        for chunk in x.split(_CHUNK)
    ]
    return torch.cat(losses)


def _feature_parameters(sae: Any) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(sae, TrainingSAE):
        raise TypeError(
            f"resample_dead_features takes a SAELens TrainingSAE (it reads flattened inputs "
            f"[n, d_in] and is a training-time operation), got {type(sae).__name__}"
        )
    missing = [name for name in ("W_enc", "W_dec", "b_enc") if not hasattr(sae, name)]
    if missing:
        raise TypeError(
            f"{type(sae).__name__} has no {missing}: resampling needs W_enc [d_in, d_sae], "
            "W_dec [d_sae, d_in] and b_enc [d_sae] (standard, topk, batchtopk, jumprelu SAEs)"
        )
    W_enc: Tensor = sae.W_enc
    W_dec: Tensor = sae.W_dec
    b_enc: Tensor = sae.b_enc  # type: ignore[assignment]  # nn.Module.__getattr__
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,):
        raise TypeError(
            f"unexpected SAE parameter shapes: W_enc {tuple(W_enc.shape)}, W_dec "
            f"{tuple(W_dec.shape)}, b_enc {tuple(b_enc.shape)}; expected [d_in, d_sae], "
            "[d_sae, d_in], [d_sae]"
        )
    return W_enc, W_dec, b_enc


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
