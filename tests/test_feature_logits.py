"""Feature logits: W_dec[f] · W_O_cat · W_U against the HF modules themselves, a forward pass with a
z patch, TransformerLens twins and the bridge; and the refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.analysis.logits import logit_effects

from .factories import out_proj, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, build_twin, make_tokenizer


def module_effects(hf: Any, layer: int, W_dec: torch.Tensor) -> torch.Tensor:
    """``lm_head(o_proj(W_dec) − o_proj(0)) − lm_head(0)``: the modules' own linear maps (the
    output projection named in ``factories``, not through the backend's table)."""
    proj, lm_head = out_proj(hf, layer), hf.get_output_embeddings()
    with torch.no_grad():
        resid = proj(W_dec) - proj(torch.zeros_like(W_dec[:1]))
        return lm_head(resid) - lm_head(torch.zeros_like(resid[:1]))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_effects_equal_the_hf_modules_applied_to_the_decoder(arch: str) -> None:
    hf = build_hf(arch)
    sae = random_sae(AttnSite.from_model(hf, 1), value_bias_convention="included")
    expected = module_effects(hf, 1, sae.W_dec.detach())  # (d_sae, V)
    features = torch.arange(sae.cfg.d_sae)
    torch.testing.assert_close(logit_effects(hf, sae, features), expected, atol=1e-5, rtol=1e-5)
    result = sla.analysis.feature_logits(hf, sae, k=5, feature_chunk=40)
    top, bottom = expected.topk(5, dim=-1), expected.topk(5, dim=-1, largest=False)
    torch.testing.assert_close(result.top_values, top.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.bottom_values, bottom.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.top_ids, top.indices) and torch.equal(
        result.bottom_ids, bottom.indices
    )
    assert result.top_ids.shape == result.bottom_ids.shape == (sae.cfg.d_sae, 5)
    assert result.layer == 1 and result.top_tokens[0][0] == f"<{int(top.indices[0, 0])}>"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_twins_and_nnsight_give_the_hf_values(arch: str) -> None:
    from nnsight import NNsight

    hf = build_hf(arch)
    twin = build_twin(hf, fold_value_biases=False)
    sae = random_sae(AttnSite.from_model(hf, 0), value_bias_convention="included")
    features = [0, 7, 50]
    expected = sla.analysis.feature_logits(hf, sae, features, k=8)
    for other in (twin, NNsight(build_hf(arch))):
        got = sla.analysis.feature_logits(other, sae, features, k=8)
        torch.testing.assert_close(got.top_values, expected.top_values, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.top_ids, expected.top_ids)
        assert torch.equal(got.bottom_ids, expected.bottom_ids)
    # the twin carries a tokenizer: tokens are shown as text
    assert sla.analysis.feature_logits(twin, sae, features, k=8).top_tokens[1][0] == (
        make_tokenizer(VOCAB_SIZE).decode([int(expected.top_ids[1, 0])])
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bridge_gives_the_hf_values(arch: str, tmp_path) -> None:
    pytest.importorskip(
        "transformer_lens.model_bridge",
        reason="TransformerBridge exists only in TransformerLens >= 3 (the new stack)",
    )
    from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
        TransformerBridge,
    )

    make_tokenizer(VOCAB_SIZE).save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = build_hf(arch)
    sae = random_sae(AttnSite.from_model(hf, 1), value_bias_convention="included")
    expected = module_effects(hf, 1, sae.W_dec.detach())
    bridge = TransformerBridge.boot_transformers(
        f"tiny-{arch}", hf_model=build_hf(arch), tokenizer=tokenizer, device="cpu"
    )
    features = torch.arange(sae.cfg.d_sae)
    torch.testing.assert_close(logit_effects(bridge, sae, features), expected, atol=1e-5, rtol=1e-5)


def test_effect_is_the_logit_change_of_a_z_patch_without_final_norm() -> None:
    """On the last layer of an attention-only model without norms, adding W_dec[f] to z at one
    position changes that position's logits by exactly the feature's effect, and nothing else."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=12, d_head=8, n_heads=4, d_vocab=50,
        attn_only=True, normalization_type=None, act_fn="relu",
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    sae = random_sae(AttnSite.from_model(model, 1), d_sae=16)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    clean = model(tokens)
    feature, position = 5, 7
    direction = sae.W_dec.detach()[feature].unflatten(0, (4, 8))

    def add_feature(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, position] += direction
        return z

    patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", add_feature)])
    change = patched - clean
    effects = logit_effects(model, sae, torch.tensor([feature]))[0]
    torch.testing.assert_close(change[:, position], effects.expand(2, -1), atol=1e-5, rtol=1e-4)
    others = [p for p in range(12) if p != position]
    assert change[:, others].abs().max() < 1e-5
    result = sla.analysis.feature_logits(model, sae, [feature], k=3)
    assert result.top_ids[0].tolist() == change[0, position].topk(3).indices.tolist()


def test_a_model_without_an_unembedding_is_refused() -> None:
    hf = build_hf("llama")
    sae = random_sae(AttnSite.from_model(hf, 0), value_bias_convention="included")
    hf.lm_head = None  # type: ignore[assignment]  # what a headless model offers
    assert hf.get_output_embeddings() is None
    with pytest.raises(ValueError, match=r"no output embeddings .* no W_U"):
        sla.analysis.feature_logits(hf, sae)
    with pytest.raises(ValueError, match="no output embeddings"):
        sla.analysis.feature_families(hf, sae, torch.randint(2, VOCAB_SIZE, (2, 8)))


def test_bad_arguments_are_refused(model) -> None:
    sae = random_sae(AttnSite.from_model(model, 1), d_sae=16)
    with pytest.raises(
        ValueError, match=r"k=65 exceeds the model's vocabulary of 64 tokens \(valid: 1..64\)"
    ):
        sla.analysis.feature_logits(model, sae, k=65)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        sla.analysis.feature_logits(model, sae, k=0)
    with pytest.raises(ValueError, match=r"feature indices \[16\] are out of range"):
        sla.analysis.feature_logits(model, sae, [3, 16])
    wide = random_sae(AttnSite(1, 4, 4, 16), d_sae=16)
    with pytest.raises(ValueError, match="trained for another model.s site: d_head=16"):
        sla.analysis.feature_logits(model, wide)
    result = sla.analysis.feature_logits(model, sae, [2, 9], k=4)
    assert result.row(9) == 1
    with pytest.raises(ValueError, match=r"feature 3 is not in this result; it holds \[2, 9\]"):
        result.row(3)
