"""``feature_ablation`` against references that go through no part of ``sae_lens_attn``: each
feature's effect is a TransformerLens ``hook_z`` hook (or a pre-hook on a Hugging Face model's
output projection) subtracting ``a_f·W_dec[f]`` at each prompt's own positions; the error term's
replaces z by the reconstruction there; attribution is autograd's gradient at z times that change.
On the embedded default model, attribution is compared with real patching over every live
feature (the figure in ``docs/analyzers.md``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

import sae_lens_attn as sla
from sae_lens_attn.analysis import Edit, Source, feature_ablation, logit_diff, spliced

from .factories import (
    D_VOCAB,
    batch,
    boot,
    independent_z,
    near_identity_sae,
    out_proj_hooks,
    random_sae,
    sae_lens_encode,
)
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

POSITIONS = torch.tensor([[2, 5], [7, 3], [4, 9]])
"""Two positions per prompt, different in every prompt."""
METRIC = logit_diff([11, 10, 11], [3, 4, 5], [6, 7, 8])
"""A metric read after the positions (mask-padded prompt 1 ends at 10)."""


def flat_acts(sae: SAE[Any], z: Tensor) -> tuple[Tensor, Tensor]:
    """SAELens's activations of z and its reconstruction, heads concatenated."""
    _, acts = sae_lens_encode(sae, z)
    with torch.no_grad():
        recon = sae.decode(acts).reshape(z.shape)
    return acts, recon


def hooked_metric(
    model: HookedTransformer, tokens: Tensor, layer: int, fn: Any, **kw: Any
) -> Tensor:
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", lambda z, hook: fn(z))], **kw
        )
    return METRIC(logits)


def subtract(sae: SAE[Any], feature: int, positions: Tensor) -> Any:
    def hook(z: Tensor) -> Tensor:
        acts, _ = flat_acts(sae, z)
        z = z.clone()
        for i, where in enumerate(positions):
            for q in where.tolist():
                z[i, q] -= acts[i, q, feature] * sae.W_dec[feature].detach().reshape(z.shape[-2:])
        return z

    return hook


def reconstruct(sae: SAE[Any], positions: Tensor) -> Any:
    def hook(z: Tensor) -> Tensor:
        _, recon = flat_acts(sae, z)
        z = z.clone()
        for i, where in enumerate(positions):
            z[i, where] = recon[i, where]
        return z

    return hook


@pytest.fixture(scope="module")
def padded() -> tuple[Tensor, Tensor]:
    tokens = batch(3, 12, vocab=D_VOCAB)
    mask = torch.ones_like(tokens)
    mask[1, 11:] = 0  # prompt 1 is one token shorter
    return tokens, mask


@pytest.mark.parametrize("positions", [POSITIONS, POSITIONS[:, 0]], ids=["two_each", "one_each"])
def test_each_feature_and_the_error_term_match_hooks_that_make_the_edit(
    model: HookedTransformer, padded: tuple[Tensor, Tensor], positions: Tensor
) -> None:
    tokens, mask = padded
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    result = feature_ablation(model, sae, tokens, METRIC, positions, attention_mask=mask)
    per_prompt = positions if positions.ndim == 2 else positions[:, None]
    acts, _ = flat_acts(sae, independent_z(model, tokens, 0))
    live = acts[torch.arange(3)[:, None], per_prompt].ne(0).any(1).any(0)
    assert torch.equal(result.features, live.nonzero().flatten())  # the default: every live one
    clean = hooked_metric(model, tokens, 0, lambda z: z, attention_mask=mask)
    assert (result.clean - clean).abs().max() <= 1e-5
    for row, feature in list(enumerate(result.features.tolist()))[::7]:
        edited = hooked_metric(model, tokens, 0, subtract(sae, feature, per_prompt), attention_mask=mask)  # fmt: skip
        assert (result.delta[row] - (edited - clean)).abs().max() <= 1e-4, feature
    error = hooked_metric(model, tokens, 0, reconstruct(sae, per_prompt), attention_mask=mask)
    assert (result.error_delta - (error - clean)).abs().max() <= 1e-4
    assert result.delta.abs().max() > 1e-3


def test_attribution_is_the_gradient_at_z_times_the_change(
    model: HookedTransformer, padded: tuple[Tensor, Tensor]
) -> None:
    tokens, mask = padded
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    result = feature_ablation(
        model, sae, tokens, METRIC, POSITIONS, attention_mask=mask, method="attribution"
    )
    held: list[Tensor] = []

    def leaf(z: Tensor, hook: Any) -> Tensor:
        held.append(z.detach().requires_grad_(True))
        return held[-1]

    logits = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.attn.hook_z", leaf)], attention_mask=mask
    )
    values = METRIC(logits)
    (grad,) = torch.autograd.grad(values.sum(), held[-1])
    assert (result.clean - values.detach()).abs().max() <= 1e-5
    z = held[-1].detach()
    acts, recon = flat_acts(sae, z)
    rows = torch.arange(3)[:, None]
    g = grad[rows, POSITIONS].flatten(-2)  # (b, k, d_in)
    change = -acts[rows, POSITIONS][..., result.features]  # (b, k, F)
    expected = torch.einsum("bkd,fd,bkf->fb", g, sae.W_dec[result.features].detach(), change)
    assert (result.delta - expected).abs().max() <= 1e-4
    error = (z - recon)[rows, POSITIONS].flatten(-2)
    assert (result.error_delta - (g * -error).sum((1, 2))).abs().max() <= 1e-4


def test_batch_size_does_not_change_what_patching_measures(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    wide = feature_ablation(model, sae, tokens, METRIC, POSITIONS, batch_size=96)
    one = feature_ablation(model, sae, tokens, METRIC, POSITIONS, batch_size=1)
    assert torch.equal(wide.features, one.features)
    assert (wide.delta - one.delta).abs().max() <= 1e-5
    assert (wide.error_delta - one.error_delta).abs().max() <= 1e-5


def test_inactive_features_have_no_effect_and_need_no_pass(model: HookedTransformer) -> None:
    tokens = batch(3, 12, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0))
    acts, _ = flat_acts(sae, independent_z(model, tokens, 0))
    dead = acts[torch.arange(3)[:, None], POSITIONS].ne(0).any(1).any(0).logical_not()
    chosen = dead.nonzero().flatten()[:3]
    assert chosen.numel()
    for method in ("patch", "attribution"):
        result = feature_ablation(model, sae, tokens, METRIC, POSITIONS, chosen, method=method)  # type: ignore[arg-type]
        assert torch.equal(result.delta, torch.zeros(chosen.numel(), 3)), method


def test_every_mode_matches_the_same_edit_through_the_splice(model: HookedTransformer) -> None:
    """Both go through SAELens's decode; the splice decodes the whole of a', ablation adds the
    change of one feature, so the two agree only if each is right."""
    tokens = batch(3, 12, vocab=D_VOCAB)
    reference = batch(4, 12, seed=9, vocab=D_VOCAB)
    other = batch(3, 9, seed=4, vocab=D_VOCAB)
    sae = random_sae(sla.AttnSite.from_model(model, 0), "topk_rescaled")
    features = torch.tensor([0, 5, 17, 40])
    means = sla.analysis.reference_means(model, sae, reference)
    source = Source(other, torch.tensor([[1, 8], [0, 2], [5, 6]]))
    cases: dict[str, dict[str, Any]] = {
        "scale": {"value": 3.0},
        "set": {"value": torch.linspace(0, 1, sae.cfg.d_sae)},
        "mean": {"reference": reference},
        "patch": {"source": source},
    }
    with torch.no_grad():
        clean = METRIC(model(tokens))
    for mode, kwargs in cases.items():
        result = feature_ablation(model, sae, tokens, METRIC, POSITIONS, features, mode, **kwargs)  # type: ignore[arg-type]
        edit_kwargs = {"value": means.acts} if mode == "mean" else kwargs
        for row, feature in enumerate(features.tolist()):
            edit = Edit(sae, [feature], POSITIONS, mode=mode, **edit_kwargs)  # type: ignore[arg-type]
            with torch.no_grad(), spliced(model, edits=edit) as run:
                expected = METRIC(run(tokens)) - clean
            assert (result.delta[row] - expected).abs().max() <= 1e-4, (mode, feature)


# --- Hugging Face models (nnsight) and TransformerBridges --------------------------------------


def hf_metric(hf: Any, tokens: Tensor, layer: int, fn: Any) -> Tensor:
    heads = hf.config.num_attention_heads

    def hook(at: int, z_flat: Tensor) -> Tensor | None:
        return fn(z_flat.unflatten(-1, (heads, -1))).flatten(-2) if at == layer else None

    with torch.no_grad(), out_proj_hooks(hf, hook):
        return METRIC(hf(tokens).logits)


def hf_gradient(hf: Any, tokens: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """z (b_V included) and ∂METRIC/∂z at ``layer``, through a pre-hook on the output projection."""
    held: list[Tensor] = []

    def hook(at: int, z_flat: Tensor) -> Tensor | None:
        if at != layer:
            return None
        held.append(z_flat.detach().requires_grad_(True))
        return held[-1]

    with out_proj_hooks(hf, hook):
        values = METRIC(hf(tokens).logits)
    (grad,) = torch.autograd.grad(values.sum(), held[-1])
    heads = hf.config.num_attention_heads
    return held[-1].detach().unflatten(-1, (heads, -1)), grad.unflatten(-1, (heads, -1))


def check_against_hf(model: Any, hf: Any, layer: int) -> None:
    tokens = batch(3, 12, vocab=VOCAB_SIZE)
    site = sla.AttnSite.from_model(model, layer)
    sae = random_sae(site, d_sae=32, value_bias_convention="included")
    patched = feature_ablation(model, sae, tokens, METRIC, POSITIONS)
    estimated = feature_ablation(model, sae, tokens, METRIC, POSITIONS, method="attribution")
    clean = hf_metric(hf, tokens, layer, lambda z: z)
    assert (patched.clean - clean).abs().max() <= 1e-4
    assert (estimated.clean - clean).abs().max() <= 1e-4
    features = list(enumerate(patched.features.tolist()))
    for row, feature in features[:: max(1, len(features) // 3)]:
        edited = hf_metric(hf, tokens, layer, subtract(sae, feature, POSITIONS))
        assert (patched.delta[row] - (edited - clean)).abs().max() <= 1e-4, feature
    error = hf_metric(hf, tokens, layer, reconstruct(sae, POSITIONS))
    assert (patched.error_delta - (error - clean)).abs().max() <= 1e-4
    z, grad = hf_gradient(hf, tokens, layer)
    acts, recon = flat_acts(sae, z)
    rows = torch.arange(3)[:, None]
    g = grad[rows, POSITIONS].flatten(-2)
    change = -acts[rows, POSITIONS][..., estimated.features]
    W = sae.W_dec[estimated.features].detach()
    expected = torch.einsum("bkd,fd,bkf->fb", g, W, change)
    assert (estimated.delta - expected).abs().max() <= 1e-4
    error_change = -(z - recon)[rows, POSITIONS].flatten(-2)
    assert (estimated.error_delta - (g * error_change).sum((1, 2))).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_models_ablate_as_a_pre_hook_on_the_output_projection(arch: str) -> None:
    hf = build_hf(arch)
    check_against_hf(hf, hf, 0)


def test_a_bridge_ablates_as_the_plain_hf_model_does() -> None:
    pytest.importorskip("transformer_lens.model_bridge")
    check_against_hf(boot("gpt2", make_tokenizer(VOCAB_SIZE)), build_hf("gpt2"), 0)


# --- the embedded default model: attribution against real patching ------------------------------


@pytest.mark.slow  # 15 to 30 s on 2 cores: a forward pass of 24 prompts per live feature
def test_attribution_tracks_patching_on_the_default_model() -> None:
    """Layer 1's SAE on ``[BOS, r, r]`` (r: 12 random tokens): zero-ablate every feature live at
    the middle of the second copy, where induction predicts the next token; the metric is the
    logit of the token the copy continues with minus that of the token it continued with before.
    """
    model, _ = sla.load_default_model()
    sae = SAE.from_pretrained("stdlib-2l-attn-z", "blocks.1.hook_z")
    sae = sae[0] if isinstance(sae, tuple) else sae
    n, span = 24, 12
    g = torch.Generator().manual_seed(0)
    r = torch.randint(4, model.cfg.d_vocab, (n, span), generator=g)
    bos = torch.full((n, 1), model.tokenizer.bos_token_id or 0)  # type: ignore[union-attr]
    tokens = torch.cat([bos, r, r], dim=1)
    at = 1 + span + span // 2  # the second copy's middle: predicts r[span // 2 + 1]
    metric = logit_diff([at] * n, r[:, span // 2 + 1], r[:, span // 2 - 1])
    positions = torch.full((n,), at)
    patched = feature_ablation(model, sae, tokens, metric, positions, batch_size=256)
    estimated = feature_ablation(model, sae, tokens, metric, positions, method="attribution")
    assert torch.equal(patched.features, estimated.features)
    live = patched.delta != 0  # (feature, prompt) pairs where the feature fired
    pair = torch.stack([patched.delta[live], estimated.delta[live]])
    r_pearson = float(torch.corrcoef(pair)[0, 1])
    r_error = float(torch.corrcoef(torch.stack([patched.error_delta, estimated.error_delta]))[0, 1])
    print(
        f"default model, layer 1, {patched.features.numel()} live features, {int(live.sum())} "
        f"(feature, prompt) pairs: Pearson r = {r_pearson:.3f} (error term over prompts: "
        f"{r_error:.3f})"
    )
    assert r_pearson > 0.8


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_refused_with_what_was_expected(
    model: HookedTransformer, padded: tuple[Tensor, Tensor]
) -> None:
    tokens, mask = padded
    sae = random_sae(sla.AttnSite.from_model(model, 0))

    def run(**kwargs: Any) -> None:
        args: dict[str, Any] = {"metric": METRIC, "positions": POSITIONS, **kwargs}
        feature_ablation(model, sae, tokens, **args)

    with pytest.raises(ValueError, match=r"out of range: the SAE has d_sae=96 \(valid: 0..95\)"):
        run(features=[3, 96])
    with pytest.raises(ValueError, match=r"out of range for 12 tokens \(valid: 0..11\)"):
        run(positions=torch.tensor([1, 2, 12]))
    with pytest.raises(ValueError, match="prompt 1 at position 11, which is padding"):
        run(positions=torch.tensor([1, 11, 2]), attention_mask=mask)
    for wrong, shape in ((lambda logits: logits[:, -1, :2], "shape \\[3, 2\\]"),
                         (lambda logits: logits[:, -1, 0].sum(), "shape \\[\\]")):  # fmt: skip
        with pytest.raises(ValueError, match=f"one value per prompt.*{shape}"):
            run(metric=wrong)
    with pytest.raises(ValueError, match="mode 'mean' needs a reference set"):
        run(mode="mean")
    with pytest.raises(ValueError, match="mode 'scale' needs a value"):
        run(mode="scale")
    with pytest.raises(
        ValueError, match="unknown method 'exact'; valid: \\['patch', 'attribution'\\]"
    ):
        run(method="exact")
    with pytest.raises(ValueError, match="unknown mode 'drop'; valid: "):
        run(mode="drop")
    normalised = random_sae(sla.AttnSite.from_model(model, 0), normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="normalises z at run time"):
        feature_ablation(model, normalised, tokens, METRIC, POSITIONS)
    wide = near_identity_sae(sla.AttnSite(layer=0, n_heads=2, n_kv_heads=2, d_head=16))
    with pytest.raises(ValueError, match="another model's site"):
        feature_ablation(model, wide, tokens, METRIC, POSITIONS)
