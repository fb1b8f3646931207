"""The hook_z activation store: flattened z for many layers from one model pass, shuffled in a buffer.

Iterating the store yields ``{hook_name: [train_batch_size_tokens, d_in]}``, SAELens's
``MultiHookDataProvider``, so ``MultiSAETrainer`` trains one SAE per layer from a single stream;
``store.data_provider()`` is the plain ``DataProvider`` that ``SAETrainer`` takes for one site.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from torch import Tensor

from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.backends.base import check_convention
from sae_lens_attn.site import AttnSite, ValueBiasConvention
from sae_lens_attn.validation import check_count, check_tokens

TokenBatch = Int[Tensor, " batch ctx"] | tuple[Int[Tensor, " batch ctx"], Int[Tensor, " batch ctx"]]
"""A batch of token ids, optionally with an attention mask (0 marks padding)."""


@dataclass(frozen=True)
class TokenBatches:
    """A re-iterable source of token batches cut from one ``[n_rows, ctx]`` tensor."""

    tokens: Int[Tensor, " n_rows ctx"]
    """All rows, each one context."""
    batch_size: int
    """Rows per model pass."""

    def __post_init__(self) -> None:
        check_tokens(self.tokens)  # ids against a vocabulary: the store checks them with the model
        object.__setattr__(self, "batch_size", check_count("batch_size", self.batch_size))

    def __iter__(self) -> Iterator[Int[Tensor, " batch ctx"]]:
        for start in range(0, self.tokens.shape[0], self.batch_size):
            yield self.tokens[start : start + self.batch_size]

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        texts: Iterable[str],
        *,
        context_size: int,
        batch_size: int,
        prepend_bos: bool = True,
    ) -> TokenBatches:
        """Tokenize, concatenate and cut ``texts`` into contexts exactly as SAELens does.

        With ``prepend_bos`` every context starts with the tokenizer's BOS token, and documents
        are separated by BOS, as in SAELens's ``ActivationsStore``.
        """
        bos = tokenizer.bos_token_id
        if prepend_bos and bos is None:
            raise ValueError("prepend_bos=True needs a tokenizer with a bos_token_id; it has none")
        docs = (
            torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for text in texts
        )
        rows = list(
            concat_and_batch_sequences(
                tokens_iterator=docs,
                context_size=context_size,
                begin_batch_token_id=bos if prepend_bos else None,
                sequence_separator_token_id=bos,
            )
        )
        if not rows:
            raise ValueError(f"the texts hold fewer than context_size={context_size} tokens")
        return cls(torch.stack(rows), batch_size)


class AttnActivationStore(Iterator[dict[str, Tensor]]):
    """Streams flattened z ``[tokens, n_heads*d_head]`` for one or many attention sites.

    Each model pass stops after the last layer needed and serves every site, so training SAEs
    for all layers costs about one pass. Rows are shuffled through a buffer with a seeded
    generator; BOS and other ``exclude_special_tokens`` and padded positions never reach it.

    Examples:
        >>> store = AttnActivationStore(model, [0, 1], TokenBatches(tokens, 8))
        >>> batch = next(store)   # {"blocks.0.attn.hook_z": [4096, d_in], "blocks.1...": ...}
    """

    def __init__(
        self,
        model: Any,
        sites: Sequence[AttnSite | int],
        token_batches: Iterable[TokenBatch],
        *,
        train_batch_size_tokens: int = 4096,
        buffer_size_tokens: int = 65536,
        mix_fraction: float = 0.5,
        convention: ValueBiasConvention = "folded",
        exclude_special_tokens: Sequence[int] | None = None,
        cycle: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model: any model a backend supports (or a backend).
            sites: the sites to serve, as ``AttnSite``s or layer indices.
            token_batches: re-iterable source of ``[batch, ctx]`` token ids, or of
                ``(tokens, attention_mask)`` pairs.
            train_batch_size_tokens: rows per yielded batch.
            buffer_size_tokens: rows held for shuffling before serving.
            mix_fraction: share of the buffer kept back to mix with the next model passes.
            convention: value-bias convention of the z served (see ``ValueBiasConvention``).
            exclude_special_tokens: token ids whose positions are dropped (e.g. BOS).
            cycle: start the token source again when it ends (epochs), as SAELens does.
            device: where the served activations live.
            dtype: their dtype.
            seed: seed of the shuffling generator.
        """
        self.backend: AttnBackend = backend_for(model)
        self.sites = tuple(s if isinstance(s, AttnSite) else self.backend.site(s) for s in sites)
        if not self.sites:
            raise ValueError("AttnActivationStore needs at least one site, got none")
        if len({s.layer for s in self.sites}) != len(self.sites):
            raise ValueError(f"sites repeat a layer: {[s.layer for s in self.sites]}")
        train_batch_size_tokens = check_count("train_batch_size_tokens", train_batch_size_tokens)
        buffer_size_tokens = check_count("buffer_size_tokens", buffer_size_tokens)
        if buffer_size_tokens < train_batch_size_tokens:
            raise ValueError(
                "need 1 <= train_batch_size_tokens <= buffer_size_tokens, got "
                f"{train_batch_size_tokens} and {buffer_size_tokens}"
            )
        if not 0.0 <= mix_fraction < 1.0:
            raise ValueError(f"mix_fraction must be in [0, 1), got {mix_fraction}")
        self.token_batches = token_batches
        self.train_batch_size_tokens = train_batch_size_tokens
        self.buffer_size_tokens = buffer_size_tokens
        self.mix_fraction = mix_fraction
        self.convention: ValueBiasConvention = check_convention(convention)
        self.exclude_special_tokens = (
            None if exclude_special_tokens is None else torch.tensor(list(exclude_special_tokens))
        )
        self.cycle = cycle
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.model_passes = 0
        self.epochs = 0
        self._batches: Iterator[dict[str, Tensor]] | None = None

    @property
    def hook_names(self) -> list[str]:
        """Hook names of the served sites, in order; the keys of every yielded batch."""
        return [site.hook_name for site in self.sites]

    @torch.no_grad()
    def activations(self, batch: TokenBatch) -> dict[str, Float[Tensor, " tokens d_in"]]:
        """Flattened z of every site for one token batch, from one model pass, unshuffled.

        Positions that are padding or excluded special tokens are dropped.
        """
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        check_tokens(tokens, self.backend)
        captures = self.backend.capture(
            tokens, self.sites, convention=self.convention, attention_mask=mask
        )
        keep = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
        if self.exclude_special_tokens is not None:
            keep &= ~torch.isin(tokens.cpu(), self.exclude_special_tokens)
        keep = keep.flatten().to(tokens.device)
        # With nothing to drop, z is served as captured: copying it through the mask took
        # about 5% of a GPT-2-small pass on CPU.
        keep_all = bool(keep.all())
        self.model_passes += 1
        flat = {site.hook_name: captures[site.layer].z_flat.flatten(0, 1) for site in self.sites}
        return {
            name: (z if keep_all else z[keep]).to(self.device, self.dtype)
            for name, z in flat.items()
        }

    def __next__(self) -> dict[str, Tensor]:
        if self._batches is None:
            self._batches = self._shuffled_batches()
        return next(self._batches)

    def __iter__(self) -> AttnActivationStore:
        return self

    def data_provider(self) -> Iterator[Float[Tensor, " batch d_in"]]:
        """The store as SAELens's single-site ``DataProvider`` (for ``SAETrainer``).

        Raises:
            ValueError: the store serves more than one site; use the store itself with
                ``MultiSAETrainer`` instead.
        """
        if len(self.sites) != 1:
            raise ValueError(
                f"data_provider() serves one site, this store serves {self.hook_names}; "
                "iterate the store itself (a MultiHookDataProvider) to train them together"
            )
        (hook_name,) = self.hook_names
        return (batch[hook_name] for batch in self)

    def _model_batches(self) -> Iterator[Tensor]:
        """Packed ``[tokens, Σ d_in]`` activations, one model pass each, over epochs."""
        while True:
            served = 0
            for batch in self.token_batches:
                acts = self.activations(batch)
                served += 1
                yield torch.cat([acts[name] for name in self.hook_names], dim=1)
            if served == 0:
                raise ValueError(
                    "the token source yielded no batches"
                    + (" on a new epoch: pass a re-iterable source" if self.epochs else "")
                )
            self.epochs += 1
            if not self.cycle:
                return
            if self.epochs == 1:  # once per store: later epochs add nothing new to say
                warnings.warn(
                    "token source exhausted after 1 epoch; starting it again (further epochs "
                    "repeat the same tokens; give more text for unrepeated training)",
                    stacklevel=2,
                )

    def _shuffled_batches(self) -> Iterator[dict[str, Tensor]]:
        widths = [site.d_in for site in self.sites]
        buffer = torch.empty(0, sum(widths), device=self.device, dtype=self.dtype)
        keep = int(self.buffer_size_tokens * self.mix_fraction)
        for packed in self._model_batches():
            buffer = torch.cat([buffer, packed])
            if buffer.shape[0] < self.buffer_size_tokens:
                continue
            buffer = buffer[
                torch.randperm(buffer.shape[0], generator=self.generator).to(self.device)
            ]
            n_serve = max(1, (buffer.shape[0] - keep) // self.train_batch_size_tokens)
            for i in range(n_serve):
                yield self._split(
                    buffer[
                        i * self.train_batch_size_tokens : (i + 1) * self.train_batch_size_tokens
                    ],
                    widths,
                )
            buffer = buffer[n_serve * self.train_batch_size_tokens :]
        buffer = buffer[torch.randperm(buffer.shape[0], generator=self.generator).to(self.device)]
        for i in range(buffer.shape[0] // self.train_batch_size_tokens):
            yield self._split(
                buffer[i * self.train_batch_size_tokens : (i + 1) * self.train_batch_size_tokens],
                widths,
            )

    def _split(self, rows: Tensor, widths: list[int]) -> dict[str, Tensor]:
        return dict(zip(self.hook_names, rows.split(widths, dim=1), strict=True))
