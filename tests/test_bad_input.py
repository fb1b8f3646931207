"""Bad input a careful user finds (issue 13, item 5): each is refused with an error that names what
was expected and what was given, or, for broken plugins, warned about without harm to the rest."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

import sae_lens_attn as sla
from sae_lens_attn import AttnActivationStore, AttnSite, TokenBatches
from sae_lens_attn.analysis import AnalysisInput, registry
from sae_lens_attn.analysis.heads import head_attribution
from sae_lens_attn.cli.inputs import load_sae
from sae_lens_attn.cli.main import main as cli_main
from sae_lens_attn.config.sae_configs import (
    AttnBatchTopKTrainingSAEConfig,
    AttnStandardTrainingSAEConfig,
    AttnTopKTrainingSAEConfig,
)
from sae_lens_attn.pretrained.metrics import read_metrics_file
from sae_lens_attn.pretrained.model_card import head_shares
from sae_lens_attn.site import as_integer, check_layer

from .factories import D_VOCAB, N_CTX, random_sae
from .hf_twins import N_CTX as HF_N_CTX
from .hf_twins import VOCAB_SIZE as HF_VOCAB
from .hf_twins import build_hf

# --- the analyzer registry ---------------------------------------------------------------------


class _Analyzer:
    description = "counts tokens"

    def __call__(self, inputs: AnalysisInput) -> dict[str, Any]:
        return {"count": [{"tokens": int(inputs.tokens.numel())}]}


def _fake_distribution(root: Path, entry_points: str) -> Path:
    """A distribution ``broken-plugin`` installed in ``root`` (a folder for ``sys.path``)."""
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{entry_points}")
    return root


BROKEN_POINTS = (
    "missing_module = broken_plugin_not_installed.analyzers:ANALYZER\n"
    "not_an_analyzer = json:JSONDecodeError\n"
    "dfa = json:dumps\n"
)
"""One that cannot import, one whose object is no analyzer, one that claims a built-in's name."""


BUILTINS = sorted(
    point.name
    for point in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    if point.dist is not None and point.dist.name == "sae-lens-attn"
)
"""The analyzers this package declares in its pyproject.toml, as installed."""


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry as in a new process: nothing registered, entry points not loaded yet."""
    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_register_refuses_a_builtin_name_before_anything_was_looked_up(fresh_registry) -> None:
    with pytest.raises(ValueError, match=r"analyzer 'dfa' is already registered .*replace=True"):
        sla.analysis.register("dfa", _Analyzer())
    builtin = sla.analysis.get("dfa")
    assert type(builtin).__module__ == "sae_lens_attn.analysis.analyzers.basic"
    mine = _Analyzer()
    sla.analysis.register("dfa", mine, replace=True)
    assert sla.analysis.get("dfa") is mine


@pytest.mark.parametrize("name", [3, None, b"dfa", ("dfa",)])
def test_register_refuses_names_that_are_not_strings(fresh_registry, name: Any) -> None:
    with pytest.raises(TypeError, match=r"an analyzer name must be a str, got"):
        sla.analysis.register(name, _Analyzer())


@pytest.mark.parametrize("name", ["", "   "])
def test_register_refuses_empty_names(fresh_registry, name: str) -> None:
    with pytest.raises(ValueError, match="an analyzer name must be a non-empty string"):
        sla.analysis.register(name, _Analyzer())
    assert name not in sla.analysis.names()


def test_a_broken_plugin_warns_naming_its_distribution_and_the_builtins_still_work(
    fresh_registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model
) -> None:
    fake = _fake_distribution(tmp_path, BROKEN_POINTS)
    installed = importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    plugin = [
        point
        for dist in importlib.metadata.distributions(path=[str(fake)])
        for point in dist.entry_points
        if point.group == registry.ENTRY_POINT_GROUP
    ]
    assert len(plugin) == 3
    # the plugin listed first, so the built-ins must win by rule, not by order
    monkeypatch.setattr(registry, "entry_points", lambda group: [*plugin, *installed])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = sla.analysis.names()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3, messages
    assert all("of distribution 'broken-plugin'" in m for m in messages)
    (missing,) = [m for m in messages if "missing_module" in m]
    assert "'broken_plugin_not_installed.analyzers:ANALYZER'" in missing
    assert "failed to import" in missing and "ModuleNotFoundError" in missing
    (invalid,) = [m for m in messages if "not_an_analyzer" in m]
    assert "callable with a str description" in invalid
    (clash,) = [m for m in messages if "dfa = 'json:dumps'" in m]
    assert "ignored: the name is already registered" in clash
    assert names == BUILTINS
    sae = random_sae(AttnSite.from_model(model, 1))
    tokens = torch.randint(1, D_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = AnalysisInput(model, sae, tokens, options={"features": [2]})
    (row,) = sla.analysis.get("head_attribution")(inputs)["head_attribution"]
    expected = head_attribution(sae)[2]
    assert [row[f"head_{h}"] for h in range(4)] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.slow
def test_fresh_process_register_refuses_builtin_and_survives_a_broken_plugin(
    tmp_path: Path,
) -> None:
    """In a new interpreter, with a broken plugin really installed on ``sys.path``."""
    fake = _fake_distribution(tmp_path, BROKEN_POINTS)
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        import sae_lens_attn as sla

        class Mine:
            description = "mine"
            def __call__(self, inputs):
                return {}

        try:
            sla.analysis.register("dfa", Mine())
        except ValueError as err:
            print("REFUSED", err)
        print("NAMES", sla.analysis.names())
        print("DFA", type(sla.analysis.get("dfa")).__module__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(fake)},
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED analyzer 'dfa' is already registered" in done.stdout
    assert f"NAMES {BUILTINS}" in done.stdout
    assert "DFA sae_lens_attn.analysis.analyzers.basic" in done.stdout
    assert "missing_module" in done.stderr and "of distribution 'broken-plugin'" in done.stderr


# --- tokens -------------------------------------------------------------------------------------


def _bad_tokens(width: int = 8) -> dict[str, tuple[torch.Tensor, type[Exception], str]]:
    good = torch.randint(1, D_VOCAB, (4, width), generator=torch.Generator().manual_seed(0))
    negative, too_large = good.clone(), good.clone()
    negative[1, 3] = -1
    too_large[2, 5] = D_VOCAB
    return {
        "negative": (
            negative,
            ValueError,
            r"token ids \[-1\] are out of range.*valid ids: 0\.\.63",
        ),
        "too_large": (too_large, ValueError, r"token ids \[64\] are out of range.*64 tokens"),
        "float": (good.float(), TypeError, r"integer token ids.*got dtype torch.float32"),
        "too_long": (
            torch.ones(4, N_CTX + 1, dtype=torch.long),
            ValueError,
            rf"contexts of {N_CTX + 1} tokens exceed the model's {N_CTX} positions",
        ),
    }


BAD_TOKENS = list(_bad_tokens())


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_store_refuses_bad_tokens(model, kind: str) -> None:
    tokens, error, message = _bad_tokens()[kind]
    if error is TypeError:  # TokenBatches needs no model to see that floats are no token ids
        with pytest.raises(TypeError, match=message):
            TokenBatches(tokens, 2)
        return
    store = AttnActivationStore(
        model,
        [0],
        TokenBatches(tokens, 2),
        train_batch_size_tokens=8,
        buffer_size_tokens=16,
        cycle=False,
    )
    with pytest.raises(error, match=message):
        list(store)  # the whole stream: a bad row may come in a later model pass
    with pytest.raises(error, match=message):
        store.activations(tokens)


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_evaluate_refuses_bad_tokens(model, kind: str) -> None:
    tokens, error, message = _bad_tokens()[kind]
    sae = random_sae(AttnSite.from_model(model, 0))
    with pytest.raises(error, match=message):
        sla.evaluate(model, sae, tokens, progress=False)


def test_evaluate_on_a_hugging_face_model_reads_its_vocabulary_and_context() -> None:
    hf = build_hf("gpt2")
    sae = random_sae(AttnSite.from_model(hf, 0))
    too_large = torch.full((2, 4), HF_VOCAB)
    with pytest.raises(ValueError, match=rf"valid ids: 0\.\.{HF_VOCAB - 1}"):
        sla.evaluate(hf, sae, too_large, progress=False)
    too_long = torch.ones(2, HF_N_CTX + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"exceed the model's {HF_N_CTX} positions"):
        sla.evaluate(hf, sae, too_long, progress=False)


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_dfa_refuses_bad_tokens(model, kind: str) -> None:
    tokens, error, message = _bad_tokens()[kind]
    sae = random_sae(AttnSite.from_model(model, 1))
    with pytest.raises(error, match=message):
        sla.analysis.dfa(model, sae, tokens, features=[0])
    with pytest.raises(error, match=message):
        sla.analysis.dfa_at_peaks(model, sae, tokens, features=[0])


def test_dfa_on_a_hugging_face_model_reads_its_vocabulary_and_context() -> None:
    hf = build_hf("gpt2")
    sae = random_sae(AttnSite.from_model(hf, 0))
    with pytest.raises(ValueError, match=rf"valid ids: 0\.\.{HF_VOCAB - 1}"):
        sla.analysis.dfa(hf, sae, torch.full((2, 4), HF_VOCAB), features=[0])
    too_long = torch.ones(2, HF_N_CTX + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"exceed the model's {HF_N_CTX} positions"):
        sla.analysis.dfa(hf, sae, too_long, features=[0])


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_measure_refuses_bad_tokens(model, kind: str) -> None:
    from sae_lens_attn.pretrained.metrics import measure

    tokens, error, message = _bad_tokens()[kind]
    with pytest.raises(error, match=message):
        measure(model, random_sae(AttnSite.from_model(model, 0)), tokens)


# --- counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "message"),
    [
        (AttnStandardTrainingSAEConfig, {"d_sae": 0}, ValueError, "d_sae must be an integer >= 1, got 0"),
        (AttnStandardTrainingSAEConfig, {"d_sae": -8}, ValueError, "d_sae must be an integer >= 1, got -8"),
        (AttnStandardTrainingSAEConfig, {"d_sae": 8.0}, TypeError, "d_sae must be an integer >= 1, got 8.0"),
        (AttnStandardTrainingSAEConfig, {"d_sae": 8, "d_in": 0}, ValueError, "d_in must be an integer >= 1, got 0"),
        (AttnTopKTrainingSAEConfig, {"d_sae": 8, "k": 0}, ValueError, "k must be an integer >= 1, got 0"),
        (AttnTopKTrainingSAEConfig, {"d_sae": 8, "k": 9}, ValueError, "k=9 exceeds d_sae=8"),
        (AttnTopKTrainingSAEConfig, {"d_sae": 8, "k": 2.5}, TypeError, "k must be an integer >= 1, got 2.5"),
        (AttnBatchTopKTrainingSAEConfig, {"d_sae": 8, "k": 8.5}, ValueError, "k=8.5 exceeds d_sae=8"),
        (AttnBatchTopKTrainingSAEConfig, {"d_sae": 8, "k": 0}, ValueError, "k must be a number > 0"),
    ],
)  # fmt: skip
def test_training_configs_refuse_bad_counts(config, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        config(**{"d_in": 32, "n_heads": 4, **kwargs})


def test_training_configs_take_numpy_counts_and_fractional_batchtopk_k() -> None:
    counts: Any = {"d_sae": np.int64(16), "k": np.int32(4)}  # typed int, NumPy at run time
    cfg = AttnTopKTrainingSAEConfig(d_in=32, n_heads=4, **counts)
    assert (type(cfg.d_sae), type(cfg.k), cfg.d_sae, cfg.k) == (int, int, 16, 4)
    assert AttnBatchTopKTrainingSAEConfig(d_in=32, n_heads=4, d_sae=16, k=2.5).k == 2.5


def test_attn_sae_training_config_refuses_k_above_d_sae(model) -> None:
    with pytest.raises(ValueError, match="k=64 exceeds d_sae=32"):
        sla.attn_sae_training_config(model, 1, "topk", d_sae=32, k=64)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"training_tokens": 0}, ValueError, "training_tokens must be an integer >= 1, got 0"),
        ({"training_tokens": -64}, ValueError, "training_tokens must be an integer >= 1, got -64"),
        ({"training_tokens": 1e6}, TypeError, "training_tokens must be an integer"),
        ({"training_tokens": 16}, ValueError, "training_tokens=16 is fewer than one batch of train_batch_size_tokens=32"),
        ({"training_tokens": 64, "layers": []}, ValueError, "needs at least one layer, got none"),
        ({"training_tokens": 64, "d_sae": 0}, ValueError, "d_sae must be an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_train_attn_saes_refuses_bad_counts(model, tmp_path, kwargs, error, message) -> None:
    options: dict[str, Any] = {"layers": [0], "d_sae": 16, "train_batch_size_tokens": 32, **kwargs}
    tokens = torch.randint(1, D_VOCAB, (8, N_CTX), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=message):
        sla.train_attn_saes(
            model, token_batches=TokenBatches(tokens, 4), out_dir=tmp_path / "out", **options
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_batch_size_tokens": 0}, "train_batch_size_tokens must be an integer >= 1, got 0"),
        ({"buffer_size_tokens": -1}, "buffer_size_tokens must be an integer >= 1, got -1"),
    ],
)
def test_store_refuses_bad_counts(model, tokens, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AttnActivationStore(model, [0], TokenBatches(tokens, 4), **kwargs)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TokenBatches(tokens, 0)


@pytest.mark.parametrize("batch_size", [0, -2])
def test_evaluate_refuses_bad_batch_size(model, tokens, batch_size: int) -> None:
    sae = random_sae(AttnSite.from_model(model, 0))
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {batch_size}"):
        sla.evaluate(model, sae, tokens, batch_size=batch_size, progress=False)
    with pytest.raises(ValueError, match="context_size must be an integer >= 2, got 1"):
        sla.evaluate(model, sae, tokens, context_size=1, progress=False)


@pytest.mark.parametrize(
    ("feature_chunk", "error", "message"),
    [
        (0, ValueError, "feature_chunk must be an integer >= 1, got 0"),
        (-4, ValueError, "feature_chunk must be an integer >= 1, got -4"),
        (2.5, TypeError, "feature_chunk must be an integer >= 1, got 2.5"),
    ],
)
def test_dfa_refuses_bad_feature_chunks(model, feature_chunk: Any, error, message) -> None:
    sae = random_sae(AttnSite.from_model(model, 1))
    tokens = torch.randint(1, D_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=message):
        sla.analysis.dfa(model, sae, tokens, features=[1, 2], feature_chunk=feature_chunk)
    with pytest.raises(error, match=message):
        sla.analysis.dfa_at_peaks(model, sae, tokens, features=[1, 2], feature_chunk=feature_chunk)


# --- integers from NumPy and tensors ------------------------------------------------------------

INTEGERS = [np.int64(1), np.int32(1), np.uint8(1), torch.tensor(1), np.array(1)]
NOT_INTEGERS = [1.0, "1", True, np.float64(1.0), torch.tensor(1.0), torch.tensor([1]), None]


@pytest.mark.parametrize(
    "layer", INTEGERS, ids=lambda v: type(v).__name__ + str(getattr(v, "dtype", ""))
)
def test_from_model_and_attn_site_accept_numpy_and_tensor_integers(model, layer) -> None:
    site = AttnSite.from_model(model, layer)
    assert site == AttnSite.from_model(model, 1) and type(site.layer) is int
    fields: list[Any] = [np.int64(4), torch.tensor(4), np.int16(8)]
    built = AttnSite(layer, *fields)
    assert built == AttnSite(1, 4, 4, 8) and hash(built) == hash(AttnSite(1, 4, 4, 8))
    assert all(type(getattr(built, f)) is int for f in ("layer", "n_heads", "n_kv_heads", "d_head"))
    assert check_layer(layer, 2) == 1 and as_integer(layer) == 1


@pytest.mark.parametrize("layer", NOT_INTEGERS, ids=repr)
def test_non_integers_are_refused_without_contradiction(model, layer) -> None:
    with pytest.raises(TypeError) as from_model:
        AttnSite.from_model(model, layer)
    with pytest.raises(TypeError) as site:
        AttnSite(layer, 4, 4, 8)
    for err in (from_model, site):
        message = str(err.value)
        assert "must be an integer" in message and type(layer).__name__ in message
        assert "out of range" not in message


def test_out_of_range_numpy_layer_names_the_number_and_the_range(model) -> None:
    with pytest.raises(
        ValueError, match=r"^layer 5 is out of range: the model has 2 layers \(valid: 0\.\.1\)$"
    ):
        AttnSite.from_model(model, np.int64(5))
    with pytest.raises(ValueError, match=r"AttnSite.n_heads must be an integer >= 1, got 0$"):
        AttnSite(0, cast(Any, np.int64(0)), 1, 8)


def test_store_takes_numpy_layers(model, tokens) -> None:
    store = AttnActivationStore(model, [cast(Any, np.int64(1))], TokenBatches(tokens, 4))
    assert store.hook_names == ["blocks.1.attn.hook_z"]


# --- corrupt files ------------------------------------------------------------------------------


@pytest.fixture
def saved_sae(tmp_path: Path) -> Path:
    folder = tmp_path / "sae"
    StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)).save_model(folder)
    return folder


def _damage(folder: Path, how: str) -> Path:
    cfg, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    if how == "cfg_truncated":
        cfg.write_text(cfg.read_text()[:30])
        return cfg
    if how == "cfg_empty":
        cfg.write_bytes(b"")
        return cfg
    if how == "cfg_not_object":
        cfg.write_text("[1, 2]")
        return cfg
    if how == "cfg_lacks_d_sae":
        cfg.write_text(
            json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "d_sae"})
        )
        return cfg
    if how == "weights_empty":
        weights.write_bytes(b"")
        return weights
    if how == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:-5])
        return weights
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("cfg_truncated", "is not valid JSON"),
        ("cfg_empty", "is not valid JSON"),
        ("cfg_not_object", "must hold a JSON object"),
        ("cfg_lacks_d_sae", "does not describe a SAELens SAE.*d_sae"),
        ("weights_empty", "cannot read the SAE weights"),
        ("weights_truncated", "cannot read the SAE weights"),
    ],
)
def test_load_sae_names_the_damaged_file(saved_sae: Path, how: str, message: str) -> None:
    load_sae(str(saved_sae))  # the undamaged folder loads, so the errors come from the damage
    damaged = _damage(saved_sae, how)
    with pytest.raises(ValueError, match=message) as err:
        load_sae(str(saved_sae))
    assert repr(str(damaged)) in str(err.value)


def test_load_sae_names_a_missing_file(saved_sae: Path) -> None:
    (saved_sae / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['sae_weights.safetensors'\]") as err:
        load_sae(str(saved_sae))
    assert str(saved_sae) in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"blocks.0": {"l0": 3', "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", r"a list must hold the rows of evaluate --out's evaluation.json"),
        ('"l0"', r"must hold a JSON object \{sae_id: \{l0, ce_loss_recovered"),
        ('{"blocks.0": 3.5}', "the entry of SAE 'blocks.0' must be an object"),
        ('{"blocks.0": {"l1": 3.5}}', r"unknown metrics \['l1'\] for SAE 'blocks.0'"),
        ('{"blocks.0": {"l0": NaN}}', "metric 'l0' of SAE 'blocks.0' must be a finite number"),
        ('{"blocks.0": {"l0": "3"}}', "must be a finite number, got '3'"),
    ],
)
def test_metrics_file_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_metrics_file(path)
    assert f"metrics file {str(path)!r}" in str(err.value)


def test_publish_cli_reports_bad_metrics_json_with_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    argv = ["publish", str(tmp_path / "sae"), "--release", "r", "--repo-id", "a/b"]
    assert cli_main([*argv, "--out", str(tmp_path / "out"), "--metrics", str(bad)]) == 1
    assert f"error: metrics file {str(bad)!r} is not valid JSON" in capsys.readouterr().err
    missing = tmp_path / "nowhere.json"
    assert cli_main([*argv, "--out", str(tmp_path / "out"), "--metrics", str(missing)]) == 1
    assert f"metrics file {str(missing)!r} does not exist" in capsys.readouterr().err
    assert read_metrics_file(_written(tmp_path, {"blocks.0": {"l0": 3}})) == {"blocks.0": {"l0": 3}}


def _written(tmp_path: Path, value: Any) -> Path:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(value))
    return path


# --- NaN in W_dec -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_non_finite_decoder_rows_are_refused_not_spread_evenly(bad_value: float) -> None:
    site = AttnSite(0, 4, 4, 8)
    sae = random_sae(site, d_sae=12)
    with torch.no_grad():
        sae.W_dec[3, 5] = bad_value
        sae.W_dec[7] = bad_value
    with pytest.raises(ValueError, match=r"W_dec rows of features \[3, 7\] \(2 of 12\) hold NaN"):
        head_attribution(sae)
    with pytest.raises(ValueError, match=r"W_dec rows of features \[3, 7\] \(2 of 12\) hold NaN"):
        head_shares(sae.W_dec, site)


def test_zero_decoder_rows_still_spread_evenly_and_finite_rows_match_the_norms() -> None:
    site = AttnSite(0, 4, 4, 8)
    sae = random_sae(site, d_sae=6)
    with torch.no_grad():
        sae.W_dec[2] = 0.0
    shares = head_attribution(sae)
    torch.testing.assert_close(shares[2], torch.full((4,), 0.25))
    row = sae.W_dec[4].detach()
    norms = torch.stack([row[h * 8 : (h + 1) * 8].norm() for h in range(4)])
    torch.testing.assert_close(shares[4], norms / norms.sum())
