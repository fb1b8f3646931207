"""How this package reads a SAELens SAE on hook_z: its input convention, its encoder, its device.

Every module that feeds z to an SAE goes through here: ``encode_z`` (SAELens's own ``encode``,
whether or not the SAE reshapes hook_z itself, with its ``hook_sae_acts_pre`` when asked),
``feature_acts`` (the same in blocks of tokens, for some features), ``sae_convention`` (the
value-bias convention the SAE was trained on), and the device and dtype checks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.config.metadata import read_attention_metadata
from sae_lens_attn.site import ValueBiasConvention

ENCODE_BLOCK = 2**24
"""Upper bound on ``tokens × d_sae`` per call of the SAE's ``encode``."""


class Encoded(NamedTuple):
    """An SAE's encoding of some z: its activations and, when asked, its pre-activations."""

    acts: Float[Tensor, " *batch d_sae"]
    """The SAE's own ``encode`` (ReLU, JumpReLU threshold, TopK selection, scaling)."""
    pre_acts: Float[Tensor, " *batch d_sae"] | None
    """SAELens's ``hook_sae_acts_pre`` for the same z (``None`` unless asked for)."""


def encode_z(
    sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"]
) -> Float[Tensor, " *batch d_sae"]:
    """Feature activations of z, whether or not the SAE reshapes hook_z itself."""
    reshapes = getattr(sae, "hook_z_reshaping_mode", False)
    return sae.encode((z if reshapes else z.flatten(-2)).to(sae.dtype))


def encode_with_pre(sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"]) -> Encoded:
    """``encode_z`` and the pre-activations SAELens itself computes on the way (read from its
    ``hook_sae_acts_pre``, so every architecture and normalisation is SAELens's own)."""
    seen: list[Tensor] = []

    def keep(_module: Any, _inputs: Any, output: Tensor) -> None:
        seen.append(output.detach())

    handle = sae.hook_sae_acts_pre.register_forward_hook(keep)
    try:
        acts = encode_z(sae, z)
    finally:
        handle.remove()
    return Encoded(acts, seen[-1].reshape(acts.shape))


def encode_blocks(
    sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"], *, pre: bool = False
) -> Encoded:
    """``encode_z`` (and ``encode_with_pre`` with ``pre``) in blocks of tokens, as
    ``feature_acts`` takes them, for every feature."""
    flat = z.flatten(0, -3)  # (N, H, D)
    block = max(1, ENCODE_BLOCK // sae.cfg.d_sae)
    parts = [
        encode_with_pre(sae, part) if pre else Encoded(encode_z(sae, part), None)
        for part in flat.split(block)
    ]
    acts = torch.cat([part.acts for part in parts]).unflatten(0, z.shape[:-2])
    if not pre:
        return Encoded(acts, None)
    pre_acts = torch.cat([part.pre_acts for part in parts if part.pre_acts is not None])
    return Encoded(acts, pre_acts.unflatten(0, z.shape[:-2]))


def feature_acts(
    sae: SAE[Any], z: Float[Tensor, " *batch n_heads d_head"], features: Int[Tensor, " F"]
) -> Float[Tensor, " *batch F"]:
    """The SAE's own activations of ``features`` (its ``encode``), in blocks of tokens.

    A BatchTopK training SAE selects over each block, not over the whole batch.
    """
    flat = z.flatten(0, -3)  # (N, H, D)
    block = max(1, ENCODE_BLOCK // sae.cfg.d_sae)
    acts = [encode_z(sae, part)[:, features] for part in flat.split(block)]
    return torch.cat(acts).unflatten(0, z.shape[:-2])


def sae_convention(sae: SAE[Any], default: ValueBiasConvention) -> ValueBiasConvention:
    """The value-bias convention an SAE was trained on (its metadata, else ``default``)."""
    return read_attention_metadata(sae.cfg.metadata).value_bias_convention or default


def check_device(sae: SAE[Any], activations: Tensor) -> None:
    """Raise ``ValueError`` unless the SAE's parameters are on the activations' device."""
    device = sae.W_enc.device
    if device != activations.device:
        raise ValueError(
            f"the SAE's parameters are on {device} but the model's activations are on "
            f"{activations.device}: move the SAE there with sae.to({str(activations.device)!r})"
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or a wider dtype if one of ``tensors`` has it: half-precision models included."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype
