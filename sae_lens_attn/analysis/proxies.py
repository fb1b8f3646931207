"""A feature against a proxy: Kissane et al.'s Figure 2 (after Bricken et al., 2023).

A *proxy* is a boolean per token saying whether a hypothesis about the feature holds there (for
an induction feature: "this token is in an induction context"). Two views of the feature's
non-zero activations, binned from 0 to the largest activation:

- **specificity**: the activation histogram stacked by proxy value (how many of the tokens in
  each bin the proxy explains);
- **expected value**: each bin's count times the bin's activation (its centre), split by proxy,
  which weights a bin by how much of the feature's total activation it carries, so that many
  weak activations the proxy misses count for what they are worth.

``induction_proxy`` is built in and needs only the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sae_lens_attn.validation import check_count

Proxy = Literal["induction"]
"""The built-in proxies (``proxy_mask``)."""
PROXIES: tuple[str, ...] = get_args(Proxy)


@dataclass(frozen=True)
class ProxyHistogram:
    """A feature's non-zero activations binned and split by a proxy."""

    edges: Float[Tensor, " bins_plus_1"]
    """Bin edges, from 0 to the largest counted activation (the last bin includes its right
    edge, as ``numpy.histogram``'s does)."""
    counts_true: Int[Tensor, " bins"]
    """Active tokens per bin where the proxy holds."""
    counts_false: Int[Tensor, " bins"]
    """Active tokens per bin where it does not."""
    inactive_true: int
    """Counted tokens where the feature is not active (activation ≤ 0) and the proxy holds."""
    inactive_false: int
    """Counted tokens where neither holds."""
    proxy: str
    """The proxy's name."""

    @property
    def centers(self) -> Float[Tensor, " bins"]:
        """The activation of each bin: its centre."""
        return (self.edges[1:] + self.edges[:-1]) / 2

    @property
    def expected_true(self) -> Float[Tensor, " bins"]:
        """Expected value where the proxy holds: ``counts_true × centers``."""
        return self.counts_true * self.centers

    @property
    def expected_false(self) -> Float[Tensor, " bins"]:
        """Expected value where it does not: ``counts_false × centers``."""
        return self.counts_false * self.centers

    @property
    def specificity(self) -> float:
        """Share of active tokens where the proxy holds (nan if the feature never fires)."""
        active = int(self.counts_true.sum() + self.counts_false.sum())
        return int(self.counts_true.sum()) / active if active else float("nan")

    @property
    def expected_share(self) -> float:
        """Share of the expected value where the proxy holds (nan if it never fires)."""
        total = float(self.expected_true.sum() + self.expected_false.sum())
        return float(self.expected_true.sum()) / total if total else float("nan")

    @property
    def sensitivity(self) -> float:
        """Share of tokens where the proxy holds at which the feature is active (nan if the
        proxy never holds)."""
        active = int(self.counts_true.sum())
        holds = active + self.inactive_true
        return active / holds if holds else float("nan")

    @property
    def base_rate(self) -> float:
        """Share of all counted tokens where the proxy holds: the specificity a feature blind to
        the proxy would have (nan if no token counted)."""
        holds = int(self.counts_true.sum()) + self.inactive_true
        total = holds + int(self.counts_false.sum()) + self.inactive_false
        return holds / total if total else float("nan")

    def rows(self) -> list[dict[str, float | int]]:
        """One record per bin: ``bin``, ``low``, ``high``, ``center``, ``proxy_true``,
        ``proxy_false``, ``expected_true``, ``expected_false``."""
        edges, centers = self.edges.tolist(), self.centers.tolist()
        columns = zip(
            self.counts_true.tolist(),
            self.counts_false.tolist(),
            self.expected_true.tolist(),
            self.expected_false.tolist(),
            strict=True,
        )
        return [
            {
                "bin": i,
                "low": edges[i],
                "high": edges[i + 1],
                "center": centers[i],
                "proxy_true": n_true,
                "proxy_false": n_false,
                "expected_true": e_true,
                "expected_false": e_false,
            }
            for i, (n_true, n_false, e_true, e_false) in enumerate(columns)
        ]


def induction_proxy(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Where a token is in an induction context the earlier text predicts.

    True at position ``i`` of a row when some earlier position ``j < i − 1`` holds the same
    token (``tokens[j] == tokens[i]``, the "A") and the token after that occurrence equals the
    token after ``i`` (``tokens[j + 1] == tokens[i + 1]``, the "B"): the current token repeats an
    earlier ``A B`` and the next token is the ``B`` that induction would predict. ``j + 1 < i``,
    so ``B`` lies strictly before the current token (the source an induction head reads). The
    last position of a row has no next token and is always False. Computed from tokens only;
    padding is the caller's to exclude (``proxy_histogram``'s ``counted``).

    Args:
        tokens: token ids ``[batch, pos]`` (or ``[pos]``).

    Returns:
        A boolean tensor of the same shape.
    """
    if tokens.ndim not in (1, 2) or tokens.is_floating_point():
        raise ValueError(
            f"tokens must be integer ids [batch, pos] or [pos], got {tokens.dtype} of shape "
            f"{tuple(tokens.shape)}"
        )
    rows = tokens.reshape(-1, tokens.shape[-1])
    out = torch.zeros(rows.shape, dtype=torch.bool, device=tokens.device)
    if rows.shape[1] < 3:
        return out.reshape(tokens.shape)
    current, following = rows[:, :-1], rows[:, 1:]  # A at i, B at i + 1, for i < pos - 1
    same_a = current[:, :, None] == current[:, None, :]  # (B, i, j)
    same_b = following[:, :, None] == following[:, None, :]
    n = current.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-2)  # j < i - 1
    out[:, :-1] = (same_a & same_b & earlier).any(-1)
    return out.reshape(tokens.shape)


def proxy_mask(proxy: str, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The built-in proxy named ``proxy`` on ``tokens``.

    Raises:
        ValueError: an unknown proxy name (the message lists ``PROXIES``).
    """
    if proxy == "induction":
        return induction_proxy(tokens)
    raise ValueError(f"unknown proxy {proxy!r}; built-in proxies: {list(PROXIES)}")


def proxy_histogram(
    activations: Float[Tensor, "*tokens"],
    proxy: Bool[Tensor, "*tokens"],
    *,
    counted: Bool[Tensor, "*tokens"] | None = None,
    bins: int = 20,
    name: str = "proxy",
) -> ProxyHistogram:
    """Bin a feature's non-zero activations and split each bin by a proxy (Figure 2's data).

    Args:
        activations: the feature's activation at each token, any shape.
        proxy: True where the proxy holds, same shape.
        counted: True where a token counts (default: all; pass False at padding or BOS).
        bins: number of equal bins from 0 to the largest counted activation.
        name: the proxy's name, kept in the result.

    Returns:
        A ``ProxyHistogram``: counts per bin by proxy value, and the expected values.

    Raises:
        ValueError: shapes differ, ``proxy`` or ``counted`` is not boolean, or ``bins`` < 1.

    Examples:
        >>> proxy = sla.analysis.induction_proxy(tokens)
        >>> hist = sla.analysis.proxy_histogram(acts[..., feature], proxy, name="induction")
        >>> hist.specificity, hist.expected_share
    """
    bins = check_count("bins", bins)
    masks = {"proxy": proxy} | ({} if counted is None else {"counted": counted})
    for what, mask in masks.items():
        if mask.shape != activations.shape:
            raise ValueError(
                f"{what} must have the shape of activations {tuple(activations.shape)}, got "
                f"{tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"{what} must be a boolean tensor, got {mask.dtype}")
    keep = torch.ones_like(proxy) if counted is None else counted
    values, holds = activations.detach().float().cpu()[keep.cpu()], proxy.cpu()[keep.cpu()]
    active = values > 0
    top = float(values[active].max()) if active.any() else 1.0
    edges = torch.linspace(0.0, top, bins + 1)
    index = (values[active] / top * bins).floor().long().clamp(max=bins - 1)  # right edge in
    on = holds[active]
    return ProxyHistogram(
        edges=edges,
        counts_true=torch.bincount(index[on], minlength=bins),
        counts_false=torch.bincount(index[~on], minlength=bins),
        inactive_true=int((holds & ~active).sum()),
        inactive_false=int((~holds & ~active).sum()),
        proxy=name,
    )
