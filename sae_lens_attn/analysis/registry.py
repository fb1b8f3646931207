"""Analyzers by name: a registry other packages extend through the ``sae_lens_attn.analyzers``
entry-point group. The built-in analyzers register through that same group (see pyproject.toml).

A third-party package declares, in its own pyproject.toml:

    [project.entry-points."sae_lens_attn.analyzers"]
    my_analyzer = "my_package.module:MY_ANALYZER"

where ``MY_ANALYZER`` is an ``Analyzer``: a callable taking an ``AnalysisInput`` and returning
named tables (lists of records), with a ``description``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from torch import Tensor

ENTRY_POINT_GROUP = "sae_lens_attn.analyzers"

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


class Analyzer(Protocol):
    """A named analysis over a model, an SAE and tokens."""

    description: str

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]: ...


_registry: dict[str, Analyzer] = {}
_entry_points_loaded = False


def register(name: str, analyzer: Analyzer, *, replace: bool = False) -> None:
    """Register ``analyzer`` under ``name`` (registering the same object again is a no-op).

    Raises:
        ValueError: ``name`` is taken by another analyzer and ``replace`` is False.
        TypeError: ``analyzer`` is not callable or has no ``description``.
    """
    if not callable(analyzer) or not isinstance(getattr(analyzer, "description", None), str):
        raise TypeError(
            f"an analyzer must be callable with a str description, got {type(analyzer).__name__}"
        )
    existing = _registry.get(name)
    if existing is not None and existing is not analyzer and not replace:
        raise ValueError(
            f"analyzer {name!r} is already registered; pass replace=True to replace it"
        )
    _registry[name] = analyzer


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


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in _registry:
            register(point.name, point.load())
