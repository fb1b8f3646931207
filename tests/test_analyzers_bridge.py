"""Every built-in analyzer on a TransformerBridge model, from one shared corpus; and the inputs an
analyzer refuses (a position on padding, an SAE of a layer the model lacks)."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "transformer_lens.model_bridge", reason="TransformerBridge needs TransformerLens >= 3"
)

from typing import Any

import torch
import transformers

import sae_lens_attn as sla
from sae_lens_attn.analysis import AnalysisInput, Corpus
from sae_lens_attn.analysis.registry import capture_needs

from .factories import random_sae
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

OPTIONS = {
    "top": 3,
    "n_samples": 4,
    "prefix_lengths": [1, 2],
    "max_corrupted": 3,
    "head_k": 2,
    "n_contexts": 4,
    "max_contexts": 20,
    "induction_seq_len": 6,
    "bos_token_id": 0,
    "prompts": "repeated",  # the causal analyzers' prompts: IOI needs a tokenizer
    "n_prompts": 4,
    "repeat_len": 6,
}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
        TransformerBridge,  # TransformerLens >= 3 only (skipped above otherwise)
    )

    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(VOCAB_SIZE).save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return TransformerBridge.boot_transformers(
        "tiny-gpt2", hf_model=build_hf("gpt2"), tokenizer=tokenizer, device="cpu"
    )


def rows() -> torch.Tensor:
    r = torch.randint(2, VOCAB_SIZE, (3, 8), generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.zeros(3, 1, dtype=torch.long), r, r], dim=1)  # [BOS, r, r]


@pytest.mark.slow
def test_every_builtin_analyzer_runs_on_a_bridge_from_one_corpus(bridge) -> None:
    sae = random_sae(sla.AttnSite.from_model(bridge, 1), value_bias_convention="included")
    upstream = random_sae(sla.AttnSite.from_model(bridge, 0), value_bias_convention="included")
    analyzers = {name: sla.analysis.get(name) for name in sla.analysis.names()}
    corpus = Corpus(bridge, rows(), keep=capture_needs(analyzers.values()))
    inputs = AnalysisInput.from_corpus(
        corpus, sae, options={**OPTIONS, "upstream_saes": [upstream]}
    )
    for name, analyzer in analyzers.items():
        tables = analyzer(inputs)
        assert tables and all(isinstance(table, list) for table in tables.values()), name
    summary = analyzers["rdfa"](inputs)["rdfa_summary"][0]
    assert summary["sum"] == pytest.approx(summary["pre_act"], abs=1e-4)
    assert corpus.reads <= 2


def test_an_analyzer_refuses_a_position_on_padding(model, tokens) -> None:
    sae = random_sae(sla.AttnSite.from_model(model, 1))
    mask = torch.ones_like(tokens[:2])
    mask[0, :4] = 0  # left padding in the first prompt
    inputs = AnalysisInput(
        model, sae, tokens[:2], attention_mask=mask, options={"prompt": 0, "position": 2}
    )
    with pytest.raises(ValueError, match="which is padding: give a real position"):
        sla.analysis.get("rdfa")(inputs)


def test_an_sae_of_a_layer_the_model_lacks_is_refused_by_name(model, tokens) -> None:
    sae = random_sae(sla.AttnSite(5, 4, 4, 8))
    inputs = AnalysisInput(model, sae, tokens[:2])
    for name in ("dfa", "feature_families", "proxy_histogram"):
        with pytest.raises(ValueError, match=r"layer 5 is out of range: the model has 2 layers"):
            sla.analysis.get(name)(inputs)
