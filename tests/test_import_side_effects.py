"""Importing sae_lens_attn changes nothing global beyond the SAELens registries it documents."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib
import pytest
import torch
from torch import nn

import sae_lens_attn as sla
from sae_lens_attn.viz import plots

FRESH_PROCESS = """
import asyncio, json, sys, types

def bindings():
    # every name of every module loaded so far, bound to which object
    return {
        (module_name, name): id(value)
        for module_name, module in list(sys.modules.items())
        if isinstance(module, types.ModuleType)
        for name, value in list(vars(module).items())
    }

import anyio, anyio.abc, httpx, matplotlib, sae_lens, transformer_lens, transformers
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

object_before = sorted(dir(object))
backend_before = matplotlib.get_backend()
bound_before = bindings()
loaded_before = set(sys.modules)

import sae_lens_attn as sla

rebound = sorted(
    f"{module}.{name}"
    for (module, name), ident in bindings().items()
    if (module, name) in bound_before and bound_before[module, name] != ident
    and not module.startswith("sae_lens_attn")
)
nnsight_after_import = [m for m in sys.modules if m == "nnsight" or m.startswith("nnsight.")]
lazy_names = [sla.hooked.__name__, sla.HookedHFModel.__name__]
nnsight_after_lazy_names = "nnsight" in sys.modules

async def use_httpx_and_anyio():
    assert anyio.abc.SocketAttribute.local_address is not None
    async with httpx.AsyncClient(base_url="http://localhost") as client:
        assert not client.is_closed
    return client.is_closed

closed = asyncio.run(use_httpx_and_anyio())
print(json.dumps({
    "object_gained": sorted(set(dir(object)) - set(object_before)),
    "nnsight_after_import": nnsight_after_import,
    "nnsight_after_lazy_names": nnsight_after_lazy_names,
    "lazy_names": lazy_names,
    "rebound": rebound,
    "client_closed": closed,
    "backend_unchanged": matplotlib.get_backend() == backend_before,
    "pyplot_imported": "matplotlib.pyplot" in sys.modules and "matplotlib.pyplot" not in loaded_before,
    "nnsight_backend": sla.NNsightBackend.__name__,
    "nnsight_after_backend_name": "nnsight" in sys.modules,
}))
"""


@pytest.mark.slow
def test_import_leaves_object_anyio_httpx_and_saelens_names_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["object_gained"] == []
    assert report["nnsight_after_import"] == []
    assert report["lazy_names"] == ["hooked", "HookedHFModel"]
    assert report["nnsight_after_lazy_names"] is False  # sla.hooked is importable without it
    assert report["rebound"] == []  # no name of SAELens (or any module loaded before) rebound
    assert report["client_closed"] is True  # httpx.AsyncClient opened and closed, no network
    assert report["backend_unchanged"] is True and report["pyplot_imported"] is False
    assert report["nnsight_backend"] == "NNsightBackend"  # the lazy name resolves ...
    assert report["nnsight_after_backend_name"] is True  # ... and imports nnsight only then


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path) -> None:
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    figures = plt.get_fignums()
    shares = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]])
    written = [
        plots.head_attribution_heatmap(shares, [1, 2], tmp_path / "heat.png"),
        plots.head_attribution_bars(shares[0], tmp_path / "bars.png"),
        plots.head_attribution_per_head(shares, tmp_path / "per_head.png"),
        plots.dfa_tokens_png(["a", "b"], torch.tensor([0.5, -1.0]), 1, tmp_path / "dfa.png"),
    ]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures  # no figure left open in pyplot


@pytest.mark.parametrize("model", [nn.Linear(3, 3), None, "gpt2"], ids=["linear", "none", "str"])
def test_hooked_and_backend_for_refuse_other_types_listing_the_supported(model) -> None:
    with pytest.raises(
        TypeError, match=r"sla.hooked takes .*got .*; supported: \[.*PreTrainedModel"
    ):
        sla.hooked(model)
    with pytest.raises(TypeError, match=r"HookedHFModel wraps .*got .*; supported: \["):
        sla.HookedHFModel(model)
    with pytest.raises(TypeError, match=r"no sae_lens_attn backend supports .*supported: \["):
        sla.backend_for(model)
