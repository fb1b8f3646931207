"""Metrics: plain callables from a run's logits to one number per prompt.

A ``Metric`` takes logits ``[batch, pos, vocab]`` and returns ``[batch]``, differentiably, so the same
object scores a clean run, a corrupted run, a patched run and (through autograd) attribution
patching. ``logit_diff`` is the IOI metric of Wang et al. and Kissane et al.: at one position per
prompt, the logit of the right answer minus the logit of the wrong one.

Examples:
    >>> metric = logit_diff(positions=[3, 5], good_ids=[10, 11], bad_ids=[12, 13])
    >>> metric(torch.zeros(2, 6, 20)).shape
    torch.Size([2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor


@runtime_checkable
class Metric(Protocol):
    """A callable from logits ``[batch, pos, vocab]`` to one value per prompt ``[batch]``."""

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]: ...


@dataclass(frozen=True, eq=False)
class LogitDiff:
    """``logits[i, positions[i], good_ids[i]] - logits[i, positions[i], bad_ids[i]]`` per prompt
    ``i`` (a ``Metric``; made by ``logit_diff``, which checks its arguments)."""

    positions: Int[Tensor, " batch"]
    """The position read in each prompt (e.g. IOI's ``end``, whose next token is the answer)."""
    good_ids: Int[Tensor, " batch"]
    """The token counted positively in each prompt (IOI: the indirect object)."""
    bad_ids: Int[Tensor, " batch"]
    """The token counted negatively in each prompt (IOI: the subject)."""

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """The logit difference of each prompt, differentiable in ``logits``.

        Raises:
            TypeError: ``logits`` is not a floating-point tensor.
            ValueError: ``logits`` is not ``[batch, pos, vocab]`` with this metric's batch, or a
                position or id lies outside it.
        """
        if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
            got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                f"logits must be a floating-point tensor [batch, pos, vocab], got {got}"
            )
        batch = self.positions.shape[0]
        if logits.ndim != 3 or logits.shape[0] != batch:
            raise ValueError(
                f"logits must be [batch, pos, vocab] with batch={batch} (one row per prompt of "
                f"this metric), got shape {tuple(logits.shape)}"
            )
        _check_range("positions", self.positions, logits.shape[1], "positions")
        _check_range("good_ids", self.good_ids, logits.shape[2], "vocabulary ids")
        _check_range("bad_ids", self.bad_ids, logits.shape[2], "vocabulary ids")
        rows = torch.arange(batch, device=logits.device)
        at = logits[rows, self.positions.to(logits.device)]  # (B, vocab)
        good = at[rows, self.good_ids.to(logits.device)]
        bad = at[rows, self.bad_ids.to(logits.device)]
        return good - bad


def logit_diff(positions: Any, good_ids: Any, bad_ids: Any) -> Metric:
    """The metric ``logits[i, positions[i], good_ids[i]] - logits[i, positions[i], bad_ids[i]]``.

    Args:
        positions: one position per prompt, ``[batch]`` integers (a tensor or a sequence).
        good_ids: one token id per prompt, ``[batch]``, counted positively.
        bad_ids: one token id per prompt, ``[batch]``, counted negatively.

    Returns:
        A ``Metric``: called on logits ``[batch, pos, vocab]`` it returns ``[batch]``, on the
        logits' device and differentiable in them (for attribution patching).

    Raises:
        TypeError: an argument that is not integers.
        ValueError: an argument that is not one value per prompt (``[batch]``), lengths that
            differ, or negative values.

    Examples:
        >>> prompts = ioi_prompts(tokenizer)
        >>> metric = logit_diff(prompts.word_idx["end"], prompts.io_ids, prompts.s_ids)
        >>> metric(model(prompts.tokens))  # logit(IO) - logit(S) at the end, per prompt
    """
    checked = {
        name: _per_prompt(name, value)
        for name, value in (("positions", positions), ("good_ids", good_ids), ("bad_ids", bad_ids))
    }
    lengths = {name: int(value.shape[0]) for name, value in checked.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            "positions, good_ids and bad_ids must give one value per prompt each (the same "
            f"length), got lengths {lengths}"
        )
    return LogitDiff(**checked)


def _per_prompt(name: str, value: Any) -> Int[Tensor, " batch"]:
    """``value`` as a 1-d long tensor of non-negative integers."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be integers, one per prompt, got {type(value).__name__}")
    try:
        tensor = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{name} must be integers, one per prompt ([batch]), got {type(value).__name__}"
        ) from error
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, one per prompt, got dtype {tensor.dtype}")
    if tensor.ndim != 1 or tensor.shape[0] == 0:
        raise ValueError(
            f"{name} must be one integer per prompt, shape [batch] with batch >= 1, got shape "
            f"{tuple(tensor.shape)}"
        )
    if (tensor < 0).any():
        raise ValueError(
            f"{name} must be non-negative, got {tensor[tensor < 0].tolist()[:10]} "
            "(negative indices are refused: rows are right-padded, so -1 is not the last token)"
        )
    return tensor.long()


def _check_range(name: str, values: Tensor, size: int, what: str) -> None:
    bad = values[values >= size]
    if bad.numel():
        raise ValueError(
            f"{name} {bad.tolist()[:10]} are out of range for logits with {size} {what} "
            f"(valid: 0..{size - 1})"
        )
