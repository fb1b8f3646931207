"""The embedded default model and its SAEs: offline loading, shipped quality, clear errors.

The quality tests recompute the shipped ``metrics.json`` on a small sample of the held-out files
(the same files the recipe held out: the split is a hash of each file's path), with tolerances
wide enough for the sample size but far tighter than the targets' margins, so a model or SAE that
regressed fails them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

import sae_lens_attn as sla
from sae_lens_attn.default_model import (
    PACKAGED_CONVERSION_FUNC,
    RELEASE_NAME,
    corpus,
    read_metrics,
    register_default_release,
)
from sae_lens_attn.default_model import model as model_files
from sae_lens_attn.pretrained import measure
from tests.hf_twins import BOS_ID, VOCAB_SIZE, build_hf, build_twin

REPO = Path(__file__).resolve().parents[1]
SAE_IDS = ("blocks.0", "blocks.0.hook_z", "blocks.1", "blocks.1.hook_z")
SAMPLE_ROWS = 48
"""Held-out rows (of 128 tokens) the quality tests recompute the metrics on."""


@pytest.fixture(scope="module")
def default() -> tuple[HookedTransformer, Any]:
    return sla.load_default_model()


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    return read_metrics()


@pytest.fixture(scope="module")
def held_out_rows(default: tuple[HookedTransformer, Any]) -> torch.Tensor:
    """The first held-out rows exactly as the recipe cut them: a subset of its evaluation rows."""
    model, tokenizer = default
    split = corpus.split_corpus(sysconfig.get_paths()["stdlib"])
    rows = sla.TokenBatches.from_texts(
        tokenizer,
        corpus.read_texts(split.held_out),
        context_size=model.cfg.n_ctx,
        batch_size=SAMPLE_ROWS,
    ).tokens
    assert rows.shape[0] >= SAMPLE_ROWS, f"only {rows.shape[0]} held-out rows on this machine"
    return rows[:SAMPLE_ROWS]


# --- loading --------------------------------------------------------------------------------


def test_default_model_loads_offline_and_deterministically(
    default: tuple[HookedTransformer, Any],
) -> None:
    model, tokenizer = default
    again, _ = sla.load_default_model()
    assert isinstance(model, HookedTransformer) and not model.training
    assert (model.cfg.n_layers, model.cfg.attn_only) == (2, True)
    text = "def add(a, b):\n    return a + b\n"
    tokens = model.to_tokens(text)
    assert tokens[0].tolist() == tokenizer(text).input_ids  # BOS prepended by both
    assert tokens[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(tokens[0, 1:]) == text  # byte-level BPE is lossless
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), again(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("sae_id", SAE_IDS)
def test_release_loads_through_saelens(default: tuple[HookedTransformer, Any], sae_id: str) -> None:
    model, _ = default
    layer = int(sae_id.split(".")[1])
    sae = SAE.from_pretrained(RELEASE_NAME, sae_id)
    again = SAE.from_pretrained(RELEASE_NAME, sae_id)
    site = sla.AttnSite.from_sae(sae, model)
    assert site == sla.AttnSite.from_model(model, layer)
    assert sae.cfg.reshape_activations == "hook_z"
    assert sae.cfg.metadata.model_name == model_files.MODEL_NAME
    # What SAELens's packaged-release path loads is exactly what vanilla SAELens reads from disk.
    on_disk = SAE.load_from_disk(model_files.PACKAGE_DIR / model_files.SAES_DIR / site.hook_name)
    for name, tensor in on_disk.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], tensor, rtol=0, atol=0)
    z = sla.backend_for(model).capture(model.to_tokens("x = [i for i in y]"), [site])[layer].z
    torch.testing.assert_close(sae(z), again(z), rtol=0, atol=0)


def test_release_registration_is_idempotent() -> None:
    release = sla.get_release(RELEASE_NAME)
    assert register_default_release() == release
    assert release.ids == list(SAE_IDS)
    assert release.conversion_func == PACKAGED_CONVERSION_FUNC


def test_unknown_sae_id_lists_the_valid_ids() -> None:
    with pytest.raises(ValueError, match=r"blocks\.7") as err:
        SAE.from_pretrained(RELEASE_NAME, "blocks.7")
    for sae_id in SAE_IDS:
        assert repr(sae_id) in str(err.value)
    with pytest.raises(ValueError, match="valid ids") as err:
        sla.get_release(RELEASE_NAME).sae("blocks.7")
    assert all(repr(sae_id) in str(err.value) for sae_id in SAE_IDS)


def test_saved_weights_are_the_parameters(
    default: tuple[HookedTransformer, Any], tmp_path: Path
) -> None:
    """Buffers (each attention's causal mask and IGNORE) are rebuilt from the config, not saved:
    their shapes differ across TransformerLens versions (3.x keeps an empty mask). The shipped
    file, written by 2.x, carries them and loads on both (``test_a_copy_of_the_files_loads``)."""
    model, tokenizer = default
    out = tmp_path / "saved"
    model_files.save_default_model(model, tokenizer, out)
    model_files.write_checksums(out)
    saved = load_file(str(out / model_files.WEIGHTS_FILE))
    assert set(saved) == {name for name, _ in model.named_parameters()}
    again, _ = sla.load_default_model(out)
    tokens = model.to_tokens("for key, value in items.items():")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)


def test_weights_that_do_not_fit_the_config_are_named(
    default: tuple[HookedTransformer, Any], tmp_path: Path
) -> None:
    model, tokenizer = default
    out = tmp_path / "saved"
    model_files.save_default_model(model, tokenizer, out)
    weights = out / model_files.WEIGHTS_FILE
    state = load_file(str(weights))
    state["blocks.0.attn.W_Q"] = state["blocks.0.attn.W_Q"][..., :-1].contiguous()
    state["blocks.9.attn.W_Q"] = state["blocks.1.attn.W_Q"].clone()
    save_file(state, str(weights))
    model_files.write_checksums(out)
    with pytest.raises(ValueError, match=r"do not fit.*'blocks\.0\.attn\.W_Q', 'blocks\.9"):
        sla.load_default_model(out)


# --- damaged files --------------------------------------------------------------------------


@pytest.fixture()
def package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped files that the loaders read instead of the package's own."""
    copy = tmp_path / "files"
    shutil.copytree(model_files.PACKAGE_DIR, copy)
    monkeypatch.setattr(model_files, "PACKAGE_DIR", copy)
    return copy


def _load_all() -> tuple[HookedTransformer, dict[str, SAE[Any]]]:
    model, _ = sla.load_default_model()
    saes = {
        sae_id: SAE.from_pretrained(RELEASE_NAME, sae_id) for sae_id in ("blocks.0", "blocks.1")
    }
    return model, saes


def test_a_copy_of_the_files_loads(package_copy: Path) -> None:
    """The loaders read the copy (so the failures below come from the damage alone): what they
    return is what safetensors reads from the copied files."""
    model, saes = _load_all()
    weights = load_file(str(package_copy / model_files.WEIGHTS_FILE))
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), weights[name], rtol=0, atol=0)
    for sae_id, sae in saes.items():
        stored = load_file(
            str(package_copy / "saes" / f"{sae_id}.attn.hook_z" / "sae_weights.safetensors")
        )
        assert set(stored) <= dict(sae.named_parameters()).keys()
        for name, tensor in stored.items():
            torch.testing.assert_close(getattr(sae, name).detach(), tensor, rtol=0, atol=0)


DAMAGED = (
    "model.safetensors",
    "tokenizer.json",
    "model_config.json",
    "saes/blocks.0.attn.hook_z/sae_weights.safetensors",
    "saes/blocks.1.attn.hook_z/sparsity.safetensors",
    "saes/blocks.1.attn.hook_z/cfg.json",
)


@pytest.mark.parametrize("relative", DAMAGED)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_gives_an_error_naming_it(
    package_copy: Path, relative: str, damage: str
) -> None:
    path = package_copy / relative
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or truncated") as err:
        _load_all()
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "relative",
    ["saes/blocks.0.attn.hook_z/sae_weights.safetensors", "saes/blocks.1.attn.hook_z/cfg.json"],
)
def test_zero_byte_file_gives_an_error_naming_it(package_copy: Path, relative: str) -> None:
    (package_copy / relative).write_bytes(b"")
    with pytest.raises(ValueError, match="corrupted or truncated") as err:
        _load_all()
    assert str(package_copy / relative) in str(err.value)


@pytest.mark.parametrize("relative", ["model.safetensors", "saes/blocks.0.attn.hook_z/cfg.json"])
def test_missing_file_gives_an_error_naming_it(package_copy: Path, relative: str) -> None:
    (package_copy / relative).unlink()
    with pytest.raises(FileNotFoundError, match="missing") as err:
        _load_all()
    assert str(package_copy / relative) in str(err.value)


# --- shipped quality --------------------------------------------------------------------------


def independent_sae_metrics(
    model: HookedTransformer, sae: SAE[Any], rows: torch.Tensor, bos: int
) -> tuple[float, float]:
    """L0 and explained variance of ``sae`` on ``rows``, BOS left out, from TransformerLens's
    hook_z and SAELens's own ``encode``/``decode``: no sae_lens_attn code on the way."""
    hook = sae.cfg.metadata.hook_name
    assert sae.cfg.metadata.value_bias_convention == "included"  # z as the model computes it
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=hook)
        z = cache[hook][rows != bos]  # (tokens, n_heads, d_head): the SAE flattens hook_z itself
        acts = sae.encode(z)
        z_hat = sae.decode(acts).reshape(z.shape).flatten(-2).double()
    z = z.flatten(-2).double()
    residual = (z - z_hat).pow(2).sum(-1).mean()
    variance = (z - z.mean(0)).pow(2).sum(-1).mean()
    return (acts != 0).sum(-1).double().mean().item(), 1 - (residual / variance).item()


def test_shipped_metrics_meet_the_targets(metrics: dict[str, Any]) -> None:
    assert metrics["unigram_ce"] - metrics["model_ce"] >= 1.0
    assert max(metrics["induction_scores"][1]) >= 0.5
    assert set(metrics["saes"]) == {"blocks.0", "blocks.1"}
    for sae_id, m in metrics["saes"].items():
        assert 3 <= m["l0"] <= 40, sae_id
        assert m["ce_loss_recovered"] >= 0.8, sae_id
        assert m["dead_pct"] <= 30, sae_id
        assert m["explained_variance"] >= 0.7, sae_id


@pytest.mark.parametrize("sae_id", SAE_IDS)
def test_release_numbers_match_an_independent_measurement(
    default: tuple[HookedTransformer, Any], held_out_rows: torch.Tensor, sae_id: str
) -> None:
    """The release's l0 and variance_explained (what SAELens's benchmark checks), against the
    SAE run through TransformerLens and SAELens alone on held-out rows (a subset of the recipe's
    evaluation rows, hence the tolerances of ``test_sae_metrics_reproduce_on_held_out_sample``)."""
    model, tokenizer = default
    reported = sla.get_release(RELEASE_NAME).sae(sae_id)
    sae = SAE.from_pretrained(RELEASE_NAME, sae_id)
    l0, explained = independent_sae_metrics(model, sae, held_out_rows, tokenizer.bos_token_id)
    assert reported.l0 == pytest.approx(l0, abs=1.0)
    assert reported.variance_explained == pytest.approx(explained, abs=0.06)


def test_model_beats_unigram_on_held_out_sample(
    default: tuple[HookedTransformer, Any], metrics: dict[str, Any], held_out_rows: torch.Tensor
) -> None:
    model, _ = default
    counts = torch.tensor(metrics["unigram_counts"], dtype=torch.float64)
    assert counts.shape == (model.cfg.d_vocab,) and bool((counts >= 1).all())
    with torch.no_grad():
        model_ce = model(held_out_rows, return_type="loss").item()
    unigram_ce = -(counts / counts.sum()).log()[held_out_rows[:, 1:]].mean().item()
    assert model_ce == pytest.approx(metrics["model_ce"], abs=0.3)
    assert unigram_ce == pytest.approx(metrics["unigram_ce"], abs=0.3)
    assert unigram_ce - model_ce >= 1.0


def test_induction_score_reproduces(
    default: tuple[HookedTransformer, Any], metrics: dict[str, Any]
) -> None:
    model, _ = default
    scores = sla.analysis.induction_scores(
        model, seq_len=metrics["induction_seq_len"], n_samples=32, seed=12345
    )
    shipped = torch.tensor(metrics["induction_scores"])
    assert scores.shape == shipped.shape == (2, model.cfg.n_heads)
    assert scores[1].max().item() == pytest.approx(shipped[1].max().item(), abs=0.06)
    assert scores[1].argmax().item() == shipped[1].argmax().item()
    assert scores[1].max().item() >= 0.45


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.slow
def test_sae_metrics_reproduce_on_held_out_sample(
    default: tuple[HookedTransformer, Any],
    metrics: dict[str, Any],
    held_out_rows: torch.Tensor,
    layer: int,
) -> None:
    model, tokenizer = default
    sae = SAE.from_pretrained(RELEASE_NAME, f"blocks.{layer}")
    sample = measure(model, sae, held_out_rows, exclude_tokens=[tokenizer.bos_token_id]).metrics
    shipped = metrics["saes"][f"blocks.{layer}"]
    assert sample.l0 == pytest.approx(shipped["l0"], abs=1.0)
    assert sample.ce_loss_recovered == pytest.approx(shipped["ce_loss_recovered"], abs=0.05)
    assert sample.explained_variance == pytest.approx(shipped["explained_variance"], abs=0.06)
    # The sample is a subset of the recipe's evaluation rows: a feature dead there is dead here.
    assert sample.dead_pct is not None and sample.dead_pct >= shipped["dead_pct"] - 1e-9
    assert sample.dead_pct <= shipped["dead_pct"] + 15


# --- induction scores -----------------------------------------------------------------------


def test_induction_scores_match_a_direct_reading_of_the_pattern() -> None:
    twin = build_twin(build_hf("gpt2"), fold_value_biases=False)
    n = 6
    assert twin.tokenizer is not None
    scores = sla.analysis.induction_scores(twin, seq_len=n, n_samples=5, seed=3, batch_size=2)
    vocab = torch.tensor([i for i in range(VOCAB_SIZE) if i not in twin.tokenizer.all_special_ids])
    tokens = sla.analysis.repeated_random_tokens(
        vocab, bos_token_id=BOS_ID, seq_len=n, n_samples=5, seed=3
    )
    assert tokens.shape == (5, 2 * n + 1)
    torch.testing.assert_close(tokens[:, 1 : n + 1], tokens[:, n + 1 :])
    _, cache = twin.run_with_cache(tokens)
    for layer in range(2):
        pattern = cache["pattern", layer]  # (B, H, Q, K)
        expected = torch.stack(
            [pattern[:, :, i, i - n + 1] for i in range(n + 1, 2 * n + 1)], dim=-1
        ).mean(dim=(0, 2))
        torch.testing.assert_close(scores[layer], expected)
    given = sla.analysis.induction_scores(twin, sequences=tokens[:, 1 : n + 1], batch_size=3)
    torch.testing.assert_close(given, scores)


def test_induction_scores_agree_across_backends() -> None:
    hf_model = build_hf("gpt2")
    twin = build_twin(hf_model, fold_value_biases=False)
    kwargs: dict[str, Any] = {"seq_len": 7, "n_samples": 6, "seed": 0, "bos_token_id": BOS_ID}
    assert twin.tokenizer is not None
    special = twin.tokenizer.all_special_ids
    hf_scores = sla.analysis.induction_scores(hf_model, exclude_token_ids=special, **kwargs)
    torch.testing.assert_close(sla.analysis.induction_scores(twin, **kwargs), hf_scores)
    with pytest.raises(ValueError, match="bos_token_id"):
        sla.analysis.induction_scores(hf_model, seq_len=3)


# --- the recipe --------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipe_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "default-model"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes/train_default_model.py"),
            "--smoke",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer = sla.load_default_model(out)
    written = read_metrics(out)
    assert model.cfg.d_vocab == len(tokenizer) == len(written["unigram_counts"])
    assert set(written["saes"]) == {"blocks.0", "blocks.1"}
    assert torch.tensor(written["induction_scores"]).shape == (2, model.cfg.n_heads)
    # the recipe's evaluation rows, cut again as it cut them (--smoke: 8 held-out files, context
    # 32, 16 rows), to measure its SAEs independently of sae_lens_attn
    held_out = corpus.split_corpus(sysconfig.get_paths()["stdlib"]).held_out[:8]
    rows = sla.TokenBatches.from_texts(
        tokenizer, corpus.read_texts(held_out), context_size=32, batch_size=8
    ).tokens[:16]
    assert written["eval_tokens"] == rows.numel()
    bos = tokenizer.bos_token_id
    assert isinstance(bos, int)
    for layer in range(2):
        sae = SAE.load_from_disk(out / "saes" / sla.AttnSite.from_model(model, layer).hook_name)
        assert sae.cfg.reshape_activations == "hook_z"
        l0, explained = independent_sae_metrics(model, sae, rows, bos)
        assert written["saes"][f"blocks.{layer}"]["l0"] == pytest.approx(l0, rel=1e-5)
        assert written["saes"][f"blocks.{layer}"]["explained_variance"] == pytest.approx(
            explained, abs=1e-4
        )
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,tokens,loss,induction_l1,elapsed_s" and len(log) >= 2
