"""``sla.hooked``: a Hugging Face causal LM behind TransformerLens-style hook points.

SAELens's ``ActivationsStore``, ``LanguageModelSAETrainingRunner`` and ``run_evals`` drive models
through ``HookedRootModule`` hook points. Its ``HookedProxyLM`` hooks module *outputs*, and z is
the *input* of the attention output projection, so it cannot see z. ``HookedHFModel`` exposes
``blocks.L.attn.hook_z`` (``[batch, pos, n_heads, d_head]``, replaceable), ``hook_v``
(``[batch, pos, n_kv_heads, d_head]``) and ``hook_pattern`` (``[batch, n_heads, q, k]``), both
read-only, with every forward pass run through the nnsight backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedTransformer import Output

# TransformerLens 3 deprecates the old paths of these two; 2.18 has only those.
if TYPE_CHECKING:  # the one path both stacks' type stubs resolve
    from transformer_lens.hook_points import HookedRootModule
else:
    try:
        from transformer_lens import HookedRootModule
    except ImportError:
        from transformer_lens.hook_points import HookedRootModule
try:
    from transformer_lens.utilities import (
        lm_cross_entropy_loss,  # pyright: ignore[reportAttributeAccessIssue]
    )
except ImportError:
    from transformer_lens.utils import lm_cross_entropy_loss

from sae_lens_attn.backends import SUPPORTED_MODEL_TYPES, is_hf_model
from sae_lens_attn.backends.base import Interventions

ReturnType = Literal["logits", "loss", "both"] | None


@dataclass(frozen=True)
class HookedHFConfig:
    """The few TransformerLens-style config fields SAELens and users read off a model."""

    n_layers: int
    """Number of decoder layers."""
    n_heads: int
    """Query heads per layer."""
    n_key_value_heads: int
    """Key/value heads per layer (grouped-query attention)."""
    d_head: int
    """Width of one head's z."""
    d_vocab: int
    """Vocabulary size."""
    device: str
    """Device of the model's parameters."""
    default_prepend_bos: bool = True
    """``to_tokens`` prepends BOS unless told otherwise, as TransformerLens does."""


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_z = HookPoint()
        self.hook_v = HookPoint()
        self.hook_pattern = HookPoint()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()


class HookedHFModel(HookedRootModule):
    """A Hugging Face causal LM with ``blocks.L.attn.hook_{z,v,pattern}`` hook points.

    Use it wherever SAELens takes a ``HookedRootModule`` (``override_model=`` of the runner,
    ``run_evals``, ``ActivationsStore``), and with this package's own store and analyzers.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, remote: bool = False) -> None:
        _check_hf_model(model, "HookedHFModel wraps a Hugging Face causal LM")
        from sae_lens_attn.backends.nnsight import NNsightBackend  # imports nnsight

        super().__init__()
        backend = NNsightBackend(model, tokenizer, remote=remote)
        self.attn_backend = backend
        self.model: Any = backend.model
        self.tokenizer = backend.tokenizer
        site = backend.site(0)
        self.cfg = HookedHFConfig(
            n_layers=backend.n_layers,
            n_heads=site.n_heads,
            n_key_value_heads=site.n_kv_heads,
            d_head=site.d_head,
            d_vocab=self.model.config.vocab_size,
            device=str(next(self.model.parameters()).device),
        )
        self.blocks = nn.ModuleList(_Block() for _ in range(backend.n_layers))
        self.setup()

    def forward(
        self,
        input: Int[Tensor, " batch pos"] | str | list[str],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        stop_at_layer: int | None = None,
        attention_mask: Int[Tensor, " batch pos"] | None = None,
        prepend_bos: bool | None = None,
        **_: Any,
    ) -> Any:
        """Run the model; hooked hook points see (and for z, may replace) activations.

        ``stop_at_layer=n`` runs layers ``0..n-1`` and returns ``None``. ``prepend_bos`` applies
        to text input only.
        """
        tokens = (
            self.to_tokens(input, prepend_bos=prepend_bos)
            if isinstance(input, str | list)
            else input
        )
        logits = self.attn_backend.run(
            tokens, self._plan(), stop_at_layer=stop_at_layer, attention_mask=attention_mask
        )
        if logits is None or return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = lm_cross_entropy_loss(
            logits, tokens.to(logits.device), attention_mask, per_token=loss_per_token
        )
        return loss if return_type == "loss" else Output(logits, loss)

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, " batch pos"]:
        """Tokenize like ``HookedTransformer.to_tokens``: BOS first unless ``prepend_bos=False``."""
        if self.tokenizer is None:
            raise ValueError(
                "to_tokens needs a tokenizer: pass one to sla.hooked(model, tokenizer)"
            )
        texts = [input] if isinstance(input, str) else list(input)
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        bos = self.tokenizer.bos_token_id
        if prepend_bos is not False and bos is not None:
            rows = [[bos, *row] for row in rows]
        max_length = getattr(self.model.config, "max_position_embeddings", None)
        if truncate and max_length:
            rows = [row[:max_length] for row in rows]
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        left = (padding_side or self.tokenizer.padding_side) == "left"
        width = max(len(row) for row in rows)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, slice(width - len(row), width) if left else slice(0, len(row))] = (
                torch.tensor(row)
            )
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def _plan(self) -> Interventions:
        """Route activations through every hook point that currently has hooks."""
        plan = Interventions()
        for layer, block in enumerate(self.blocks):
            attn: Any = block.attn
            if attn.hook_z._forward_hooks:
                plan.add("z", layer, attn.hook_z)
            if attn.hook_v._forward_hooks:
                plan.add("values", layer, _read_only(attn.hook_v))
            if attn.hook_pattern._forward_hooks:
                plan.add("patterns", layer, _read_only(attn.hook_pattern))
        return plan


def _read_only(hook_point: HookPoint):
    def call(activation: Tensor) -> None:
        hook_point(activation)

    return call


def hooked(model: Any, tokenizer: Any = None, *, remote: bool = False) -> Any:
    """``model`` as a ``HookedRootModule`` with ``blocks.L.attn.hook_z``.

    A ``HookedTransformer`` (or a model already returned by ``hooked``) comes back unchanged; a
    Hugging Face causal LM (plain or wrapped by nnsight) comes back as a ``HookedHFModel``.
    nnsight is imported here, on first use, never by ``import sae_lens_attn``.

    Args:
        model: the model.
        tokenizer: its tokenizer (needed for text input and to wrap a plain model with nnsight).
        remote: run forward passes on NDIF through nnsight.

    Raises:
        TypeError: ``model`` is of another type; the message lists the supported types.

    Examples:
        >>> hooked_model = sla.hooked(AutoModelForCausalLM.from_pretrained("gpt2"), tokenizer)
        >>> _, cache = hooked_model.run_with_cache(tokens, names_filter="blocks.5.attn.hook_z")
    """
    if isinstance(model, HookedTransformer | HookedHFModel):
        return model
    _check_hf_model(model, "sla.hooked takes a HookedTransformer or a Hugging Face causal LM")
    return HookedHFModel(model, tokenizer, remote=remote)


def _check_hf_model(model: Any, what: str) -> None:
    if not is_hf_model(model):
        raise TypeError(
            f"{what}, got {type(model).__module__}.{type(model).__qualname__}; supported: "
            f"{[name for name, backend in SUPPORTED_MODEL_TYPES.items() if backend != 'bridge']}"
        )
