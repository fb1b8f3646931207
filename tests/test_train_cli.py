"""``sae-lens-attn train`` on the embedded default model and a tiny GPT-2, and the commands that
take its output (evaluate, publish); its progress bar, epoch warning, checkpoints and resume."""

from __future__ import annotations

import json
import shutil
import sysconfig
import warnings
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file
from tqdm import std as tqdm_std

from sae_lens_attn.cli.main import main
from sae_lens_attn.default_model import load_default_model
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.training import train as train_module
from sae_lens_attn.training.train import CHECKPOINTS_FOLDER, train_attn_saes

HOOK_1 = "blocks.1.attn.hook_z"
TINY = [
    "--training-tokens", "1024", "--batch-size-tokens", "256", "--buffer-size-tokens", "512",
    "--d-sae", "32", "--k", "4", "--context-size", "64", "--no-progress",
]  # fmt: skip
"""A run of four steps of 256 tokens."""


@pytest.fixture(scope="module")
def source_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stdlib source file (the default model's training domain), about 4k tokens."""
    path = tmp_path_factory.mktemp("text") / "decoder.txt"
    path.write_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text())
    return path


def _tiny_batches(tokenizer: Any, text: str, n_rows: int) -> TokenBatches:
    batches = TokenBatches.from_texts(tokenizer, [text], context_size=64, batch_size=4)
    return TokenBatches(batches.tokens[:n_rows], 4)


@pytest.mark.slow
def test_train_writes_saes_that_load_with_saelens(source_text, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert (
        main(["train", "--text", str(source_text), "--out", str(out), "--layers", "1", *TINY]) == 0
    )
    sae = SAE.load_from_disk(out / HOOK_1)
    assert sae.cfg.metadata.hook_name == HOOK_1
    assert (sae.cfg.d_sae, sae.cfg.d_in) == (32, 128)  # 4 heads × d_head 32
    assert sae.cfg.metadata.model_name == "stdlib-2l-attn"
    assert (out / HOOK_1 / "sparsity.safetensors").is_file()
    assert not (out / "blocks.0.attn.hook_z").exists()  # only the layers asked for
    assert str(out / HOOK_1) in capsys.readouterr().out


def test_bad_layers_and_sources_are_refused(source_text, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert main(["train", "--text", str(source_text), "--out", out, "--layers", "2", *TINY]) == 1
    assert "outside the model's layers 0..1" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--text", str(empty), "--out", out, *TINY]) == 1
    assert "no files match --glob" in capsys.readouterr().err
    assert main(["train", "--text", str(source_text), "--out", out, "--resume", *TINY]) == 1
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert not Path(out).exists() or not any(Path(out).iterdir())


@pytest.mark.slow
def test_progress_bar_reaches_its_total_and_epochs_warn_once(tmp_path, monkeypatch) -> None:
    """SAELens's own bar moves by 100 steps' samples every 100 steps: it would stay at 0 here."""
    bars: list[tuple[float, float]] = []
    close = tqdm_std.tqdm.close

    def recording_close(bar: Any) -> None:
        bars.append((bar.n, bar.total))
        close(bar)

    monkeypatch.setattr(tqdm_std.tqdm, "close", recording_close)
    model, tokenizer = load_default_model()
    batches = _tiny_batches(tokenizer, _stdlib_text(), 4)  # 256 tokens: many epochs of them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_attn_saes(
            model, [0, 1], batches, training_tokens=1100, out_dir=tmp_path,
            train_batch_size_tokens=128, buffer_size_tokens=256, d_sae=32, k=4,
            architecture="topk", progress=True,
        )  # fmt: skip
    assert (1100, 1100) in bars  # 9 steps of 128 = 1152 samples, shown as the total
    epoch_warnings = [w for w in caught if "token source exhausted" in str(w.message)]
    assert len(epoch_warnings) == 1


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint_to_the_total(tmp_path, monkeypatch) -> None:
    counts: list[tuple[int, int, int]] = []  # (samples at start, at end, steps at end)
    decoders: list[tuple[torch.Tensor, torch.Tensor]] = []  # W_dec at the start and the end
    fit = train_module._StepProgressTrainer.fit

    def recording_fit(trainer: Any) -> Any:
        start, sae = trainer.n_training_samples, trainer.saes[HOOK_1]
        first_decoder = sae.W_dec.detach().clone()
        result = fit(trainer)
        counts.append((start, trainer.n_training_samples, trainer.n_training_steps))
        decoders.append((first_decoder, sae.W_dec.detach().clone()))
        return result

    monkeypatch.setattr(train_module._StepProgressTrainer, "fit", recording_fit)
    model, tokenizer = load_default_model()
    batches = _tiny_batches(tokenizer, _stdlib_text(), 16)
    common: dict[str, Any] = dict(
        training_tokens=2048, train_batch_size_tokens=256, buffer_size_tokens=512, d_sae=32,
        k=4, architecture="topk", progress=False, n_checkpoints=1,
    )  # fmt: skip
    first = tmp_path / "first"
    train_attn_saes(model, [1], batches, out_dir=first, **common)
    (checkpoint,) = (first / CHECKPOINTS_FOLDER).iterdir()
    # one checkpoint, at the first step past half the run: 5 steps × 256
    assert int(checkpoint.name) == 5 * 256
    resumed = tmp_path / "resumed"  # a run killed after its checkpoint: the SAE was never saved
    shutil.copytree(first / CHECKPOINTS_FOLDER, resumed / CHECKPOINTS_FOLDER)
    train_attn_saes(model, [1], batches, out_dir=resumed, resume=True, **common)
    assert counts == [(0, 2048, 8), (5 * 256, 2048, 8)]
    at_checkpoint = load_file(checkpoint / HOOK_1 / "sae_weights.safetensors")["W_dec"]
    torch.testing.assert_close(decoders[1][0], at_checkpoint, rtol=0, atol=0)  # loaded it
    assert not torch.equal(decoders[1][1], at_checkpoint)  # and trained on
    assert SAE.load_from_disk(resumed / HOOK_1).cfg.d_sae == 32
    assert list((resumed / CHECKPOINTS_FOLDER).iterdir()) == [
        resumed / CHECKPOINTS_FOLDER / checkpoint.name
    ]


@pytest.mark.slow
def test_dataset_on_disk_and_the_evaluate_publish_chain(tmp_path, capsys) -> None:
    import datasets

    text = _stdlib_text()
    dataset_dir = tmp_path / "dataset"
    datasets.Dataset.from_dict({"text": [text[:5000], text[5000:]]}).save_to_disk(dataset_dir)
    out = tmp_path / "run"
    args = ["train", "--dataset", str(dataset_dir), "--out", str(out), "--layers", "1", *TINY]
    assert main([*args, "--text-column", "body"]) == 1
    assert "no column 'body'; its columns: ['text']" in capsys.readouterr().err
    assert main(args) == 0
    evaluation = tmp_path / "evaluation"
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(text)
    assert main([
        "evaluate", "--sae", str(out / HOOK_1), "--text", str(text_file), "--context-size", "64",
        "--max-prompts", "4", "--out", str(evaluation),
    ]) == 0  # fmt: skip
    rows = json.loads((evaluation / "evaluation.json").read_text())
    release = tmp_path / "release"
    assert main([
        "publish", str(out / HOOK_1), "--release", "tiny-attn", "--repo-id", "me/tiny-attn",
        "--out", str(release), "--metrics", str(evaluation / "evaluation.json"),
    ]) == 0  # fmt: skip
    card = (release / "README.md").read_text()
    (row,) = rows
    table_row = next(line for line in card.splitlines() if line.startswith(f"| `{HOOK_1}`"))
    cells = [cell.strip() for cell in table_row.strip("|").split("|")]
    assert cells[5:] == [
        f"{row['l0']:.2f}",
        f"{row['loss_recovered_paper']:.3f}",
        f"{row['dead_pct']:.1f}",
        f"{row['explained_variance']:.3f}",
    ]


@pytest.mark.slow
def test_the_card_takes_metrics_missing_from_the_file_from_the_sae_config(tmp_path) -> None:
    from sae_lens_attn.pretrained import publish

    model, tokenizer = load_default_model()
    batches = _tiny_batches(tokenizer, _stdlib_text(), 16)
    saved = train_attn_saes(
        model, [1], batches, training_tokens=1024, out_dir=tmp_path / "run",
        train_batch_size_tokens=256, buffer_size_tokens=512, d_sae=32, k=4,
        architecture="topk", progress=False, model_name=model.cfg.model_name,
    )  # fmt: skip
    cfg = json.loads((saved[1] / "cfg.json").read_text())["metadata"]
    publish(
        {"layer1": saved[1]}, tmp_path / "release", release="tiny-attn", repo_id="me/tiny-attn",
        metrics={"layer1": {"explained_variance": 0.5}},
    )  # fmt: skip
    card = (tmp_path / "release" / "README.md").read_text()
    table_row = next(line for line in card.splitlines() if line.startswith("| `layer1`"))
    cells = [cell.strip() for cell in table_row.strip("|").split("|")]
    dead_pct = 100.0 * cfg["num_dead_features"] / 32
    assert cells[5:] == [f"{cfg['l0']:.2f}", "—", f"{dead_pct:.1f}", "0.500"]
    assert "from the SAE's training metadata" in card


def test_publish_reads_the_evaluation_json_of_evaluate(tmp_path) -> None:
    from sae_lens_attn.pretrained.metrics import read_metrics_file

    rows = [
        {"layer": 1, "sae": str(tmp_path / "run" / HOOK_1), "l0": 4.0, "dead_pct": 12.5,
         "loss_recovered_paper": 0.75, "loss_recovered_saelens": 0.5, "explained_variance": 0.25},
        {"layer": 0, "sae": "some-release:blocks.0", "l0": 3.0, "dead_pct": 0.0,
         "loss_recovered_paper": float("nan"), "explained_variance": 0.5},
    ]  # fmt: skip
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(rows))
    assert read_metrics_file(path) == {
        HOOK_1: {"l0": 4.0, "ce_loss_recovered": 0.75, "dead_pct": 12.5, "explained_variance": 0.25},
        "blocks.0": {"l0": 3.0, "dead_pct": 0.0, "explained_variance": 0.5},
    }  # fmt: skip
    path.write_text(json.dumps([{"layer": 1}]))
    with pytest.raises(ValueError, match="rows of evaluate --out's evaluation.json"):
        read_metrics_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("hf_backend", ["nnsight", "hooked"])
def test_train_a_hugging_face_model_from_a_folder(hf_backend, tmp_path) -> None:
    from tests.hf_twins import build_hf, make_tokenizer

    model_dir = tmp_path / "gpt2"
    build_hf("gpt2").save_pretrained(model_dir)
    make_tokenizer(64).save_pretrained(model_dir)
    texts = tmp_path / "texts"
    texts.mkdir()
    words = torch.randint(2, 64, (3, 600), generator=torch.Generator().manual_seed(0))
    for i, row in enumerate(words):
        (texts / f"{i}.txt").write_text(" ".join(f"w{w}" for w in row.tolist()))
    out = tmp_path / "run"
    assert main([
        "train", "--model", f"hf:{model_dir}", "--hf-backend", hf_backend, "--text", str(texts),
        "--out", str(out), "--architecture", "standard", "--training-tokens", "1024",
        "--batch-size-tokens", "256", "--buffer-size-tokens", "512", "--d-sae", "16",
        "--no-progress",
    ]) == 0  # fmt: skip
    for layer in (0, 1):
        sae = SAE.load_from_disk(out / f"blocks.{layer}.attn.hook_z")
        assert sae.cfg.metadata.hf_architecture == "GPT2LMHeadModel"
        assert sae.cfg.metadata.model_name == str(model_dir)


def _stdlib_text() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()


@pytest.mark.slow
def test_analyze_picks_induction_heads_that_leave_a_control_as_the_demo_does(tmp_path) -> None:
    from sae_lens_attn.analysis import induction_features
    from sae_lens_attn.analysis.induction import induction_scores
    from sae_lens_attn.analysis.induction_heuristics import default_seq_len
    from sae_lens_attn.demo import INDUCTION_HEAD_SCORE

    model, tokenizer = load_default_model()
    bos = cast(int, tokenizer.bos_token_id)
    tokens = _tiny_batches(tokenizer, _stdlib_text(), 8).tokens
    token_file = tmp_path / "tokens.pt"
    torch.save(tokens, token_file)
    out = tmp_path / "analysis"
    common = ["analyze", "--sae", "stdlib-2l-attn-z:blocks.1", "--tokens", str(token_file)]
    common += ["--analyzers", "induction_features", "--format", "json"]
    assert main([*common, "--out", str(out)]) == 0
    (summary,) = json.loads((out / "induction_summary.json").read_text())
    scores = induction_scores(model, bos_token_id=bos, seq_len=default_seq_len(model))[1]
    expected = [h for h in range(4) if scores[h] >= 0.9 * scores.max()]
    assert summary["induction_heads"] == " ".join(map(str, expected))
    assert 0 < len(expected) < 4  # some heads are left out: a negative control exists
    demo = induction_features(
        model, SAE.from_pretrained("stdlib-2l-attn-z", "blocks.1"), tokens,
        head_score=INDUCTION_HEAD_SCORE, bos_token_id=bos,
    )  # fmt: skip
    assert list(demo.induction_heads) == expected
    rows = json.loads((out / "induction_features.json").read_text())
    assert [(r["feature"], r["verdict"]) for r in rows] == [
        (r.feature, r.verdict) for r in demo.rows
    ]
    assert {"control"} <= {r["verdict"] for r in rows}
    chosen = tmp_path / "chosen"
    assert main([*common, "--out", str(chosen), "--induction-heads", "3"]) == 0
    (summary,) = json.loads((chosen / "induction_summary.json").read_text())
    assert summary["induction_heads"] == "3"
