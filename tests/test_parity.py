"""Parity: the nnsight backend on a Hugging Face model and the TransformerLens backend on its twin
(same weights) see the same z and patterns, and splice the same SAE to the same logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_attn import AttnSite, backend_for

from .hf_twins import ARCHITECTURES_WITH_TWINS, VOCAB_SIZE, build_hf, build_twin

ATOL = 1e-5  # float32; rtol=0 so small values get no slack

# (twin folds b_V into b_O, convention asked for). A folded twin has lost b_V, so it cannot
# give back the "included" convention: that combination does not exist.
CASES = [(False, "included"), (False, "folded"), (True, "folded")]


@pytest.fixture(scope="module", params=ARCHITECTURES_WITH_TWINS)
def hf_model(request) -> Any:
    return build_hf(request.param)


def random_sae(site: AttnSite, seed: int) -> StandardSAE:
    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=site.d_in, d_sae=4 * site.d_in, reshape_activations="hook_z")
    cfg.metadata.hook_name = site.hook_name
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, 0.1)
    return sae


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("fold", "convention"), CASES)
def test_z_and_patterns_agree(hf_model, fold, convention) -> None:
    twin = build_twin(hf_model, fold_value_biases=fold)
    hf_backend, tl_backend = backend_for(hf_model), backend_for(twin)
    sites = [AttnSite.from_model(hf_model, layer) for layer in range(2)]
    assert sites == [AttnSite.from_model(twin, layer) for layer in range(2)]
    ours = hf_backend.capture(tokens(), sites, pattern=True, values=True, convention=convention)
    theirs = tl_backend.capture(tokens(), sites, pattern=True, values=True, convention=convention)
    for site in sites:
        torch.testing.assert_close(ours[site.layer].z, theirs[site.layer].z, atol=ATOL, rtol=0.0)
        torch.testing.assert_close(
            ours[site.layer].pattern, theirs[site.layer].pattern, atol=ATOL, rtol=0.0
        )
        torch.testing.assert_close(
            ours[site.layer].values, theirs[site.layer].values, atol=ATOL, rtol=0.0
        )


@pytest.mark.parametrize(("fold", "convention"), CASES)
def test_spliced_sae_logits_agree(hf_model, fold, convention) -> None:
    twin = build_twin(hf_model, fold_value_biases=fold)
    sites = [AttnSite.from_model(hf_model, layer) for layer in range(2)]
    saes = {site: random_sae(site, seed=site.layer) for site in sites}
    with torch.no_grad():
        with backend_for(hf_model).splicing(saes, convention=convention):
            ours = backend_for(hf_model).forward(tokens())
        with backend_for(twin).splicing(saes, convention=convention):
            theirs = backend_for(twin).forward(tokens())
        clean = twin(tokens())
    assert ours is not None and theirs is not None
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0.0)
    assert (ours - clean).abs().max() > 1e-3  # the SAEs really were spliced in


def test_conventions_differ_where_the_model_has_value_biases() -> None:
    model = build_hf("gpt2")
    site = AttnSite.from_model(model, 0)
    saes = {site: random_sae(site, seed=0)}
    backend = backend_for(model)
    with torch.no_grad():
        with backend.splicing(saes, convention="folded"):
            folded = backend.forward(tokens())
        with backend.splicing(saes, convention="included"):
            included = backend.forward(tokens())
    assert folded is not None and included is not None
    assert (folded - included).abs().max() > 1e-3
