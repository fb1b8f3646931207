"""Analyzers by name: a registry other packages extend through the ``sae_lens_attn.analyzers``
entry-point group. The built-in analyzers register through that same group (see pyproject.toml).

A third-party package declares, in its own pyproject.toml:

    [project.entry-points."sae_lens_attn.analyzers"]
    my_analyzer = "my_package.module:MY_ANALYZER"

where ``MY_ANALYZER`` is an ``Analyzer``: a callable taking an ``AnalysisInput`` and returning
named tables (lists of records), with a ``description``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

from torch import Tensor

from sae_lens_attn.corpus import CAPTURE_EXTRAS, CaptureExtra, Corpus

ENTRY_POINT_GROUP = "sae_lens_attn.analyzers"
_OWN = "sae-lens-attn"
"""This package's distribution: its entry points (the built-ins) register first."""

Table = list[dict[str, Any]]
"""Records with the same keys, written by the CLI as CSV or JSON."""


@dataclass(frozen=True)
class AnalysisInput:
    """What every analyzer receives."""

    model: Any
    """A model a backend supports."""
    sae: Any
    """A SAELens SAE on the model's hook_z."""
    tokens: Tensor
    """Token ids ``[batch, pos]``."""
    tokenizer: Any = None
    """The model's tokenizer, to show tokens as text (optional)."""
    attention_mask: Tensor | None = None
    """0 at padding (optional)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Analyzer-specific options, e.g. ``features``."""

    @cached_property
    def corpus(self) -> Corpus:
        """``tokens`` seen through ``model``: one capture per layer and one encode per SAE,
        shared by every analyzer given these inputs (``from_corpus`` shares a command's)."""
        return Corpus(self.model, self.tokens, self.attention_mask, keep=CAPTURE_EXTRAS)

    @classmethod
    def from_corpus(
        cls,
        corpus: Corpus,
        sae: Any,
        *,
        tokenizer: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> AnalysisInput:
        """Inputs over a corpus a command already holds (its captures and encodes shared)."""
        inputs = cls(
            corpus.backend, sae, corpus.tokens, tokenizer, corpus.attention_mask, options or {}
        )
        inputs.__dict__["corpus"] = corpus  # what ``cached_property`` would have computed
        return inputs


class Analyzer(Protocol):
    """A named analysis over a model, an SAE and tokens.

    An analyzer may also say what it needs of each capture beside z, as ``needs`` (a subset of
    ``CAPTURE_EXTRAS``: ``"pattern"``, ``"values"``); a command asks for all of it in its one
    capture. Without ``needs``, everything is kept.
    """

    description: str

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]: ...


def capture_needs(analyzers: Iterable[object]) -> frozenset[CaptureExtra]:
    """What one capture must hold beside z for all of ``analyzers`` (their ``needs``; all of
    ``CAPTURE_EXTRAS`` for one that does not say)."""
    needed: set[CaptureExtra] = set()
    for analyzer in analyzers:
        needed |= set(getattr(analyzer, "needs", CAPTURE_EXTRAS))
    return frozenset(needed)


_registry: dict[str, Analyzer] = {}
_entry_points_loaded = False


def register(name: str, analyzer: Analyzer, *, replace: bool = False) -> None:
    """Register ``analyzer`` under ``name`` (registering the same object again is a no-op).

    The installed entry points (the built-ins among them) are loaded first, so a name they
    declare is taken even before anything was looked up.

    Raises:
        ValueError: ``name`` is empty, or taken by another analyzer and ``replace`` is False.
        TypeError: ``name`` is not a string, or ``analyzer`` is not callable or has no
            ``description``.
    """
    _load_entry_points()
    _add(name, analyzer, replace=replace)


def get(name: str) -> Analyzer:
    """The analyzer registered as ``name``.

    Raises:
        ValueError: no analyzer has that name; the message lists those that exist.
    """
    _load_entry_points()
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"unknown analyzer {name!r}; registered: {names()}") from None


def names() -> list[str]:
    """Names of all registered analyzers, sorted."""
    _load_entry_points()
    return sorted(_registry)


def _add(name: str, analyzer: Analyzer, *, replace: bool) -> None:
    if not isinstance(name, str):
        raise TypeError(f"an analyzer name must be a str, got {name!r} ({type(name).__name__})")
    if not name.strip():
        raise ValueError(f"an analyzer name must be a non-empty string, got {name!r}")
    if not callable(analyzer) or not isinstance(getattr(analyzer, "description", None), str):
        raise TypeError(
            f"an analyzer must be callable with a str description, got {type(analyzer).__name__}"
        )
    existing = _registry.get(name)
    if existing is not None and existing is not analyzer and not replace:
        raise ValueError(
            f"analyzer {name!r} is already registered ({_origin(existing)}); pass replace=True "
            "to replace it"
        )
    _registry[name] = analyzer


def _load_entry_points() -> None:
    """Register every installed entry point once; one that fails to load is left out with a
    warning naming its distribution, and the others (the built-ins among them) still register."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: not _is_own(p))
    for point in points:
        where = (
            f"entry point {point.name} = {point.value!r} of distribution {_distribution(point)!r}"
        )
        try:
            analyzer = point.load()
        except Exception as err:  # a broken plugin must not take the built-ins down with it
            warnings.warn(
                f"analyzer {where} failed to import and is not registered: "
                f"{type(err).__name__}: {err}",
                stacklevel=3,
            )
            continue
        existing = _registry.get(point.name)
        if existing is not None and existing is not analyzer:
            warnings.warn(
                f"analyzer {where} is ignored: the name is already registered "
                f"({_origin(existing)})",
                stacklevel=3,
            )
            continue
        try:
            _add(point.name, analyzer, replace=False)
        except (TypeError, ValueError) as err:
            warnings.warn(f"analyzer {where} is not registered: {err}", stacklevel=3)


def _is_own(point: EntryPoint) -> bool:
    return _distribution(point).replace("_", "-").lower() == _OWN


def _distribution(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return dist.name if dist is not None else "unknown"


def _origin(analyzer: Analyzer) -> str:
    return f"{type(analyzer).__module__}.{type(analyzer).__qualname__}"
