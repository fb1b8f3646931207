"""A context's top DFA source, and the one induction test on it.

Both the feature families (``families``) and the induction behaviour heuristic
(``induction_heuristics``) ask the same two questions of a context (a feature firing at query
position ``q``): which source position ``s*`` drives it most, and whether ``s*`` is the token
after an earlier occurrence of the current token. They answer them here, so that they agree.

Special tokens and padding (the positions ``families.usable_positions`` marks unusable: the
tokenizer's special tokens, such as BOS, and padding) are never a query and never a top source.
BOS is an attention sink: at position 0 it sees only itself, so its value is the same in every
context and what it contributes says nothing about which token a feature reads; the top source
is the best *other* source. A special token is also never the "earlier occurrence"
(``t[s* − 1]`` must equal ``t[q]``, which is not special).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

NO_SOURCE = -1
"""``TopSource.position`` of a context without one: no usable source contributes > 0, the
query is unusable (a special token, padding) or there is no query (−1)."""


class TopSource(NamedTuple):
    """Each context's top source."""

    position: Int[Tensor, " N *K"]
    """``s*``: the usable source ``s ≤ q`` with the largest positive DFA contribution, else
    ``NO_SOURCE``."""
    value: Float[Tensor, " N *K"]
    """Its contribution (≤ 0 or −inf where there is no top source)."""


def top_source(
    by_src: Float[Tensor, " N pos *K"],
    query: Int[Tensor, " N *K"],
    usable: Bool[Tensor, " N pos"] | None = None,
) -> TopSource:
    """The top source of each context (module docstring).

    Args:
        by_src: DFA by source position (dimension 1) at each query; NaN counts as nothing.
        query: the query position of each context, −1 for none.
        usable: True where a position may be a query or a source (default: all).

    Returns:
        ``TopSource`` of shape ``query.shape``; ties go to the earliest source.
    """
    n_rows, n_pos = by_src.shape[:2]
    device = by_src.device
    query = query.to(device)
    usable = (
        torch.ones(n_rows, n_pos, dtype=torch.bool, device=device)
        if usable is None
        else usable.to(device)
    )
    trailing = (1,) * (query.ndim - 1)
    s = torch.arange(n_pos, device=device).view(1, n_pos, *trailing)
    usable_query = usable.gather(1, query.clamp(min=0).flatten(1)).view_as(query) & (query >= 0)
    allowed = usable.view(n_rows, n_pos, *trailing) & (s <= query.unsqueeze(1))
    allowed &= usable_query.unsqueeze(1)
    contribution = by_src.float().nan_to_num(nan=float("-inf"))
    value, position = contribution.masked_fill(~allowed, float("-inf")).max(1)
    return TopSource(torch.where(value > 0, position, NO_SOURCE), value)


def follows_earlier_copy(
    tokens: Int[Tensor, " N pos"],
    query: Int[Tensor, " N *K"],
    top: Int[Tensor, " N *K"],
) -> Bool[Tensor, " N *K"]:
    """The induction test: ``1 ≤ s* < q`` and ``t[s* − 1] == t[q]`` (the top source is the token
    after an earlier occurrence of the current token; ``s* = q`` never passes, nor does a
    context without a top source).

    Args:
        tokens: token ids of each row.
        query: the query position of each context.
        top: its top source (``top_source(...).position``).
    """
    tokens = tokens.to(top.device)
    query = query.to(top.device)
    before = tokens.gather(1, (top - 1).clamp(min=0).flatten(1)).view_as(top)  # t[s* − 1]
    at = tokens.gather(1, query.clamp(min=0).flatten(1)).view_as(top)  # t[q]
    return (top >= 1) & (top < query) & (before == at)
