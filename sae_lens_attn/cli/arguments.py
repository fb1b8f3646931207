"""Argument types shared by the subcommands, and the error for a wrong command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sae_lens_attn.validation import check_count


class UsageError(ValueError):
    """The command line itself is wrong (flags missing or inconsistent): exit status 2."""


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: an integer ≥ ``minimum`` (counts and sizes: ``--max-prompts``, ...)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        try:
            return check_count("the value", value, minimum)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "count"
    return parse


def integers(text: str) -> list[int]:
    """An argparse ``type``: comma-separated integers ≥ 0 (feature indices: ``3,17,40``)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 3,17,40, got {text!r}"
        ) from None
    negative = [v for v in values if v < 0]
    if not values or negative:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 3,17,40, got {text!r}"
        )
    return values


def key_value(text: str) -> tuple[str, str]:
    """An argparse ``type``: ``KEY=VALUE`` with a non-empty key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. model=https://...), got {text!r}"
        )
    return key.strip(), value
