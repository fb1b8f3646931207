"""SAE splices with the error term kept, and per-prompt edits of their features (``spliced``,
``Edit``), against references that go through no part of ``sae_lens_attn``: TransformerLens's own
``hook_z`` (``run_with_hooks``) and forward pre-hooks on a Hugging Face model's output projection,
with the edit written out by hand (``z − a_f·W_dec[f]`` at each prompt's own positions)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

import sae_lens_attn as sla
from sae_lens_attn.analysis import Edit, Source, reference_means, spliced

from .factories import (
    D_VOCAB,
    batch,
    boot,
    independent_z,
    near_identity_sae,
    out_proj_hooks,
    random_sae,
    sae_lens_encode,
    value_bias_from_weights,
)
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

POSITIONS = torch.tensor([[2, 5], [7, 3], [4, 9]])
"""Two positions per prompt, different in every prompt."""


def decode(sae: SAE[Any], acts: Tensor) -> Tensor:
    """SAELens's reconstruction, heads concatenated."""
    with torch.no_grad():
        return sae.decode(acts).flatten(-2) if sae.hook_z_reshaping_mode else sae.decode(acts)


def live_feature(sae: SAE[Any], z: Tensor) -> int:
    """The feature active at most of ``POSITIONS`` (first of them on ties)."""
    _, acts = sae_lens_encode(sae, z)
    return int(acts[torch.arange(3)[:, None], POSITIONS].ne(0).sum((0, 1)).argmax())


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def tl_logits(model: HookedTransformer, tokens: Tensor, hooks: dict[int, Any]) -> Tensor:
    """Logits with ``hooks[layer](z [b, pos, h, d]) -> z`` on TransformerLens's own hook_z."""
    fwd: list[Any] = [(z_hook(layer), lambda z, hook, fn=fn: fn(z)) for layer, fn in hooks.items()]
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=fwd)


def ablate_by_hand(
    sae: SAE[Any], feature: int, positions: Tensor, bias: Tensor | None = None
) -> Any:
    """z ↦ z − a_f·W_dec[f] at prompt i's own ``positions[i]`` (a_f from SAELens's encode of z,
    minus ``bias`` first for a folded SAE)."""

    def hook(z: Tensor) -> Tensor:
        z = z.clone()
        seen = z if bias is None else z - bias
        _, acts = sae_lens_encode(sae, seen)
        row = sae.W_dec[feature].detach().reshape(z.shape[-2:])
        for i, where in enumerate(positions):
            for q in where.tolist():
                z[i, q] -= acts[i, q, feature] * row
        return z

    return hook


@pytest.fixture(scope="module")
def saes(model: HookedTransformer) -> list[SAE[Any]]:
    return [random_sae(sla.AttnSite.from_model(model, layer), seed=layer) for layer in (0, 1)]


@pytest.mark.parametrize(
    "architecture", ["standard", "topk_rescaled", "jumprelu", "gated", "layer_norm"]
)
def test_a_splice_without_edits_leaves_the_output_unchanged(
    model: HookedTransformer, architecture: str
) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    site = sla.AttnSite.from_model(model, 0)
    sae = (
        random_sae(site, normalize_activations="layer_norm")
        if architecture == "layer_norm"
        else random_sae(site, architecture)
    )
    other = random_sae(sla.AttnSite.from_model(model, 1), seed=3)
    with torch.no_grad():
        clean = model(tokens)
        with spliced(model, [sae, other]) as run:
            assert (run(tokens) - clean).abs().max() <= 1e-5
        # the whole path (encode, decode twice, error kept) with an edit that changes nothing
        unit = Edit(sae, [0, 5, 9], POSITIONS, mode="scale", value=1.0)
        with spliced(model, [other], unit) as run:
            assert (run(tokens) - clean).abs().max() <= 1e-5


@pytest.mark.parametrize("architecture", ["standard", "topk_rescaled"])
def test_zeroing_a_feature_subtracts_its_decoder_row_at_each_prompts_own_positions(
    any_model: HookedTransformer, architecture: str
) -> None:
    model = any_model  # multi-head and grouped-query attention
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0), architecture)
    feature = live_feature(sae, independent_z(model, tokens, 0))
    hook = ablate_by_hand(sae, feature, POSITIONS)
    if architecture == "topk_rescaled":  # SAELens divides its activations by ‖W_dec[f]‖
        norm = sae.W_dec[feature].detach().norm()
        plain = hook

        def hook(z: Tensor) -> Tensor:
            return z + (plain(z) - z) / norm

    expected = tl_logits(model, tokens, {0: hook})
    with torch.no_grad():
        clean = model(tokens)
        with spliced(model, edits=Edit(sae, [feature], POSITIONS)) as run:
            got = run(tokens)  # inside the block, model(tokens) is spliced too
    assert (got - expected).abs().max() <= 1e-5
    assert (got - clean).abs().max() > 1e-3  # the edit did something


def test_a_prompt_is_edited_at_its_own_positions_only(model: HookedTransformer) -> None:
    """Kissane et al.'s notebook ablated every prompt's S2 in every prompt: not so here."""
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    seen: list[Tensor] = []

    def keep(tensor: Tensor, *, hook: Any) -> None:
        seen.append(tensor.detach().clone())

    edit = Edit(sae, list(range(sae.cfg.d_sae)), POSITIONS)
    clean_z = independent_z(model, tokens, 0)
    with torch.no_grad(), spliced(model, edits=edit) as run:
        model.add_hook(z_hook(0), keep)  # runs after the splice: sees the z the model uses
        try:
            run(tokens)
        finally:
            model.reset_hooks()
    changed = (seen[-1] - clean_z).flatten(-2).abs().amax(-1) > 0  # (b, pos)
    expected = torch.zeros_like(changed)
    expected[torch.arange(3)[:, None], POSITIONS] = True
    assert torch.equal(changed, expected)


def test_zeroing_the_error_term_sets_z_to_the_reconstruction(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))

    def reconstruct(z: Tensor) -> Tensor:
        z = z.clone()
        _, acts = sae_lens_encode(sae, z)
        recon = decode(sae, acts).reshape(z.shape)
        rows = torch.arange(3)[:, None]
        z[rows, POSITIONS] = recon[rows, POSITIONS]
        return z

    expected = tl_logits(model, tokens, {0: reconstruct})
    with torch.no_grad(), spliced(model, edits=Edit(sae, "error", POSITIONS)) as run:
        assert (run(tokens) - expected).abs().max() <= 1e-5


def test_every_mode_sets_the_activations_it_names(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    other = batch(3, 10, seed=5, vocab=D_VOCAB)
    other_positions = torch.tensor([[8, 1], [0, 6], [3, 3 + 1]])
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    features = torch.tensor([1, 7, 30])
    means = reference_means(model, sae, other)
    _, other_acts = sae_lens_encode(sae, independent_z(model, other, 0))
    assert torch.allclose(means.acts, other_acts.flatten(0, 1).mean(0), atol=1e-6)
    rows = torch.arange(3)[:, None]
    taken = other_acts[rows, other_positions][..., features]  # (b, k, F)
    scale = torch.linspace(-1, 2, sae.cfg.d_sae)
    targets = {  # the activations a' of `features` at POSITIONS, given a there
        "scale": (dict(value=scale), lambda a: a * scale[features]),
        "set": (dict(value=2.5), lambda a: torch.full_like(a, 2.5)),
        "mean": (dict(value=means.acts), lambda a: means.acts[features].expand_as(a)),
        "patch": (dict(source=Source(other, other_positions)), lambda a: taken),
    }
    for mode, (kwargs, target) in targets.items():

        def edit_by_hand(z: Tensor, target: Any = target) -> Tensor:
            _, acts = sae_lens_encode(sae, z)
            now = acts[rows, POSITIONS][..., features]  # (b, k, F)
            change = (target(now) - now) @ sae.W_dec[features].detach()  # (b, k, d_in)
            z = z.clone()
            z[rows, POSITIONS] += change.reshape(*change.shape[:2], *z.shape[-2:])
            return z

        expected = tl_logits(model, tokens, {0: edit_by_hand})
        edit = Edit(sae, features, POSITIONS, mode=mode, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad(), spliced(model, edits=edit) as run:
            assert (run(tokens) - expected).abs().max() <= 1e-5, mode


def test_error_term_edits_scale_set_and_patch_the_error(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    other = batch(3, 12, seed=7, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    rows = torch.arange(3)[:, None]

    def error_of(z: Tensor) -> Tensor:
        _, acts = sae_lens_encode(sae, z)
        return z - decode(sae, acts).reshape(z.shape)

    theirs = error_of(independent_z(model, other, 0))[rows, POSITIONS]
    means = reference_means(model, sae, other)
    assert torch.allclose(means.error, error_of(independent_z(model, other, 0)).flatten(0, 1).flatten(-2).mean(0), atol=1e-6)  # fmt: skip
    cases = {
        "scale": (dict(value=0.5), lambda e: 0.5 * e),
        "mean": (dict(value=means.error), lambda e: means.error.reshape(e.shape[-2:]).expand_as(e)),
        "patch": (dict(source=Source(other, POSITIONS)), lambda e: theirs),
    }
    for mode, (kwargs, target) in cases.items():

        def edit_by_hand(z: Tensor, target: Any = target) -> Tensor:
            error = error_of(z)[rows, POSITIONS]
            z = z.clone()
            z[rows, POSITIONS] += target(error) - error
            return z

        expected = tl_logits(model, tokens, {0: edit_by_hand})
        edit = Edit(sae, "error", POSITIONS, mode=mode, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad(), spliced(model, edits=edit) as run:
            assert (run(tokens) - expected).abs().max() <= 1e-5, mode


def test_several_saes_splice_at_once_and_the_later_one_reads_the_edited_z(
    model: HookedTransformer, saes: list[SAE[Any]]
) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    first = ablate_by_hand(saes[0], 4, POSITIONS)
    later = torch.tensor([[11], [10], [9]])
    second = ablate_by_hand(saes[1], 6, later)  # encodes the z that layer 0's edit changed
    expected = tl_logits(model, tokens, {0: first, 1: second})
    edits = [Edit(saes[0], [4], POSITIONS), Edit(saes[1], [6], later)]
    with torch.no_grad(), spliced(model, saes, edits) as run:
        assert (run(tokens) - expected).abs().max() <= 1e-5


def test_a_mask_of_positions_is_the_same_edit_as_their_indices(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[torch.arange(3)[:, None], POSITIONS] = True
    with torch.no_grad():
        with spliced(model, edits=Edit(sae, [2, 3], POSITIONS)) as run:
            by_index = run(tokens)
        with spliced(model, edits=Edit(sae, [2, 3], mask)) as run:
            assert torch.equal(run(tokens), by_index)


def test_a_folded_sae_reads_z_without_the_value_bias(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0), value_bias_convention="folded")
    bias = value_bias_from_weights(model, 0)
    expected = tl_logits(model, tokens, {0: ablate_by_hand(sae, 3, POSITIONS, bias)})
    with torch.no_grad(), spliced(model, edits=Edit(sae, [3], POSITIONS)) as run:
        assert (run(tokens) - expected).abs().max() <= 1e-5


# --- Hugging Face models (nnsight) and TransformerBridges --------------------------------------


def hf_reference(hf: Any, tokens: Tensor, sae: SAE[Any], feature: int, layer: int) -> Tensor:
    """The zero ablation written into a plain HF model's output-projection input (b_V included,
    as an ``"included"`` SAE reads it)."""

    def hook(at: int, z_flat: Tensor) -> Tensor | None:
        if at != layer:
            return None
        z = z_flat.clone()
        _, acts = sae_lens_encode(sae, z.unflatten(-1, (sae.cfg.metadata.n_heads, -1)))
        for i, where in enumerate(POSITIONS):
            for q in where.tolist():
                z[i, q] -= acts[i, q, feature] * sae.W_dec[feature].detach()
        return z

    with torch.no_grad(), out_proj_hooks(hf, hook):
        return hf(tokens).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_models_splice_and_edit_as_a_pre_hook_on_the_output_projection(arch: str) -> None:
    hf = build_hf(arch)
    tokens = batch(3, 12, vocab=VOCAB_SIZE)
    site = sla.AttnSite.from_model(hf, 1)
    sae = random_sae(site, value_bias_convention="included")
    with torch.no_grad():
        clean = hf(tokens).logits
        with spliced(hf, sae) as run:
            assert (run(tokens) - clean).abs().max() <= 1e-5
    feature = live_feature(sae, independent_z(hf, tokens, 1))
    expected = hf_reference(hf, tokens, sae, feature, 1)
    with torch.no_grad(), spliced(hf, edits=Edit(sae, [feature], POSITIONS)) as run:
        got = run(tokens)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - clean).abs().max() > 1e-3


def test_a_bridge_splices_and_edits_as_the_plain_hf_model_does() -> None:
    pytest.importorskip("transformer_lens.model_bridge")
    bridge = boot("gpt2", make_tokenizer(VOCAB_SIZE))
    hf = build_hf("gpt2")  # the same weights, unwrapped
    tokens = batch(3, 12, vocab=VOCAB_SIZE)
    sae = random_sae(sla.AttnSite.from_model(bridge, 0), value_bias_convention="included")
    with torch.no_grad():
        clean = hf(tokens).logits
        with spliced(bridge, sae) as run:
            assert (run(tokens) - clean).abs().max() <= 1e-4
    feature = live_feature(sae, independent_z(hf, tokens, 0))
    expected = hf_reference(hf, tokens, sae, feature, 0)
    with torch.no_grad(), spliced(bridge, edits=Edit(sae, [feature], POSITIONS)) as run:
        got = run(tokens)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - clean).abs().max() > 1e-3


# --- bad input -----------------------------------------------------------------------------------


def test_bad_edits_are_refused_with_what_was_expected(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    with pytest.raises(ValueError, match=r"out of range: the SAE has d_sae=96 \(valid: 0..95\)"):
        Edit(sae, [96], POSITIONS)
    with pytest.raises(
        ValueError, match="feature indices or 'error' \\(the error term\\), got 'errors'"
    ):
        Edit(sae, "errors", POSITIONS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown edit mode 'ablate'; valid: "):
        Edit(sae, [1], POSITIONS, mode="ablate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode 'scale' needs a value"):
        Edit(sae, [1], POSITIONS, mode="scale")
    with pytest.raises(ValueError, match="exactly in mode 'patch'"):
        Edit(sae, [1], POSITIONS, mode="patch")
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 6:] = 0
    cases = [
        (torch.tensor([1, 2, 12]), tokens, None, r"out of range for 12 tokens \(valid: 0..11\)"),
        (POSITIONS, tokens, mask, "prompt 1 at position 7, which is padding"),
        (POSITIONS, tokens[:2], None, r"batch=2 \(one row per prompt\)"),
        (torch.tensor([[2, 2], [1, 3], [4, 5]]), tokens, None, r"prompt 0 repeat a position"),
    ]
    for positions, given, given_mask, message in cases:
        edit = Edit(sae, [1], positions)
        with pytest.raises(ValueError, match=message), spliced(model, edits=edit) as run:
            run(given, given_mask)


def test_an_sae_of_another_model_is_refused(model: HookedTransformer) -> None:
    wide = near_identity_sae(sla.AttnSite(layer=0, n_heads=2, n_kv_heads=2, d_head=16))
    with pytest.raises(ValueError, match="another model's site"), spliced(model, wide):
        pass
