"""Sequences whose items have a successor: numbers, letters, weekdays and months.

The successor family (``families``) asks whether a feature raises the logit of the token that
follows its source token in such a sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from sae_lens_attn.validation import token_texts


def successor_text(text: str) -> str | None:
    """The next item of the sequence ``text`` belongs to, keeping its spacing and case, else None.

    Numbers (``" 7"`` → ``" 8"``, ``"09"`` → ``"10"``), single letters (``"b"`` → ``"c"``, not
    past ``z``), weekdays and months, cyclic (``"Sunday"`` → ``"Monday"``, ``" Dec"`` →
    ``" Jan"``; three-letter abbreviations only capitalised or upper-case, since ``"mar"`` or
    ``"sun"`` in lower case are mostly other words).
    """
    core = text.strip()
    if not core:
        return None
    start = text.index(core)
    prefix, suffix = text[:start], text[start + len(core) :]
    if core.isascii() and core.isdigit():
        return prefix + str(int(core) + 1).zfill(len(core)) + suffix
    if len(core) == 1 and core.isascii() and core.isalpha():
        return None if core in "zZ" else prefix + chr(ord(core) + 1) + suffix
    lower = core.lower()
    for names in (_WEEKDAYS, _MONTHS):
        abbreviations = [name[:3] for name in names]
        if lower in names:
            following = names[(names.index(lower) + 1) % len(names)]
        elif lower in abbreviations and core[0].isupper():
            following = abbreviations[(abbreviations.index(lower) + 1) % len(names)]
        else:
            continue
        if core.isupper() and len(core) > 1:
            following = following.upper()
        elif core[0].isupper():
            following = following.capitalize()
        return prefix + following + suffix
    return None


_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december",
)  # fmt: skip


def successor_ids(tokenizer: Any, d_vocab: int) -> Int[Tensor, " d_vocab"]:
    """For every token id, the id of its successor (``successor_text``) where that is a single
    token, else −1 (all −1 without a tokenizer)."""
    table = torch.full((d_vocab,), -1, dtype=torch.long)
    if tokenizer is None:
        return table
    for token, text in enumerate(token_texts(tokenizer, range(d_vocab))):
        following = successor_text(text)
        if following is None:
            continue
        ids = tokenizer.encode(following, add_special_tokens=False)
        if len(ids) == 1 and 0 <= ids[0] < d_vocab and tokenizer.decode(ids) == following:
            table[token] = ids[0]
    return table
