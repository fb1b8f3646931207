"""One data flow per command: ``analyze`` and ``dashboard`` read their corpus through the model
once (twice at most with every analyzer), counted as rows of the corpus that reach
``HookedTransformer.forward``, in the style of the store's pass count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

import sae_lens_attn as sla
from sae_lens_attn.analysis import Corpus, dfa_at_peaks
from sae_lens_attn.cli.main import main
from sae_lens_attn.corpus import corpus_of

SAE = "stdlib-2l-attn-z:blocks.1"
EVERY_ANALYZER = (
    "head_attribution,dfa,induction_scores,induction_features,feature_logits,feature_families,"
    "polysemanticity,proxy_histogram,prefix_induction,rdfa"
)
SMALL = ["n_samples=4", "prefix_lengths=[1,2]", "max_corrupted=3", "head_k=2", "max_contexts=20"]


class CorpusReads:
    """Counts rows of a token file that reach ``HookedTransformer.forward``, whole or cut short
    (a causal model reads a prefix of a row to see one position); random-token probes such as
    the induction scores are other rows and are not counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: set[tuple[int, ...]] = set()
        self.seen = 0
        forward = HookedTransformer.forward

        def counting(model: HookedTransformer, tokens: object, *args: object, **kwargs: object):
            if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
                self.seen += sum(tuple(row) in self.rows for row in tokens.tolist())
            return forward(model, tokens, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(HookedTransformer, "forward", counting)

    def corpus(self, tokens: torch.Tensor) -> None:
        self.rows = {tuple(row[:end]) for row in tokens.tolist() for end in range(1, len(row) + 1)}
        self.n_rows = tokens.shape[0]

    @property
    def reads(self) -> float:
        return self.seen / self.n_rows


@pytest.fixture
def corpus_tokens(tmp_path: Path) -> Iterator[Path]:
    """16 BOS-led rows of 32 tokens from the embedded model's own corpus, as a .pt file."""
    _, tokenizer = sla.load_default_model()
    text = "\n".join(
        f"def f{i}(x):\n    return x * {i} + f{i - 1}(x) if x else {i}" for i in range(60)
    )
    ids: list[int] = tokenizer.encode(text)
    rows = torch.tensor([[tokenizer.bos_token_id, *ids[31 * i : 31 * i + 31]] for i in range(16)])
    path = tmp_path / "tokens.pt"
    torch.save(rows, path)
    yield path


def _run(command: list[str], reads: CorpusReads, tokens_file: Path) -> float:
    reads.corpus(torch.load(tokens_file))
    assert main(command) == 0
    return reads.reads


def test_analyze_with_the_default_analyzers_reads_the_corpus_once(
    tmp_path, monkeypatch, corpus_tokens
) -> None:
    reads = CorpusReads(monkeypatch)
    command = ["analyze", "--sae", SAE, "--tokens", str(corpus_tokens), "--out"]
    assert _run([*command, str(tmp_path / "a")], reads, corpus_tokens) == 1
    reads.seen = 0
    assert _run([*command, str(tmp_path / "b"), "--features", "3,7"], reads, corpus_tokens) == 1


@pytest.mark.slow
def test_analyze_with_every_builtin_analyzer_reads_the_corpus_at_most_twice(
    tmp_path, monkeypatch, corpus_tokens
) -> None:
    reads = CorpusReads(monkeypatch)
    options = [arg for option in SMALL for arg in ("--option", option)]
    command = ["analyze", "--sae", SAE, "--tokens", str(corpus_tokens), "--analyzers"]
    command += [EVERY_ANALYZER, *options, "--out", str(tmp_path / "a")]
    assert _run(command, reads, corpus_tokens) <= 2


def test_dashboard_reads_the_corpus_at_most_twice(tmp_path, monkeypatch, corpus_tokens) -> None:
    """Our own pages; SAEDashboard's engine (where installed) reads the tokens once more itself."""
    reads = CorpusReads(monkeypatch)
    command = ["dashboard", "--sae", SAE, "--tokens", str(corpus_tokens), "--top", "8"]
    command += ["--engine", "own"]
    assert _run([*command, "--out", str(tmp_path / "board")], reads, corpus_tokens) <= 2


def test_one_corpus_captures_once_and_encodes_once(model, tokens) -> None:
    from .factories import random_sae

    sae = random_sae(sla.AttnSite.from_model(model, 1))
    corpus = Corpus(model, tokens, keep={"pattern", "values"})
    encodes: list[int] = []
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda *_: encodes.append(1))
    try:
        top = corpus.top_features(sae, 4)
        first = dfa_at_peaks(model, sae, corpus, features=top)
        again = dfa_at_peaks(model, sae, corpus, features=top)
        sla.analysis.feature_families(model, sae, corpus, top, n_contexts=4)
    finally:
        handle.remove()
    assert corpus.reads == 1
    n_blocks = len(encodes)
    assert n_blocks >= 1 and corpus.encode(sae) is corpus.encode(sae)
    assert len(encodes) == n_blocks  # asking again encodes nothing
    torch.testing.assert_close(first.by_src, again.by_src, equal_nan=True)
    # the corpus's encode is the SAE's own: SAELens's hook_sae_acts_pre on an independent z
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"]  # [b, pos, h, d]
    _, sae_cache = sae.run_with_cache(z if sae.hook_z_reshaping_mode else z.flatten(-2))
    torch.testing.assert_close(corpus.pre_activations(sae), sae_cache["hook_sae_acts_pre"])


def test_a_corpus_refuses_another_model_and_a_second_mask(model, gqa_model, tokens) -> None:
    corpus = Corpus(model, tokens)
    with pytest.raises(ValueError, match="made for another model"):
        corpus_of(gqa_model, corpus)
    with pytest.raises(ValueError, match="carries its own"):
        corpus_of(model, corpus, torch.ones_like(tokens))
    with pytest.raises(ValueError, match=r"unknown capture extras \['scores'\]"):
        Corpus(model, tokens, keep={"scores"})  # type: ignore[arg-type]


def test_sae_activations_are_the_saes_own_on_any_batching(model, tokens) -> None:
    from .factories import random_sae

    sae = random_sae(sla.AttnSite.from_model(model, 0))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    acts, pre = sla.analysis.sae_activations(model, sae, tokens, mask, pre=True, batch_size=3)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"]
    _, sae_cache = sae.run_with_cache(z if sae.hook_z_reshaping_mode else z.flatten(-2))
    assert pre is not None and acts.shape == pre.shape == (*tokens.shape, sae.cfg.d_sae)
    torch.testing.assert_close(pre[1:], sae_cache["hook_sae_acts_pre"][1:])  # unpadded rows
    torch.testing.assert_close(acts[1:], sae_cache["hook_sae_acts_post"][1:])
