"""``activation_patching`` against references that go through no part of ``sae_lens_attn``: noising
the attention output is a TransformerLens hook writing the corrupt run's ``hook_attn_out`` at the
aligned positions (on Hugging Face models, a forward hook on the output projection writing its
output); z per head and SAE features likewise through ``hook_z``; a run patched into itself
changes nothing. Clean and corrupt prompts differ in length and are right-padded."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import SAE
from torch import Tensor, nn
from transformer_lens import HookedTransformer

import sae_lens_attn as sla
from sae_lens_attn.analysis import activation_patching, logit_diff

from .factories import (
    D_VOCAB,
    batch,
    boot,
    near_identity_sae,
    out_proj,
    random_sae,
    sae_lens_encode,
)
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer


class Pair:
    """Three clean prompts of 12 tokens and their corruptions of 14 (prompt 1: 13 real tokens),
    with two aligned positions per prompt and a metric on each run."""

    clean = batch(3, 12, vocab=D_VOCAB)
    corrupt = batch(3, 14, seed=3, vocab=D_VOCAB)
    corrupt_mask = torch.ones(3, 14, dtype=torch.long)
    corrupt_mask[1, 13:] = 0
    positions = torch.tensor([[3, 6], [2, 9], [5, 7]])
    """In the clean run."""
    source_positions = torch.tensor([[5, 8], [4, 12], [7, 9]])
    """The aligned positions in the corrupt run."""
    on_clean = logit_diff([11, 11, 11], [3, 4, 5], [6, 7, 8])
    on_corrupt = logit_diff([13, 12, 13], [3, 4, 5], [6, 7, 8])


def with_vocab(vocab: int) -> Pair:
    pair = Pair()
    pair.clean = batch(3, 12, vocab=vocab)
    pair.corrupt = batch(3, 14, seed=3, vocab=vocab)
    return pair


def tl_run(model: HookedTransformer, tokens: Tensor, hooks: list[Any], mask: Tensor | None = None) -> Tensor:  # fmt: skip
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask)


def cached(model: HookedTransformer, tokens: Tensor, name: str, mask: Tensor | None = None) -> Tensor:  # fmt: skip
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[name], attention_mask=mask)
    return cache[name]


def writer(giver: Tensor, at: Tensor, source: Tensor, head: int | None = None) -> Any:
    """A hook writing ``giver[i, source[i, j]]`` at ``[i, at[i, j]]`` (one head's, with ``head``)."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        act = act.clone()
        for i in range(act.shape[0]):
            for q, s in zip(at[i].tolist(), source[i].tolist(), strict=True):
                if head is None:
                    act[i, q] = giver[i, s]
                else:
                    act[i, q, head] = giver[i, s, head]
        return act

    return hook


def test_noising_the_attention_output_writes_the_corrupt_runs_at_aligned_positions(
    model: HookedTransformer,
) -> None:
    p = Pair()
    result = activation_patching(
        model, p.clean, p.corrupt, (p.on_clean, p.on_corrupt), [0, 1],
        positions=p.positions, source_positions=p.source_positions,
        corrupt_attention_mask=p.corrupt_mask,
    )  # fmt: skip
    assert (result.clean - p.on_clean(tl_run(model, p.clean, []))).abs().max() <= 1e-5
    corrupt = tl_run(model, p.corrupt, [], p.corrupt_mask)
    assert (result.corrupt - p.on_corrupt(corrupt)).abs().max() <= 1e-5
    assert result.patched.shape == (2, 3)
    for row, layer in enumerate((0, 1)):
        name = f"blocks.{layer}.hook_attn_out"
        giver = cached(model, p.corrupt, name, p.corrupt_mask)
        hook = writer(giver, p.positions, p.source_positions)
        expected = p.on_clean(tl_run(model, p.clean, [(name, hook)]))
        assert (result.patched[row] - expected).abs().max() <= 1e-4, layer
    assert (result.patched - result.clean).abs().max() > 1e-3


def test_noising_z_patches_one_head_at_a_time(model: HookedTransformer) -> None:
    p = Pair()
    result = activation_patching(
        model, p.clean, p.corrupt, (p.on_clean, p.on_corrupt), [1], target="z",
        positions=p.positions, source_positions=p.source_positions,
        corrupt_attention_mask=p.corrupt_mask,
    )  # fmt: skip
    assert result.patched.shape == (1, 4, 3)
    name = "blocks.1.attn.hook_z"
    giver = cached(model, p.corrupt, name, p.corrupt_mask)
    for head in range(4):
        hook = writer(giver, p.positions, p.source_positions, head)
        expected = p.on_clean(tl_run(model, p.clean, [(name, hook)]))
        assert (result.patched[0, head] - expected).abs().max() <= 1e-4, head


def test_denoising_patches_the_clean_run_into_the_corrupt_one(model: HookedTransformer) -> None:
    p = Pair()
    result = activation_patching(
        model, p.clean, p.corrupt, (p.on_clean, p.on_corrupt), [0], direction="denoising",
        positions=p.source_positions, source_positions=p.positions,  # receiver: corrupt
        corrupt_attention_mask=p.corrupt_mask,
    )  # fmt: skip
    name = "blocks.0.hook_attn_out"
    giver = cached(model, p.clean, name)
    hook = writer(giver, p.source_positions, p.positions)
    expected = p.on_corrupt(tl_run(model, p.corrupt, [(name, hook)], p.corrupt_mask))
    assert (result.patched[0] - expected).abs().max() <= 1e-4


def test_patching_features_keeps_the_receivers_error_term(model: HookedTransformer) -> None:
    p = Pair()
    sae = random_sae(sla.AttnSite.from_model(model, 0))

    def reconstruction(z: Tensor) -> Tensor:
        _, acts = sae_lens_encode(sae, z)
        with torch.no_grad():
            return sae.decode(acts).reshape(z.shape)

    name = "blocks.0.attn.hook_z"
    theirs = reconstruction(cached(model, p.corrupt, name, p.corrupt_mask))

    def hook(z: Tensor, hook: Any) -> Tensor:
        error = z - reconstruction(z)
        return writer(theirs, p.positions, p.source_positions)(reconstruction(z)) + error

    expected = p.on_clean(tl_run(model, p.clean, [(name, hook)]))
    result = activation_patching(
        model, p.clean, p.corrupt, (p.on_clean, p.on_corrupt), [0], target="features",
        positions=p.positions, source_positions=p.source_positions, sae=sae,
        corrupt_attention_mask=p.corrupt_mask,
    )  # fmt: skip
    assert (result.patched[0] - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("target", ["attn_out", "z", "features"])
def test_a_run_patched_into_itself_changes_nothing(model: HookedTransformer, target: str) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = [random_sae(sla.AttnSite.from_model(model, layer)) for layer in (0, 1)]
    result = activation_patching(
        model, tokens, tokens, Pair.on_clean, [0, 1], target=target,  # type: ignore[arg-type]
        sae=sae if target == "features" else None,
    )  # fmt: skip
    assert torch.equal(result.clean, result.corrupt)
    assert (result.patched - result.clean).abs().max() <= 1e-5


def test_batch_size_does_not_change_the_result(model: HookedTransformer) -> None:
    p = Pair()
    args = (model, p.clean, p.corrupt, (p.on_clean, p.on_corrupt), [0, 1], "z")
    kwargs: dict[str, Any] = {
        "positions": p.positions,
        "source_positions": p.source_positions,
        "corrupt_attention_mask": p.corrupt_mask,
    }
    one = activation_patching(*args, batch_size=1, **kwargs)  # type: ignore[arg-type]
    many = activation_patching(*args, batch_size=100, **kwargs)  # type: ignore[arg-type]
    assert (one.patched - many.patched).abs().max() <= 1e-5


# --- Hugging Face models (nnsight) and TransformerBridges --------------------------------------


def hf_noised(hf: Any, p: Pair, layer: int) -> Tensor:
    """The clean run's metric with the output projection's output (the attention output, b_O
    included) of ``layer`` written from the corrupt run at the aligned positions."""
    kept: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        kept.append(output.detach())

    module = out_proj(hf, layer)
    handle = module.register_forward_hook(keep)
    try:
        with torch.no_grad():
            hf(p.corrupt, attention_mask=p.corrupt_mask)
    finally:
        handle.remove()
    write = writer(kept[-1], p.positions, p.source_positions)
    handle = module.register_forward_hook(lambda _m, _i, output: write(output))
    try:
        with torch.no_grad():
            return p.on_clean(hf(p.clean).logits)
    finally:
        handle.remove()


def check_against_hf(model: Any, hf: Any) -> None:
    p = with_vocab(VOCAB_SIZE)
    result = activation_patching(
        model, p.clean, p.corrupt, (p.on_clean, p.on_corrupt), [0, 1],
        positions=p.positions, source_positions=p.source_positions,
        corrupt_attention_mask=p.corrupt_mask,
    )  # fmt: skip
    with torch.no_grad():
        assert (result.clean - p.on_clean(hf(p.clean).logits)).abs().max() <= 1e-4
    for row, layer in enumerate((0, 1)):
        assert (result.patched[row] - hf_noised(hf, p, layer)).abs().max() <= 1e-4, layer
    assert (result.patched - result.clean).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_models_noise_the_attention_output_as_a_hook_on_the_output_projection(
    arch: str,
) -> None:
    hf = build_hf(arch)
    check_against_hf(hf, hf)


def test_a_bridge_noises_the_attention_output_as_the_plain_hf_model_does() -> None:
    pytest.importorskip("transformer_lens.model_bridge")
    check_against_hf(boot("gpt2", make_tokenizer(VOCAB_SIZE)), build_hf("gpt2"))


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_refused_with_what_was_expected(model: HookedTransformer) -> None:
    p = Pair()
    both = (p.on_clean, p.on_corrupt)
    aligned: dict[str, Any] = {
        "positions": p.positions,
        "source_positions": p.source_positions,
        "corrupt_attention_mask": p.corrupt_mask,
    }

    def run(metric: Any = both, layers: Any = (0,), **kwargs: Any) -> None:
        activation_patching(model, p.clean, p.corrupt, metric, layers, **{**aligned, **kwargs})

    with pytest.raises(ValueError, match="differ in length .* give positions .* source_positions"):
        activation_patching(model, p.clean, p.corrupt, both, [0])
    with pytest.raises(ValueError, match="one metric cannot read both runs"):
        run(metric=p.on_clean)
    with pytest.raises(ValueError, match="prompt 1 at position 13, which is padding"):
        run(source_positions=torch.tensor([[5, 8], [4, 13], [7, 9]]))
    with pytest.raises(ValueError, match=r"out of range for 12 tokens \(valid: 0..11\)"):
        run(positions=torch.tensor([[3, 6], [2, 12], [5, 7]]))
    with pytest.raises(ValueError, match="prompt 0 has 2 positions and 1 source_positions"):
        run(source_positions=torch.tensor([[5], [4], [7]]))
    with pytest.raises(ValueError, match="unknown target 'resid'; valid: "):
        run(target="resid")
    with pytest.raises(ValueError, match="unknown direction 'both'; valid: "):
        run(direction="both")
    with pytest.raises(ValueError, match=r"layer 2 is out of range: the model has 2 layers"):
        run(layers=[2])
    with pytest.raises(ValueError, match="target 'features' needs sae="):
        run(target="features")
    sae: SAE[Any] = random_sae(sla.AttnSite.from_model(model, 0))
    with pytest.raises(ValueError, match=r"none reads layers \[1\]"):
        run(target="features", layers=[0, 1], sae=sae)
    wide = near_identity_sae(sla.AttnSite(layer=0, n_heads=2, n_kv_heads=2, d_head=16))
    with pytest.raises(ValueError, match="another model's site"):
        run(target="features", sae=wide)
    with pytest.raises(ValueError, match=r"one value per prompt.*shape \[3, 4\]"):
        run(metric=(lambda logits: logits[:, -1, :4], p.on_corrupt))
    with pytest.raises(ValueError, match="one corrupt prompt per clean prompt"):
        activation_patching(model, p.clean, p.corrupt[:2], both, [0])
