"""SAEDashboard 0.7.2 where it serves: its feature-centric hook_z pages on TransformerLens models.

Its own DFA path (``use_dfa=True``) fails with SAELens 6 (``docs/upstream.md``), so it runs without
DFA and our panels are added to its pages. Its pages load d3 and Plotly from CDNs; we point them
at local copies (d3 v6.7.0 vendored under ``assets/``, ``plotly.min.js`` from the ``plotly``
package) so the pages open from disk without a network.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from sae_lens_attn.backends import AttnBackend
from sae_lens_attn.sae_adapter import sae_convention
from sae_lens_attn.site import AttnSite

CDN_SCRIPTS = {
    "https://d3js.org/d3.v6.min.js": "d3.v6.min.js",
    "https://cdn.plot.ly/plotly-latest.min.js": "plotly.min.js",
}
"""The scripts SAEDashboard's pages load from CDNs, and the local file each is replaced by."""

_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


INSTALL_HINT = "pip install 'sae-lens-attn[saedashboard]'"
"""How to get SAEDashboard, for messages."""


def installed() -> bool:
    """Whether SAEDashboard (the ``saedashboard`` extra) can be imported here."""
    return importlib.util.find_spec("sae_dashboard") is not None


def unsupported_reason(backend: AttnBackend, sae: Any) -> str | None:
    """Why SAEDashboard cannot build this SAE's pages, or ``None`` when it can."""
    from transformer_lens import HookedTransformer

    if not isinstance(backend.model, HookedTransformer):  # whether or not it is installed
        return "SAEDashboard runs on TransformerLens models only"
    if not installed():
        return f"SAEDashboard is not installed (the saedashboard extra: {INSTALL_HINT})"
    if getattr(backend.model, "tokenizer", None) is None:
        return "SAEDashboard needs the model's tokenizer (model.tokenizer is None)"
    site = AttnSite.from_sae(sae, backend)
    convention = sae_convention(sae, backend.native_convention)
    if convention == "folded" and bool(backend.value_bias(site).abs().max() > 0):
        return (
            "SAEDashboard reads hook_z as the model computes it (value bias included), "
            "but this SAE was trained on folded z"
        )
    return None


def write_assets(folder: Path) -> None:
    """Copy d3 and Plotly into ``folder`` (the files named in ``CDN_SCRIPTS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    vendored = resources.files("sae_lens_attn.viz.dashboard") / "assets"
    for name in ("d3.v6.min.js", "LICENSE.d3"):
        (folder / name).write_bytes((vendored / name).read_bytes())
    plotly = resources.files("plotly") / "package_data" / "plotly.min.js"
    (folder / "plotly.min.js").write_bytes(plotly.read_bytes())


@torch.no_grad()
def feature_fragments(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, " rows ctx"],
    features: Sequence[int],
    *,
    assets: str,
    ignore_tokens: Sequence[int] = (),
    batch_size: int = 8,
) -> dict[int, str]:
    """SAEDashboard's feature-centric view of each feature, as an HTML fragment.

    Args:
        model: a ``HookedTransformer`` with a tokenizer.
        sae: a hook_z SAE of it.
        tokens: token ids ``[rows, ctx]``.
        features: feature indices.
        assets: relative URL of the folder ``write_assets`` filled.
        ignore_tokens: token ids SAEDashboard leaves out.
        batch_size: contexts per forward pass.

    Returns:
        ``{feature: fragment}``; each fragment loads its scripts from ``assets`` only.
    """
    # The saedashboard extra: absent from the newest stack (its pins exclude TransformerLens 3).
    from sae_dashboard.data_writing_fns import (  # pyright: ignore[reportMissingImports]
        save_feature_centric_vis,
    )
    from sae_dashboard.sae_vis_data import SaeVisConfig  # pyright: ignore[reportMissingImports]
    from sae_dashboard.sae_vis_runner import SaeVisRunner  # pyright: ignore[reportMissingImports]

    cfg = SaeVisConfig(
        hook_point=sae.cfg.metadata.hook_name,
        features=list(features),
        minibatch_size_tokens=batch_size,
        ignore_tokens=set(ignore_tokens),
        device=str(tokens.device),
        verbose=False,
    )
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    with tempfile.TemporaryDirectory() as tmp:
        save_feature_centric_vis(data, Path(tmp) / "f.html", separate_files=True)
        fragments = {
            f: (Path(tmp) / f"f_feature_{f}.html").read_text(encoding="utf-8") for f in features
        }
    return {f: localize(fragment, assets) for f, fragment in fragments.items()}


def localize(fragment: str, assets: str) -> str:
    """Point SAEDashboard's CDN scripts at ``assets``; raise if any other external URL is left."""
    for url, name in CDN_SCRIPTS.items():
        fragment = fragment.replace(f'src="{url}"', f'src="{assets}/{name}"')
    match = _EXTERNAL.search(fragment)
    if match:
        start = max(match.start() - 60, 0)
        raise RuntimeError(
            "SAEDashboard's page loads a resource from the network, which a dashboard that "
            f"opens from disk cannot: ...{fragment[start : match.end() + 60]}..."
        )
    return fragment
