"""IOI prompts, their corruptions and position maps, and ``logit_diff``.

The tokenizers here are real BPE tokenizers trained offline (``tokenizers``) on IOI-like text that
names only ``KNOWN`` of the default names: a GPT-2-like byte-level one (BOS known but never added,
no padding token), the same without a BOS, and a Llama-like one (metaspace words, BOS added by
the tokenizer itself, a padding token). References are independent of the code under test: the
tokens are decoded back to the words they must hold, and rows are re-tokenized from the texts.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import sae_lens_attn as sla
from sae_lens_attn.analysis import IOIPrompts, Metric, ioi_prompts, logit_diff
from sae_lens_attn.analysis import ioi as ioi_module

KNOWN = ("Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James", "Paul", "Anna")
"""The default names the test tokenizers learn as words; the others are split into pieces."""
UNKNOWN = ("Bartholomew", "Zebediah")
"""Names no test tokenizer has seen."""
FLAVOURS = ("gpt2", "gpt2-no-bos", "llama")


def _corpus(alongside: bool = True, fillers: bool = True) -> list[str]:
    """IOI-like sentences over ``KNOWN`` names with every template, place and object; with
    ``fillers``, also with the corruptions' fillers; with ``alongside``, also with " alongside" in
    place of " and"."""
    lines = []
    pairs = list(itertools.permutations(KNOWN, 2))
    for k in range(240):
        template = ioi_module.TEMPLATES[k % len(ioi_module.TEMPLATES)]
        a, b = pairs[k % len(pairs)]
        text = (
            template.replace("[A]", a)
            .replace("[B]", b)
            .replace("[S]", b)
            .replace("[PLACE]", ioi_module.PLACES[k % len(ioi_module.PLACES)])
            .replace("[OBJECT]", ioi_module.OBJECTS[k % len(ioi_module.OBJECTS)])
        )
        lines.append(text.replace("|", "") + f" {a}.")
        if fillers:
            filled = text.replace("|", ioi_module.MID_FILLER)
            lines.append(f"{ioi_module.PREFIX_FILLER} {filled} {a}.")
        if alongside:
            lines.append(text.replace("|", "").replace(" and ", " alongside ", 1))
    return lines


def _tokenizer(
    flavour: str, vocab_size: int = 3000, alongside: bool = True, fillers: bool = True
) -> Any:
    """A BPE tokenizer trained on ``_corpus(alongside, fillers)`` (module docstring)."""
    llama = flavour == "llama"
    bos = "<s>" if llama else "<|endoftext|>"
    specials = [bos, "<pad>"] if llama else [bos]
    model = models.BPE()
    backend = Tokenizer(model)
    if llama:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Punctuation()]
        )
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet: list[str] = []
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, min_frequency=1
    )
    backend.train_from_iterator(_corpus(alongside, fillers), trainer=trainer)
    if llama:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=bos, eos_token=bos, pad_token="<pad>"
        )
    if flavour == "gpt2-no-bos":
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=bos
    )


@pytest.fixture(scope="module", params=FLAVOURS)
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return _tokenizer(request.param)


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Any:
    return _tokenizer("gpt2")


@pytest.fixture(scope="module")
def clean(tokenizer: Any) -> IOIPrompts:
    return ioi_prompts(tokenizer, n=40, seed=3)


def _word(tokenizer: Any, token: Any) -> str:
    return tokenizer.decode([int(token)]).strip()


def _length(prompts: IOIPrompts, i: int) -> int:
    return int(prompts.attention_mask[i].sum())


# --- the prompts ------------------------------------------------------------------------------


def test_word_positions_hold_their_words(tokenizer: Any, clean: IOIPrompts) -> None:
    for i in range(len(clean)):
        row, idx = clean.tokens[i], {w: int(v[i]) for w, v in clean.word_idx.items()}
        assert _word(tokenizer, row[idx["IO"]]) == clean.io_names[i]
        assert _word(tokenizer, row[idx["S1"]]) == clean.s_names[i]
        assert _word(tokenizer, row[idx["S2"]]) == clean.s_names[i]
        assert _word(tokenizer, row[idx["and"]]) == "and"
        assert idx["end"] == _length(clean, i) - 1
        assert _word(tokenizer, row[idx["end"]]) == "to"
        assert _word(tokenizer, clean.io_ids[i]) == clean.io_names[i]
        assert _word(tokenizer, clean.s_ids[i]) == clean.s_names[i]
        assert clean.io_names[i] != clean.s_names[i]
        assert clean.io_names[i] in KNOWN and clean.s_names[i] in KNOWN
    assert set(clean.word_idx) == {"IO", "S1", "S2", "and", "end"}
    assert clean.corruption is None and clean.position_map is None


def test_rows_are_the_texts_tokenized_bos_first(tokenizer: Any, clean: IOIPrompts) -> None:
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, text in enumerate(clean.texts):
        own = tokenizer(text)["input_ids"]
        # No BOS, or a Llama-like tokenizer that adds it; else BOS first, as to_tokens does.
        expected = own if bos is None or own[0] == bos else [bos, *own]
        length = _length(clean, i)
        assert clean.tokens[i, :length].tolist() == expected
        assert (clean.tokens[i, length:] == (pad if pad is not None else 0)).all()
        assert (clean.attention_mask[i, length:] == 0).all()
        assert text.endswith(" to") and "|" not in text and "[" not in text
    lengths = clean.attention_mask.sum(1)
    assert lengths.max() == clean.tokens.shape[1] and lengths.min() < lengths.max()


def test_abba_and_baba_order(clean: IOIPrompts) -> None:
    assert clean.template == tuple("ABBA" if i % 2 == 0 else "BABA" for i in range(len(clean)))
    io, s1, s2, and_ = (clean.word_idx[w] for w in ("IO", "S1", "S2", "and"))
    abba = torch.tensor([t == "ABBA" for t in clean.template])
    assert ((io < s1) == abba).all()
    assert (torch.minimum(io, s1) + 1 == and_).all() and (torch.maximum(io, s1) - 1 == and_).all()
    assert (s2 > torch.maximum(io, s1)).all() and (clean.word_idx["end"] > s2).all()
    for order in ("ABBA", "BABA"):
        prompts = ioi_prompts(clean.tokenizer, n=6, templates=order)
        assert prompts.template == (order,) * 6
        first = prompts.word_idx["IO" if order == "ABBA" else "S1"]
        assert (first < prompts.word_idx["S1" if order == "ABBA" else "IO"]).all()


def test_seeded_and_deterministic(gpt2_tokenizer: Any) -> None:
    a, b = ioi_prompts(gpt2_tokenizer, n=20, seed=7), ioi_prompts(gpt2_tokenizer, n=20, seed=7)
    assert torch.equal(a.tokens, b.tokens) and a.texts == b.texts
    assert ioi_prompts(gpt2_tokenizer, n=20, seed=8).texts != a.texts
    assert len(set(a.texts)) > 10


def test_default_names_skip_multi_token_names(gpt2_tokenizer: Any) -> None:
    one_token = {
        name for name in ioi_module.NAMES if len(gpt2_tokenizer(" " + name)["input_ids"]) == 1
    }
    assert set(KNOWN) <= one_token < set(ioi_module.NAMES)  # some default names are skipped
    prompts = ioi_prompts(gpt2_tokenizer, n=200)
    assert set(prompts.io_names) | set(prompts.s_names) <= one_token


def test_given_names_must_be_one_token(gpt2_tokenizer: Any) -> None:
    prompts = ioi_prompts(gpt2_tokenizer, n=10, names=["Mary", "John"])
    assert set(prompts.io_names) | set(prompts.s_names) == {"Mary", "John"}
    with pytest.raises(ValueError, match="not one token") as error:
        ioi_prompts(gpt2_tokenizer, names=["Mary", *UNKNOWN, "John"])
    assert all(name in str(error.value) for name in UNKNOWN)
    assert "Mary" not in str(error.value).split("are not one token")[0]


def test_bad_names_are_refused(gpt2_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"\[.Mary.\] more than once"):
        ioi_prompts(gpt2_tokenizer, names=["Mary", "John", "Mary"])
    with pytest.raises(ValueError, match="at least two names"):
        ioi_prompts(gpt2_tokenizer, names=["Mary"])
    with pytest.raises(TypeError, match="sequence of strings"):
        ioi_prompts(gpt2_tokenizer, names="Mary")
    with pytest.raises(TypeError, match="non-empty strings"):
        ioi_prompts(gpt2_tokenizer, names=["Mary", 3])  # type: ignore[list-item]


def test_no_default_name_is_one_token() -> None:
    bytes_only = _tokenizer("gpt2", vocab_size=300)
    with pytest.raises(ValueError, match=r"0 of the \d+ default names \[\] are one token"):
        ioi_prompts(bytes_only)


def test_bad_arguments_list_the_choices(gpt2_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"valid: \['ABBA', 'BABA', 'mixed'\]"):
        ioi_prompts(gpt2_tokenizer, templates="AABB")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        ioi_prompts(gpt2_tokenizer, n=0)
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        ioi_prompts(object())
    with pytest.raises(TypeError, match="seed"):
        ioi_prompts(gpt2_tokenizer, seed=1.5)  # type: ignore[arg-type]
    clean = ioi_prompts(gpt2_tokenizer, n=4)
    with pytest.raises(ValueError, match="and_to_alongside.*flip_names.*shift_positions"):
        clean.corrupt("swap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already corrupted"):
        clean.corrupt("flip_names").corrupt("shift_positions")


def test_exported() -> None:
    assert sla.analysis.ioi_prompts is ioi_prompts and sla.analysis.logit_diff is logit_diff
    assert sla.analysis.IOIPrompts is IOIPrompts and sla.analysis.Metric is Metric


# --- corruptions --------------------------------------------------------------------------------


def _check_map(clean: IOIPrompts, corrupt: IOIPrompts, swapped: bool) -> None:
    """Every real clean position maps to the same word in the corrupt prompt (names swapped
    where ``swapped``; " and" may be " alongside"; an opening word may gain a leading space),
    padding maps to -1, and the words map onto the corrupt prompt's words."""
    assert corrupt.position_map is not None
    assert corrupt.position_map.shape == clean.tokens.shape
    for i in range(len(clean)):
        length = _length(clean, i)
        mapped = corrupt.position_map[i, :length]
        assert (mapped >= 0).all() and (mapped[1:] > mapped[:-1]).all()
        assert (corrupt.position_map[i, length:] == -1).all()
        assert int(mapped.max()) < _length(corrupt, i)
        tokenizer = clean.tokenizer
        swap = {clean.io_names[i]: clean.s_names[i], clean.s_names[i]: clean.io_names[i]}
        expected = [_word(tokenizer, t) for t in clean.tokens[i, :length]]
        expected = [swap.get(w, w) if swapped else w for w in expected]
        got = [_word(tokenizer, t) for t in corrupt.tokens[i, mapped]]
        differs = [p for p, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g]
        assert differs in ([], [int(clean.word_idx["and"][i])])
    for word in ("IO", "S1", "S2", "and", "end"):
        assert torch.equal(corrupt.source_positions(clean.word_idx[word]), corrupt.word_idx[word])


def test_and_to_alongside(tokenizer: Any, clean: IOIPrompts) -> None:
    corrupt = clean.corrupt("and_to_alongside")
    assert corrupt.corruption == "and_to_alongside" and corrupt.template == clean.template
    assert torch.equal(corrupt.attention_mask, clean.attention_mask)
    rows = torch.arange(len(clean))
    and_at = clean.word_idx["and"]
    assert all(_word(tokenizer, t) == "alongside" for t in corrupt.tokens[rows, and_at])
    same = torch.ones_like(clean.tokens, dtype=torch.bool)
    same[rows, and_at] = False
    assert torch.equal(corrupt.tokens[same], clean.tokens[same])
    for word in clean.word_idx:
        assert torch.equal(corrupt.word_idx[word], clean.word_idx[word])
    assert torch.equal(corrupt.io_ids, clean.io_ids) and torch.equal(corrupt.s_ids, clean.s_ids)
    identity = torch.arange(clean.tokens.shape[1]).expand_as(clean.tokens)
    assert corrupt.position_map is not None
    assert torch.equal(corrupt.position_map, torch.where(clean.attention_mask == 1, identity, -1))
    _check_map(clean, corrupt, swapped=False)


def test_flip_names(tokenizer: Any, clean: IOIPrompts) -> None:
    corrupt = clean.corrupt("flip_names")
    assert corrupt.io_names == clean.s_names and corrupt.s_names == clean.io_names
    assert torch.equal(corrupt.io_ids, clean.s_ids) and torch.equal(corrupt.s_ids, clean.io_ids)
    assert corrupt.template == clean.template
    for i in range(len(clean)):
        row = corrupt.tokens[i]
        assert _word(tokenizer, row[corrupt.word_idx["IO"][i]]) == clean.s_names[i]
        assert _word(tokenizer, row[corrupt.word_idx["S1"][i]]) == clean.io_names[i]
        assert _word(tokenizer, row[corrupt.word_idx["S2"][i]]) == clean.io_names[i]
        assert _word(tokenizer, row[corrupt.word_idx["and"][i]]) == "and"
        assert int(corrupt.word_idx["end"][i]) == _length(corrupt, i) - 1
        assert corrupt.texts[i].startswith(ioi_module.PREFIX_FILLER)
        assert ioi_module.MID_FILLER in corrupt.texts[i]
    # The fillers move S2 further than IO: before and after the first clause.
    shift_io = corrupt.word_idx["IO"] - clean.word_idx["IO"]
    shift_s2 = corrupt.word_idx["S2"] - clean.word_idx["S2"]
    assert (shift_io > 0).all() and (shift_s2 > shift_io).all()
    _check_map(clean, corrupt, swapped=True)


def test_shift_positions(tokenizer: Any, clean: IOIPrompts) -> None:
    corrupt = clean.corrupt("shift_positions")
    assert corrupt.io_names == clean.io_names and torch.equal(corrupt.s_ids, clean.s_ids)
    assert corrupt.position_map is not None
    first = 0 if tokenizer.bos_token_id is None else 1
    for i in range(len(clean)):
        length = _length(clean, i)
        moved = corrupt.position_map[i, first:length] - torch.arange(first, length)
        assert (moved > 0).all()
        assert _word(tokenizer, corrupt.tokens[i, corrupt.word_idx["S2"][i]]) == clean.s_names[i]
        prefix = ioi_module.PREFIX_FILLER + " "
        assert corrupt.texts[i].startswith(prefix)
        unfilled = corrupt.texts[i][len(prefix) :].replace(ioi_module.MID_FILLER, "", 1)
        assert unfilled == clean.texts[i]
    if tokenizer.bos_token_id is not None:
        assert (corrupt.position_map[:, 0] == 0).all()  # BOS stays BOS
    _check_map(clean, corrupt, swapped=False)


def test_an_opening_word_split_differently_has_no_counterpart() -> None:
    # Trained without the fillers, this tokenizer knows "Then" only where it opens the text, so
    # after PREFIX_FILLER " Then" is two tokens and the opening word has no aligned position.
    tokenizer = _tokenizer("gpt2", fillers=False)
    assert len(tokenizer("Then")["input_ids"]) == 1 < len(tokenizer(" Then")["input_ids"])
    clean = ioi_prompts(tokenizer, n=12)
    corrupt = clean.corrupt("shift_positions")
    assert corrupt.position_map is not None
    assert (corrupt.position_map[:, 1] == -1).all()  # the opening word, after BOS
    with pytest.raises(ValueError, match="no aligned token"):
        corrupt.source_positions(torch.ones(len(clean), dtype=torch.long))
    for word in ("IO", "S1", "S2", "and", "end"):  # the words still map
        assert torch.equal(corrupt.source_positions(clean.word_idx[word]), corrupt.word_idx[word])


def test_one_bos_when_the_tokenizer_adds_its_own() -> None:
    tokenizer = _tokenizer("llama")
    bos = tokenizer.bos_token_id
    assert tokenizer("Then")["input_ids"][0] == bos
    prompts = ioi_prompts(tokenizer, n=6)
    assert (prompts.tokens[:, 0] == bos).all() and (prompts.tokens[:, 1:] != bos).all()


def test_source_positions(clean: IOIPrompts) -> None:
    corrupt = clean.corrupt("shift_positions")
    both = torch.stack([clean.word_idx["S1"], clean.word_idx["S2"]], 1)
    expected = torch.stack([corrupt.word_idx["S1"], corrupt.word_idx["S2"]], 1)
    assert torch.equal(corrupt.source_positions(both), expected)
    assert torch.equal(corrupt.source_positions(both.tolist()), expected)
    with pytest.raises(ValueError, match="clean prompts"):
        clean.source_positions(clean.word_idx["S2"])
    padding = torch.full((len(clean),), clean.tokens.shape[1] - 1)
    with pytest.raises(ValueError, match="no aligned token"):
        corrupt.source_positions(padding)
    with pytest.raises(ValueError, match="outside"):
        corrupt.source_positions(padding + 1)
    with pytest.raises(ValueError, match=r"\[n\] or \[n, k\]"):
        corrupt.source_positions(clean.word_idx["S2"][:-1])


def test_alongside_must_be_one_token() -> None:
    tokenizer = _tokenizer("gpt2", alongside=False)
    assert len(tokenizer(" alongside")["input_ids"]) > 1
    clean = ioi_prompts(tokenizer, n=4)
    with pytest.raises(ValueError, match="' alongside' is not one token"):
        clean.corrupt("and_to_alongside")
    assert clean.corrupt("flip_names").corruption == "flip_names"


# --- logit_diff ---------------------------------------------------------------------------------


def test_logit_diff_indexes_each_prompt() -> None:
    logits = torch.randn(4, 7, 11, generator=torch.Generator().manual_seed(0))
    positions, good, bad = [6, 0, 3, 5], [1, 2, 10, 4], [9, 2, 0, 7]
    metric = logit_diff(positions, good, bad)
    expected = torch.tensor(
        [logits[i, positions[i], good[i]] - logits[i, positions[i], bad[i]] for i in range(4)]
    )
    torch.testing.assert_close(metric(logits), expected)
    assert isinstance(metric, Metric)
    assert torch.equal(logit_diff(torch.tensor(positions), good, bad)(logits), metric(logits))


def test_logit_diff_is_differentiable() -> None:
    logits = torch.randn(3, 5, 8, requires_grad=True)
    metric = logit_diff([4, 1, 2], [0, 3, 7], [5, 3, 1])
    metric(logits).sum().backward()
    assert logits.grad is not None
    expected = torch.zeros(3, 5, 8)
    expected[0, 4, 0], expected[0, 4, 5] = 1, -1
    expected[2, 2, 7], expected[2, 2, 1] = 1, -1  # prompt 1: good == bad, no gradient
    torch.testing.assert_close(logits.grad, expected)


def test_logit_diff_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"one value per prompt.*'bad_ids': 2"):
        logit_diff([1, 2, 3], [0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"positions must be one integer per prompt.*\(3, 1\)"):
        logit_diff([[1], [2], [3]], [0, 0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"shape \(\)"):
        logit_diff(3, [0], [1])
    with pytest.raises(TypeError, match="float"):
        logit_diff([1.0, 2.0], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        logit_diff([-1, 2], [0, 0], [1, 1])
    metric = logit_diff([1, 4], [0, 9], [1, 1])
    with pytest.raises(ValueError, match=r"batch=2.*\(3, 5, 10\)"):
        metric(torch.zeros(3, 5, 10))
    with pytest.raises(ValueError, match=r"positions \[4\] are out of range.*0\.\.3"):
        metric(torch.zeros(2, 4, 10))
    with pytest.raises(ValueError, match=r"good_ids \[9\] are out of range"):
        metric(torch.zeros(2, 5, 9))
    with pytest.raises(TypeError, match="floating-point"):
        metric(torch.zeros(2, 5, 10, dtype=torch.long))


def test_prompts_logit_diff(clean: IOIPrompts) -> None:
    vocab = len(clean.tokenizer)
    logits = torch.randn(len(clean), clean.tokens.shape[1], vocab)
    rows = torch.arange(len(clean))
    end = clean.word_idx["end"]
    expected = logits[rows, end, clean.io_ids] - logits[rows, end, clean.s_ids]
    torch.testing.assert_close(clean.logit_diff()(logits), expected)
