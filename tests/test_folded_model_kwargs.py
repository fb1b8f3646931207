"""The folded convention's model kwargs reproduce the training z in SAELens's own loaders.

SAELens's runner and evals load a TransformerLens model as
``HookedTransformer.from_pretrained_no_processing(model_name, **model_from_pretrained_kwargs)``
(``sae_lens.load_model.load_model``). Here a tiny GPT-2 stands in the hub cache as ``gpt2`` and is
loaded exactly that way with the kwargs the ``gpt2-small-attn-z`` release records; its hook_z must
be the folded z the nnsight backend delivers on the same weights.
"""

from __future__ import annotations

import pytest
import torch
from sae_lens.load_model import load_model

from sae_lens_attn import AttnSite, backend_for
from sae_lens_attn.site import convention_of_model_kwargs, folded_model_kwargs

from .factories import FROM_PRETRAINED_DEFAULTS
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer
from .hub_cache import add_repo, folder_files, use_hub_cache


def test_sae_lens_loader_delivers_the_folded_z(tmp_path, monkeypatch) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path)
    hf_model = build_hf("gpt2")
    hf_model.config.n_ctx = hf_model.config.n_positions  # in GPT-2's config.json; TL reads it
    hf_model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    make_tokenizer(VOCAB_SIZE).save_pretrained(tmp_path / "gpt2")
    add_repo(cache, "gpt2", folder_files(tmp_path / "gpt2"))

    kwargs = folded_model_kwargs(None)  # what every folded SAE we save or convert records
    assert kwargs == FROM_PRETRAINED_DEFAULTS
    tl_model = load_model(
        "HookedTransformer", "gpt2-small", device="cpu", model_from_pretrained_kwargs=kwargs
    )
    tokens = torch.randint(0, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(1))
    _, cache_z = tl_model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
    sites = [AttnSite.from_model(hf_model, layer) for layer in range(2)]
    ours = backend_for(hf_model).capture(tokens, sites, convention="folded")
    for site in sites:
        torch.testing.assert_close(ours[site.layer].z, cache_z[site.hook_name], atol=1e-5, rtol=0)

    # The kwargs the first release recorded, fold_value_biases alone, gave another z.
    partial = load_model(
        "HookedTransformer",
        "gpt2-small",
        device="cpu",
        model_from_pretrained_kwargs={"fold_value_biases": True},
    )
    _, partial_z = partial.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
    assert (partial_z["blocks.1.attn.hook_z"] - ours[1].z).abs().max() > 1e-2


def test_kwargs_that_fold_b_v_without_the_layer_norm_are_refused() -> None:
    with pytest.raises(ValueError, match="fold_ln"):
        convention_of_model_kwargs({"fold_value_biases": True})
    with pytest.raises(ValueError, match="contradict the 'folded'"):
        folded_model_kwargs({"fold_ln": False})
    assert convention_of_model_kwargs(FROM_PRETRAINED_DEFAULTS) == "folded"
    assert convention_of_model_kwargs({}) == "included"
