"""One command's token ids seen through one model: every capture and every SAE encode computed
once, on first use, and shared by every analysis, plot and panel of that command.

A ``Corpus`` holds the token ids (and attention mask) and, lazily, what the model and the SAEs
make of them: one capture per (layer, value-bias convention) with whatever was asked of it
(patterns, values), and one encode per SAE. Analysis functions that take token ids also take a
``Corpus`` in their place; given plain ids they build a one-off corpus, so each call still reads
them once.

Ask for everything a command will need before the first capture (``keep``): a later request for
patterns or values a capture lacks reads the corpus again (``reads`` counts it). Results derived
from the captures (the top features, DFA at the peaks) are kept under a key (``memo``).

Examples:
    >>> corpus = Corpus(model, tokens, keep={"pattern", "values"})
    >>> acts = corpus.activations(sae)          # [batch, pos, d_sae], one capture, one encode
    >>> peak = sla.analysis.dfa_at_peaks(model, sae, corpus, features=[3, 7])  # no new capture
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from functools import cached_property
from typing import Any, Literal, TypeVar, get_args

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.backends import AttnBackend, AttnCapture, backend_for
from sae_lens_attn.sae_adapter import Encoded, encode_blocks, sae_convention
from sae_lens_attn.site import AttnSite, ValueBiasConvention
from sae_lens_attn.validation import check_count, check_tokens, special_token_ids, tokenizer_of

CaptureExtra = Literal["pattern", "values", "every_layer"]
"""What a capture can hold beside z at the asked layer: patterns, values, and the same at every
layer of the model (for analyses that read all layers, so that one pass serves them too)."""
CAPTURE_EXTRAS: tuple[CaptureExtra, ...] = get_args(CaptureExtra)
_T = TypeVar("_T")


class Corpus:
    """Token ids and, computed once each on first use, their captures and SAE encodes.

    Args:
        model: any model a backend supports (or a backend).
        tokens: token ids ``[batch, pos]``.
        attention_mask: 0 at padding (default: no padding). Patterns of a capture attend to no
            padded source; padded positions are never peaks or top features.
        keep: what every capture holds beside z (``"pattern"``, ``"values"``, ``"every_layer"``):
            the union of what the command's analyses need, so that the corpus is read once.
        batch_size: rows per forward pass.
        ignore_tokens: token ids that never count as a feature's activation (``counted``;
            default: the special tokens of the model's tokenizer, such as BOS, an attention
            sink whose activations say little about a feature).

    Raises:
        ValueError: bad tokens or attention mask, an unknown ``keep`` entry.
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, " batch pos"],
        attention_mask: Int[Tensor, " batch pos"] | None = None,
        *,
        keep: Collection[CaptureExtra] = (),
        batch_size: int = 16,
        ignore_tokens: Sequence[int] | None = None,
    ) -> None:
        self.backend: AttnBackend = backend_for(model)
        self.tokens: Int[Tensor, " batch pos"] = check_tokens(tokens, self.backend)
        self.attention_mask = attention_mask
        self.real: Bool[Tensor, " batch pos"] = real_positions(attention_mask, self.tokens)
        unknown = sorted(set(keep) - set(CAPTURE_EXTRAS))
        if unknown:
            raise ValueError(f"unknown capture extras {unknown}; valid: {list(CAPTURE_EXTRAS)}")
        self.keep: frozenset[CaptureExtra] = frozenset(keep)
        self.batch_size = check_count("batch_size", batch_size)
        self.ignore_tokens = ignore_tokens
        self.rows_read = 0
        """Rows of ``tokens`` run through the model so far (``reads`` in units of the corpus)."""
        self._captures: dict[tuple[int, ValueBiasConvention], AttnCapture] = {}
        self._encodes: dict[int, tuple[SAE[Any], Encoded]] = {}
        self._memo: dict[Hashable, Any] = {}

    @property
    def reads(self) -> float:
        """How many times the model has read the corpus (rows run / rows held)."""
        return self.rows_read / self.tokens.shape[0]

    def capture(
        self,
        site: AttnSite,
        convention: ValueBiasConvention,
        *,
        pattern: bool = False,
        values: bool = False,
    ) -> AttnCapture:
        """z (and patterns, values) at ``site`` on every row, in ``convention``."""
        return self.capture_many([site], convention, pattern=pattern, values=values)[site.layer]

    def capture_many(
        self,
        sites: Iterable[AttnSite],
        convention: ValueBiasConvention,
        *,
        pattern: bool = False,
        values: bool = False,
    ) -> dict[int, AttnCapture]:
        """``capture`` at several sites; those not yet held are captured in one pass."""
        sites = list(sites)
        asked = {"pattern": pattern, "values": values}
        wanted = set(self.keep) | {extra for extra, given in asked.items() if given}
        held = {site.layer: self._captures.get((site.layer, convention)) for site in sites}
        missing = [site for site in sites if not _holds(held[site.layer], wanted)]
        if missing and "every_layer" in wanted:
            every = [self.backend.site(layer) for layer in range(self.backend.n_layers)]
            missing = [
                s for s in every if not _holds(self._captures.get((s.layer, convention)), wanted)
            ]
        if missing:
            for site in missing:  # what an earlier capture held is kept too
                capture = self._captures.get((site.layer, convention))
                if capture is not None:
                    wanted |= {extra for extra in ("pattern", "values") if _holds(capture, {extra})}
            self._read(missing, convention, wanted)
        return {site.layer: self._captures[site.layer, convention] for site in sites}

    def z(self, sae: SAE[Any]) -> Float[Tensor, " batch pos n_heads d_head"]:
        """z at the SAE's site, in the convention it was trained on."""
        return self.capture(*self.site_of(sae)).z

    def site_of(self, sae: SAE[Any]) -> tuple[AttnSite, ValueBiasConvention]:
        """The site an SAE reads on this model and the value-bias convention it expects."""
        return AttnSite.from_sae(sae, self.backend), sae_convention(
            sae, self.backend.native_convention
        )

    def activations(self, sae: SAE[Any]) -> Float[Tensor, " batch pos d_sae"]:
        """The SAE's activations at every position (padding included: see ``real``)."""
        return self.encode(sae).acts

    def pre_activations(self, sae: SAE[Any]) -> Float[Tensor, " batch pos d_sae"]:
        """The SAE's pre-activations (SAELens's ``hook_sae_acts_pre``) at every position."""
        pre = self.encode(sae, pre=True).pre_acts
        assert pre is not None
        return pre

    def encode(self, sae: SAE[Any], *, pre: bool = False) -> Encoded:
        """The SAE's encoding of the corpus, computed once (again only to add ``pre``)."""
        held = self._encodes.get(id(sae))
        if held is not None and (held[1].pre_acts is not None or not pre):
            return held[1]
        encoded = encode_blocks(sae, self.z(sae), pre=pre)
        self._encodes[id(sae)] = (sae, encoded)  # the SAE is held, so its id is not reused
        return encoded

    @cached_property
    def counted(self) -> Bool[Tensor, " batch pos"]:
        """True at positions whose activations count: real, and not one of ``ignore_tokens``."""
        ignored = self.ignore_tokens
        if ignored is None:
            ignored = special_token_ids(tokenizer_of(self.backend))
        ids = torch.tensor(list(ignored), dtype=torch.long, device=self.tokens.device)
        return self.real & ~torch.isin(self.tokens, ids)

    def top_features(self, sae: SAE[Any], n: int) -> list[int]:
        """The ``n`` features with the largest activation at a ``counted`` position, strongest
        first: what "top features" means in ``analyze``, ``dashboard`` and the explorer."""

        def strongest() -> list[int]:
            acts = self.activations(sae)
            counted = self.counted[..., None].to(acts.device)
            peak = acts.masked_fill(~counted, 0).flatten(0, 1).amax(0)
            return peak.topk(min(n, peak.numel())).indices.tolist()

        n = check_count("n", n)
        return self.memo(("top_features", id(sae), n), strongest)

    def memo(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        """``compute()``, kept under ``key`` for the corpus's lifetime."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _read(
        self, sites: list[AttnSite], convention: ValueBiasConvention, wanted: set[str]
    ) -> None:
        parts: dict[int, list[AttnCapture]] = {site.layer: [] for site in sites}
        for rows in torch.arange(self.tokens.shape[0]).split(self.batch_size):
            mask = None if self.attention_mask is None else self.attention_mask[rows]
            captures = self.backend.capture(
                self.tokens[rows],
                sites,
                pattern="pattern" in wanted,
                values="values" in wanted,
                convention=convention,
                attention_mask=mask,
            )
            self.rows_read += rows.numel()
            for site in sites:
                capture = captures[site.layer]
                if mask is not None and capture.pattern is not None:  # no padded source
                    keep = mask[:, None, None, :].to(capture.pattern.device).bool()
                    capture = capture._replace(pattern=_zero_unless(keep, capture.pattern))
                parts[site.layer].append(capture)
        for layer, captured in parts.items():
            self._captures[layer, convention] = AttnCapture(
                z=torch.cat([capture.z for capture in captured]),
                pattern=_cat_held([capture.pattern for capture in captured]),
                values=_cat_held([capture.values for capture in captured]),
            )


def corpus_of(
    model: Any,
    tokens: Int[Tensor, " batch pos"] | Corpus,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    *,
    batch_size: int = 16,
) -> Corpus:
    """``tokens`` if it is a ``Corpus`` of this model, else a new one of these ids (read
    ``batch_size`` rows at a time).

    Raises:
        ValueError: a ``Corpus`` of another model, or an attention mask given beside a
            ``Corpus`` (it carries its own).
    """
    if not isinstance(tokens, Corpus):
        return Corpus(model, tokens, attention_mask, batch_size=batch_size)
    if backend_for(model) is not tokens.backend:
        raise ValueError(
            "the Corpus was made for another model; make one with Corpus(model, tokens) for "
            "this model"
        )
    if attention_mask is not None and attention_mask is not tokens.attention_mask:
        raise ValueError(
            "an attention mask was given beside a Corpus, which carries its own: pass it as "
            "Corpus(model, tokens, attention_mask)"
        )
    return tokens


def sae_activations(
    model: Any,
    sae: SAE[Any],
    tokens: Int[Tensor, " batch pos"] | Corpus,
    attention_mask: Int[Tensor, " batch pos"] | None = None,
    *,
    pre: bool = False,
    batch_size: int = 16,
) -> Encoded:
    """An SAE's activations (and with ``pre``, its pre-activations) at every position of
    ``tokens``, through any backend, ``batch_size`` rows per forward pass.

    Examples:
        >>> acts, pre = sae_activations(model, sae, tokens, pre=True)  # [batch, pos, d_sae] each
    """
    return corpus_of(model, tokens, attention_mask, batch_size=batch_size).encode(sae, pre=pre)


def real_positions(
    attention_mask: Int[Tensor, " batch pos"] | None, tokens: Int[Tensor, " batch pos"]
) -> Bool[Tensor, " batch pos"]:
    """True at real (non-padding) positions: where ``attention_mask`` is non-zero (all without)."""
    if attention_mask is None:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else None
        raise ValueError(
            f"attention_mask must have the tokens' shape {tuple(tokens.shape)} (1 at real "
            f"tokens, 0 at padding), got {shape or type(attention_mask).__name__}"
        )
    return attention_mask.bool()


def _cat_held(pieces: list[Tensor | None]) -> Tensor | None:
    held = [piece for piece in pieces if piece is not None]
    return torch.cat(held) if held else None


def _holds(capture: AttnCapture | None, wanted: set[str]) -> bool:
    held = ("pattern", "values")
    return capture is not None and all(getattr(capture, x) is not None for x in held if x in wanted)


def _zero_unless(keep: Tensor, values: Tensor) -> Tensor:
    """``values`` where ``keep``, else 0 (also where ``values`` is inf or NaN)."""
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
