"""Parity: the nnsight backend on a Hugging Face model and the TransformerLens backend on its twin
(same weights) see the same z and patterns, and splice the same SAE to the same logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_lens_attn import AttnSite, backend_for

from .factories import random_sae
from .hf_twins import ARCHITECTURES_WITH_TWINS, VOCAB_SIZE, build_hf, build_twin

ATOL = 1e-5  # float32; rtol=0 so small values get no slack

# (twin's weight processing, convention asked for). "full" is from_pretrained's default
# processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases), whose z is the
# folded convention by definition; "fold_value_biases" folds b_V alone and keeps β·W_V in z. A
# twin that has lost b_V cannot give back the "included" convention: those combinations do not
# exist.
CASES = [
    ("none", "included"),
    ("none", "folded"),
    ("fold_value_biases", "folded"),
    ("full", "folded"),
]


def twin_of(hf_model: Any, processing: str) -> Any:
    return build_twin(
        hf_model,
        fold_value_biases=processing == "fold_value_biases",
        full_processing=processing == "full",
    )


@pytest.fixture(scope="module", params=ARCHITECTURES_WITH_TWINS)
def hf_model(request) -> Any:
    return build_hf(request.param)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("processing", "convention"), CASES)
def test_z_and_patterns_agree(hf_model, processing, convention) -> None:
    twin = twin_of(hf_model, processing)
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


@pytest.mark.parametrize(("processing", "convention"), CASES)
def test_spliced_sae_logits_agree(hf_model, processing, convention) -> None:
    twin = twin_of(hf_model, processing)
    sites = [AttnSite.from_model(hf_model, layer) for layer in range(2)]
    saes = {site: random_sae(site, seed=site.layer, d_sae=4 * site.d_in, std=0.1) for site in sites}
    with torch.no_grad():
        with backend_for(hf_model).splicing(saes, convention=convention):
            ours = backend_for(hf_model).forward(tokens())
        with backend_for(twin).splicing(saes, convention=convention):
            theirs = backend_for(twin).forward(tokens())
        clean = twin(tokens())
    assert ours is not None and theirs is not None
    # center_unembed shifts each position's logits by a constant: compare log-probabilities.
    ours, theirs, clean = (logits.log_softmax(-1) for logits in (ours, theirs, clean))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0.0)
    assert (ours - clean).abs().max() > 1e-3  # the SAEs really were spliced in


@pytest.mark.parametrize("arch", ARCHITECTURES_WITH_TWINS)
def test_folded_z_is_the_z_of_from_pretrained_processing(arch) -> None:
    """The nnsight backend's folded z on an HF model equals the hook_z of a TransformerLens model
    loaded with from_pretrained's full processing, read through TransformerLens's own cache."""
    hf_model = build_hf(arch)
    twin = twin_of(hf_model, "full")
    sites = [AttnSite.from_model(hf_model, layer) for layer in range(2)]
    _, cache = twin.run_with_cache(tokens(), names_filter=lambda name: name.endswith("hook_z"))
    # The HF model through nnsight, and an unprocessed TransformerLens model through its backend.
    for model in (hf_model, twin_of(hf_model, "none")):
        ours = backend_for(model).capture(tokens(), sites, convention="folded")
        for site in sites:
            error = (ours[site.layer].z - cache[site.hook_name]).abs().max().item()
            assert error <= 1e-5, f"{arch} layer {site.layer}: folded z off by {error:.2e}"
    # Not met trivially: where the model has b_V or a LayerNorm bias (GPT-2, NeoX; this Llama has
    # neither), HF z differs from the folded z by b_V + β·W_V.
    included = backend_for(hf_model).capture(tokens(), sites, convention="included")
    shift = (included[1].z - cache[sites[1].hook_name]).abs().max()
    assert shift > 1e-2 if arch != "llama" else shift < 1e-5


def test_conventions_differ_where_the_model_has_value_biases() -> None:
    model = build_hf("gpt2")
    site = AttnSite.from_model(model, 0)
    saes = {site: random_sae(site, seed=0, d_sae=4 * site.d_in, std=0.1)}
    backend = backend_for(model)
    with torch.no_grad():
        with backend.splicing(saes, convention="folded"):
            folded = backend.forward(tokens())
        with backend.splicing(saes, convention="included"):
            included = backend.forward(tokens())
    assert folded is not None and included is not None
    assert (folded - included).abs().max() > 1e-3
