"""sla.evaluate: agrees with SAELens's run_evals, reproduces Kissane et al.'s loss recovered, is the
same on both backends, ignores padding."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import SAE
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.cli.main import main
from sae_lens_attn.outputs import OUTPUT_MARKER

from .factories import D_VOCAB, N_CTX, near_identity_sae, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, build_twin, make_tokenizer

REQUIRED = {
    "l0", "dead_fraction", "explained_variance", "mse", "ce_clean", "ce_sae", "ce_zero_ablation",
    "ce_mean_ablation", "loss_recovered_zero", "loss_recovered_mean", "delta_ce", "kl",
    "loss_recovered_paper", "loss_recovered_saelens", "ce_clean_paper", "ce_sae_paper",
    "ce_zero_ablation_paper",
}  # fmt: skip
RATIOS = {"loss_recovered_zero", "loss_recovered_mean", "loss_recovered_paper",
          "loss_recovered_saelens", "explained_variance"}  # fmt: skip


@pytest.fixture(scope="module")
def tl_sae(model) -> SAE[Any]:
    return near_identity_sae(AttnSite.from_model(model, 1), value_bias_convention="included")


@pytest.mark.slow
def test_agrees_with_saelens_run_evals(model, tokens, tl_sae) -> None:
    ours = sla.evaluate(model, tl_sae, tokens, exclude_tokens=[0], progress=False)
    assert set(ours) >= REQUIRED
    store = ActivationsStore(
        model, Dataset.from_dict({"tokens": tokens.tolist()}), streaming=False,
        hook_name="blocks.1.attn.hook_z", hook_head_index=None, context_size=N_CTX, d_in=32,
        n_batches_in_buffer=2, total_training_tokens=tokens.numel(), store_batch_size_prompts=8,
        train_batch_size_tokens=32, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32",
    )  # fmt: skip
    n_batches = tokens.shape[0] // 8  # every row once, in order
    theirs, features = run_evals(
        tl_sae, store, model, ActivationScaler(),
        EvalConfig(
            batch_size_prompts=8, n_eval_reconstruction_batches=n_batches,
            n_eval_sparsity_variance_batches=n_batches, compute_kl=True, compute_ce_loss=True,
            compute_sparsity_metrics=True, compute_variance_metrics=True,
            compute_featurewise_density_statistics=True,
        ),
        exclude_special_tokens=[0],
    )  # fmt: skip
    ce = theirs["model_performance_preservation"]
    pairs = {
        "l0": theirs["sparsity"]["l0"],
        "explained_variance": theirs["reconstruction_quality"]["explained_variance"],
        "mse": theirs["reconstruction_quality"]["mse"],
        "ce_clean": ce["ce_loss_without_sae"],
        "ce_sae": ce["ce_loss_with_sae"],
        "ce_zero_ablation": ce["ce_loss_with_ablation"],
        "loss_recovered_zero": ce["ce_loss_score"],
        "loss_recovered_saelens": ce["ce_loss_score"],
        "kl": theirs["model_behavior_preservation"]["kl_div_with_sae"],
    }
    for key, value in pairs.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    density = torch.tensor(features["feature_density"])
    torch.testing.assert_close(ours.feature_density, density, rtol=0, atol=1e-6)
    assert ours.dead_fraction == pytest.approx((density == 0).float().mean().item())
    assert ours.dead_fraction >= 8 / tl_sae.cfg.d_sae  # the eight made dead
    assert 0.2 < ours.explained_variance < 1 and 0 < ours.l0 < tl_sae.cfg.d_sae
    assert ours.n_tokens == tokens.numel() - tokens.shape[0]  # BOS left out
    delta = ce["ce_loss_with_sae"] - ce["ce_loss_without_sae"]
    assert ours.delta_ce == pytest.approx(delta, rel=1e-4, abs=1e-6)
    # mean ablation, recomputed with TransformerLens hooks: z at every position set to its mean
    # over the counted (non-BOS) positions, CE over the predictions made there
    hook = tl_sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        mean_z = cache[hook][:, 1:].flatten(0, 1).double().mean(0).float()
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(hook, lambda z, hook: mean_z.expand_as(z))]
        )
    ce_mean = F.cross_entropy(logits[:, 1:-1].flatten(0, 1), tokens[:, 2:].flatten()).item()
    assert ours.ce_mean_ablation == pytest.approx(ce_mean, rel=1e-4)
    recovered = (ce_mean - ce["ce_loss_with_sae"]) / (ce_mean - ce["ce_loss_without_sae"])
    assert ours.loss_recovered_mean == pytest.approx(recovered, rel=1e-3)


def kissane_reconstruction(sae: SAE[Any], z: torch.Tensor) -> torch.Tensor:
    """A standard SAE's reconstruction of z [b, pos, heads, d_head] from its weights alone, as
    Kissane et al.'s AutoEncoder.forward computes it on z flattened head-major."""
    W_enc, W_dec, b_enc, b_dec = (sae.state_dict()[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
    acts = torch.relu((z.flatten(-2) - b_dec) @ W_enc + b_enc)
    return (acts @ W_dec + b_dec).reshape(z.shape)


def kissane_loss_recovered(
    model: HookedTransformer, sae: SAE[Any], tokens: torch.Tensor, batch_size: int
) -> dict[str, float]:
    """Kissane et al.'s get_recons_loss, by hand: the mean TransformerLens loss (every position)
    clean, with the reconstruction spliced at hook_z at every position, and with hook_z zeroed at
    every position, averaged over equal batches."""
    hook_name = sae.cfg.metadata.hook_name
    losses = {"clean": [], "sae": [], "zero": []}
    for batch in tokens.split(batch_size):
        losses["clean"].append(model(batch, return_type="loss").item())
        hooks = {
            "sae": lambda z, hook: kissane_reconstruction(sae, z),
            "zero": lambda z, hook: torch.zeros_like(z),
        }
        for name, hook in hooks.items():
            loss = model.run_with_hooks(batch, return_type="loss", fwd_hooks=[(hook_name, hook)])
            losses[name].append(loss.item())
    ce = {name: sum(values) / len(values) for name, values in losses.items()}
    ce["score"] = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    return ce


@pytest.mark.parametrize("processing", ["none", "from_pretrained"])
@pytest.mark.slow
def test_paper_loss_recovered_matches_kissane_et_al_loop(model, tokens, processing) -> None:
    """Every position counted and spliced, BOS included, z zero-ablated at hook_z, on a model
    without weight processing ("included" z) and on one processed as from_pretrained does
    ("folded" z, the published GPT-2 SAEs' setting)."""
    if processing == "none":
        tl, convention = model, "included"
    else:
        tl, convention = build_twin(build_hf("gpt2"), full_processing=True), "folded"
        tokens = torch.randint(2, VOCAB_SIZE, (8, 12), generator=torch.Generator().manual_seed(7))
        tokens[:, 0] = 0  # BOS
    sae = near_identity_sae(
        AttnSite.from_model(tl, 1), noise=0.05, value_bias_convention=convention
    )
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ours = sla.evaluate(tl, sae, tokens, batch_size=8, exclude_tokens=[0], progress=False)
    with torch.no_grad():
        theirs = kissane_loss_recovered(tl, sae, tokens, batch_size=8)
    assert ours.ce_clean_paper == pytest.approx(theirs["clean"], rel=1e-5)
    assert ours.ce_sae_paper == pytest.approx(theirs["sae"], rel=1e-5)
    assert ours.ce_zero_ablation_paper == pytest.approx(theirs["zero"], rel=1e-5)
    denominator = theirs["zero"] - theirs["clean"]
    assert abs(denominator) > 1e-3  # the ratio is well defined
    assert ours.loss_recovered_paper == pytest.approx(theirs["score"], abs=1e-5 / abs(denominator))
    assert ours.n_predictions_paper == tokens.shape[0] * (tokens.shape[1] - 1)
    # SAELens's variant leaves the BOS position out of the splice and the losses
    assert ours.n_predictions == tokens.shape[0] * (tokens.shape[1] - 2)
    assert ours.loss_recovered_saelens == ours.loss_recovered_zero
    assert ours.loss_recovered_saelens != pytest.approx(ours.loss_recovered_paper, abs=1e-6)


@pytest.mark.slow
def test_saelens_variant_masks_special_tokens_by_hand(model, tokens, tl_sae) -> None:
    """SAELens's positions, by hand: splice the reconstruction only where the token is not BOS,
    zero z everywhere, average the per-token losses of predictions made at non-BOS positions."""
    ours = sla.evaluate(model, tl_sae, tokens, exclude_tokens=[0], progress=False)
    keep = tokens != 0  # (B, T)
    hook_name = tl_sae.cfg.metadata.hook_name

    def splice(z, hook):
        return torch.where(keep[..., None, None], kissane_reconstruction(tl_sae, z), z)

    def zero(z, hook):
        return torch.zeros_like(z)

    with torch.no_grad():
        per_token = {
            "clean": model(tokens, return_type="loss", loss_per_token=True),
            "sae": model.run_with_hooks(
                tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_name, splice)]
            ),
            "zero": model.run_with_hooks(
                tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_name, zero)]
            ),
        }
    ce = {name: loss[keep[:, :-1]].mean().item() for name, loss in per_token.items()}
    expected = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    assert ours.ce_clean == pytest.approx(ce["clean"], rel=1e-5)
    assert ours.ce_sae == pytest.approx(ce["sae"], rel=1e-5)
    assert ours.loss_recovered_saelens == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_the_two_variants_agree_without_exclusions_and_exclude_from_loss(model, tokens, tl_sae):
    none_excluded = sla.evaluate(model, tl_sae, tokens, exclude_tokens=[], progress=False)
    assert none_excluded.loss_recovered_paper == none_excluded.loss_recovered_saelens
    assert none_excluded.ce_sae_paper == none_excluded.ce_sae
    default = sla.evaluate(model, tl_sae, tokens, exclude_tokens=[0], progress=False)
    paper_positions = sla.evaluate(
        model, tl_sae, tokens, exclude_tokens=[0], exclude_from_loss=False, progress=False
    )
    # exclude_from_loss picks the positions of the legacy keys only
    assert paper_positions.loss_recovered_zero == pytest.approx(default.loss_recovered_paper)
    assert paper_positions.ce_clean == pytest.approx(default.ce_clean_paper)
    assert paper_positions.n_predictions == default.n_predictions_paper
    for key in ("loss_recovered_paper", "loss_recovered_saelens", "l0", "mse"):
        assert paper_positions[key] == pytest.approx(default[key]), key
    # the paper variant does not depend on exclude_tokens
    assert none_excluded.loss_recovered_paper == pytest.approx(default.loss_recovered_paper)


@pytest.mark.parametrize("convention", ["folded", "included"])
@pytest.mark.slow
def test_same_numbers_through_nnsight_and_transformer_lens(convention) -> None:
    hf = build_hf("gpt2")
    twin = build_twin(hf, fold_value_biases=False)
    site = AttnSite.from_model(hf, 0)
    sae = near_identity_sae(site, value_bias_convention=convention)
    tokens = torch.randint(2, VOCAB_SIZE, (6, 12), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    via_hf = sla.evaluate(hf, sae, tokens, batch_size=4, exclude_tokens=[0], progress=False)
    via_tl = sla.evaluate(twin, sae, tokens, batch_size=4, exclude_tokens=[0], progress=False)
    assert via_hf.convention == via_tl.convention == convention
    for key in REQUIRED - RATIOS:
        assert via_hf[key] == pytest.approx(via_tl[key], rel=1e-4, abs=1e-5), key
    # a ratio of CE differences: float32 CEs agree to ~1e-6, the denominators can be ~1e-2
    for key, suffix in (("loss_recovered_paper", "_paper"), ("loss_recovered_saelens", "")):
        denominator = abs(via_tl[f"ce_zero_ablation{suffix}"] - via_tl[f"ce_clean{suffix}"])
        assert via_hf[key] == pytest.approx(via_tl[key], abs=1e-5 / denominator), key


def test_exact_reconstruction_recovers_all_the_loss() -> None:
    hf = build_hf("llama")
    site = AttnSite.from_model(hf, 1)
    sae = near_identity_sae(site, noise=0.0, threshold=0.0)
    tokens = torch.randint(2, VOCAB_SIZE, (4, 12), generator=torch.Generator().manual_seed(1))
    result = sla.evaluate(hf, sae, tokens, progress=False)
    assert result.convention == "included"  # no metadata: the backend's native convention
    assert result.ce_sae == pytest.approx(result.ce_clean, abs=1e-5)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.mse == pytest.approx(0.0, abs=1e-8) and result.explained_variance == 1.0
    assert result.ce_zero_ablation != pytest.approx(result.ce_clean, abs=1e-4)
    assert result.loss_recovered_zero == pytest.approx(1.0, abs=1e-3)
    assert result.loss_recovered_mean == pytest.approx(1.0, abs=1e-3)


def test_padding_and_excluded_tokens_do_not_count(model, tl_sae) -> None:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(2, D_VOCAB, (6, N_CTX), generator=g)
    tokens[:, 0] = 0
    mask = torch.ones_like(tokens)
    lengths = [N_CTX, 9, 12, N_CTX, 5, 14]
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
    junk = tokens.clone()
    junk[mask == 0] = torch.randint(2, D_VOCAB, (int((mask == 0).sum()),), generator=g)
    first = sla.evaluate(model, tl_sae, (tokens, mask), exclude_tokens=[0], progress=False)
    second = sla.evaluate(model, tl_sae, (junk, mask), exclude_tokens=[0], progress=False)
    assert first.n_tokens == sum(lengths) - len(lengths)
    assert first.n_predictions == sum(length - 2 for length in lengths)  # not from BOS, not to pad
    for key in REQUIRED:
        assert first[key] == pytest.approx(second[key], rel=1e-5, abs=1e-7), key
    everything = sla.evaluate(model, tl_sae, tokens, exclude_tokens=[], progress=False)
    assert everything.n_tokens == tokens.numel() != first.n_tokens


@pytest.mark.slow
def test_text_dataset_with_the_models_tokenizer() -> None:
    hf = build_hf("gpt2")
    tokenizer = make_tokenizer(VOCAB_SIZE)
    model = sla.hooked(hf, tokenizer)
    sae = near_identity_sae(AttnSite.from_model(hf, 1))
    text = " ".join(f"w{i % 50 + 2}" for i in range(200))
    dataset = Dataset.from_dict({"text": [text]})
    result = sla.evaluate(model, sae, dataset, context_size=16, progress=False)
    rows = 200 // 15  # contexts of BOS and 15 text tokens, cut from the one document
    assert result.n_tokens == rows * 15  # special tokens (BOS) excluded by default
    assert not math.isnan(result.loss_recovered_zero)


def test_an_sae_for_another_model_is_refused(model, gqa_model) -> None:
    tokens = torch.zeros(2, 8, dtype=torch.long)
    other = random_sae(AttnSite.from_model(gqa_model, 1))  # n_kv_heads=2
    with pytest.raises(ValueError, match="n_kv_heads=2 in the SAE but 4 in the model"):
        sla.evaluate(model, other, tokens, progress=False)
    deep = random_sae(AttnSite(5, 4, 4, 8))
    with pytest.raises(ValueError, match=r"layer 5 is out of range.*valid: 0\.\.1"):
        sla.evaluate(model, deep, tokens, progress=False)
    narrow = random_sae(AttnSite(1, 4, 4, 4), n_heads=None, d_head=None, n_kv_heads=None)
    with pytest.raises(ValueError, match=r"d_in=16 does not match the site.*= 32"):
        sla.evaluate(model, narrow, tokens, progress=False)


def test_a_dataset_too_short_for_the_context_size(model, tl_sae) -> None:
    tokens = torch.randint(1, D_VOCAB, (4, 8))
    with pytest.raises(ValueError, match=r"too short for context_size=16.*hold 8 tokens"):
        sla.evaluate(model, tl_sae, tokens, context_size=16, progress=False)
    hooked = sla.hooked(build_hf("gpt2"), make_tokenizer(VOCAB_SIZE))
    sae = near_identity_sae(AttnSite.from_model(hooked, 0))
    with pytest.raises(ValueError, match="too short for context_size=64"):
        sla.evaluate(hooked, sae, ["w3 w4 w5"], context_size=64, progress=False)
    with pytest.raises(ValueError, match="expected one of 'tokens', 'input_ids' or 'text'"):
        sla.evaluate(model, tl_sae, Dataset.from_dict({"ids": [[1, 2]]}), progress=False)
    with pytest.raises(ValueError, match="no position can be counted"):
        sla.evaluate(model, tl_sae, torch.zeros(2, 8, dtype=torch.long), exclude_tokens=[0],
                     progress=False)  # fmt: skip


@pytest.mark.slow
def test_cli_table_for_sae_folders_on_a_hugging_face_model(tmp_path, capsys) -> None:
    hf = build_hf("gpt2")
    hf.save_pretrained(tmp_path / "model")
    make_tokenizer(VOCAB_SIZE).save_pretrained(tmp_path / "model")
    folders = []
    for layer in (1, 0):
        folder = tmp_path / f"sae{layer}"
        near_identity_sae(AttnSite.from_model(hf, layer), seed=layer).save_model(folder)
        folders.append(str(folder))
    torch.save(torch.randint(2, VOCAB_SIZE, (8, 16)), tmp_path / "tokens.pt")
    code = main(["evaluate", "--model", f"hf:{tmp_path / 'model'}", "--sae", *folders,
                 "--tokens", str(tmp_path / "tokens.pt"), "--context-size", "16",
                 "--out", str(tmp_path / "eval")])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = [line for line in printed.out.splitlines() if line.startswith("|")]
    assert lines[0].startswith(
        "| layer | SAE | L0 | loss recovered (paper: all positions) | loss recovered (SAELens: "
        "special tokens excluded) | loss recovered (mean ablation, special tokens excluded) | dead %"
    )
    assert "paper: the SAE spliced at every position and every prediction counted" in printed.out
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["0", "1"]  # sorted by layer
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        OUTPUT_MARKER, "evaluation.json", "per_layer.html", "per_layer.png",
    ]  # fmt: skip
    assert (tmp_path / "eval" / "per_layer.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["evaluate", "--model", f"hf:{tmp_path / 'model'}", "--release", "no-such-rel",
                 "--tokens", str(tmp_path / "tokens.pt")])  # fmt: skip
    assert code == 1 and "no release 'no-such-rel'" in capsys.readouterr().err
