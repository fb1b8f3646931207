"""Indirect-object-identification (IOI) prompts, after Wang et al. (arXiv 2211.00593), and the three
corruptions of Kissane et al.'s IOI study (arXiv 2406.17759, Figure 5), with position maps.

A prompt names two people, then has the subject (S) give something to the indirect object (IO),
and stops where the IO's name comes next: "Then, Mary and John went to the store. John gave a drink
to" → " Mary". In an ``ABBA`` prompt the IO is named first ("Mary and John ... John ... to
[Mary]"); in a ``BABA`` prompt the subject is ("John and Mary ... John ... to [Mary]"). The words
each prompt marks (``word_idx``): ``IO`` and ``S1``, the two names of the first clause; ``and``,
the " and" between them; ``S2``, the subject's second mention; ``end``, the last token (" to"),
whose next-token prediction is the IO. Names are single tokens (with their leading space, as they
stand mid-sentence); places and objects may take several tokens.

Tokens are what the model's ``to_tokens`` gives for the text: BOS first where the tokenizer has one,
then ``tokenizer(text, add_special_tokens=False)``; rows of different lengths are right-padded
(``pad_token_id``, else ``eos_token_id``, else 0) and ``attention_mask`` marks the real tokens.

Corruptions (``IOIPrompts.corrupt``), each made from the same draws of template, names, place and
object as the clean prompt it corrupts:

- ``and_to_alongside``: " and" becomes " alongside" (which must be one token); every position stays.
- ``shift_positions``: ``PREFIX_FILLER`` before the prompt (after BOS) and ``MID_FILLER`` at the end
  of the first clause ("... went to the store while the weather was nice. John gave ..."), so every
  position after BOS moves, by different amounts before and after the first clause; same names.
- ``flip_names``: as ``shift_positions``, and IO and S trade names ("It was a nice day. Then, John
  and Mary went to the store while the weather was nice. Mary gave a drink to"). Kissane et al.'s
  Figure 5 draws two fresh names instead; swapping them keeps the names of each prompt.

A corrupted ``IOIPrompts`` describes its own prompts: ``word_idx`` holds its own positions of each
word (aligned by role with the clean prompts' ``word_idx``; after ``flip_names`` the roles keep their
slots, so ``io_ids`` and ``s_ids`` trade places), and ``position_map[i, p]`` is the position in
corrupted prompt ``i`` of the token aligned with clean position ``p``. Noising at S2 reads::

    clean = ioi_prompts(tokenizer)
    corrupt = clean.corrupt("flip_names")
    on_corrupt = logit_diff(corrupt.word_idx["end"], clean.io_ids, clean.s_ids)
    activation_patching(model, clean.tokens, corrupt.tokens, (clean.logit_diff(), on_corrupt),
                        layers=[5, 6], positions=clean.word_idx["S2"],
                        source_positions=corrupt.word_idx["S2"],
                        clean_attention_mask=clean.attention_mask,
                        corrupt_attention_mask=corrupt.attention_mask)

and any other clean positions map through ``corrupt.source_positions(positions)``. The metric
``clean.logit_diff()`` reads the clean prompts' ``end``; a corrupted run is scored at its own ``end``:
``corrupt.logit_diff()`` (its own answer, the clean one swapped after ``flip_names``), or
``logit_diff(corrupt.word_idx["end"], clean.io_ids, clean.s_ids)`` for the clean answer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch
from jaxtyping import Int
from torch import Tensor

from sae_lens_attn.analysis.metrics import Metric, logit_diff
from sae_lens_attn.site import as_integer
from sae_lens_attn.validation import check_count

Template = Literal["ABBA", "BABA"]
"""The order of the first clause: ``ABBA`` names the IO first, ``BABA`` the subject."""
TemplateChoice = Literal["ABBA", "BABA", "mixed"]
"""``templates`` of ``ioi_prompts``; ``mixed`` alternates ``ABBA`` and ``BABA``."""
TEMPLATE_CHOICES: tuple[str, ...] = get_args(TemplateChoice)
Corruption = Literal["and_to_alongside", "flip_names", "shift_positions"]
"""The corruptions ``IOIPrompts.corrupt`` makes (module docstring)."""
CORRUPTIONS: tuple[str, ...] = get_args(Corruption)
WORDS: tuple[str, ...] = ("IO", "S1", "S2", "and", "end")
"""The keys of ``IOIPrompts.word_idx``."""

TEMPLATES: tuple[str, ...] = (
    "Then, [A] and [B] went to the [PLACE]|. [S] gave a [OBJECT] to",
    "Then, [A] and [B] had a lot of fun at the [PLACE]|. [S] gave a [OBJECT] to",
    "Then, [A] and [B] were working at the [PLACE]|. [S] decided to give a [OBJECT] to",
    "Then, [A] and [B] were thinking about going to the [PLACE]|. [S] wanted to give a [OBJECT] to",
    "Then, [A] and [B] had a long argument|, and afterwards [S] said to",
    "Then, [A] and [B] had a long argument|. Afterwards [S] said to",
    "After [A] and [B] went to the [PLACE]|, [S] gave a [OBJECT] to",
    "After the lunch, [A] and [B] went to the [PLACE]|. [S] gave a [OBJECT] to",
    "When [A] and [B] got a [OBJECT] at the [PLACE]|, [S] decided to give it to",
    "When [A] and [B] got a [OBJECT] at the [PLACE]|, [S] decided to give the [OBJECT] to",
    "While [A] and [B] were working at the [PLACE]|, [S] gave a [OBJECT] to",
    "While [A] and [B] were commuting to the [PLACE]|, [S] gave a [OBJECT] to",
)
"""Wang et al.'s IOI templates, ending before the IO's name. ``[A] and [B]`` is the first clause's
pair (``ABBA``: A is the IO; ``BABA``: A is the subject), ``[S]`` the subject's second mention, and
``|`` where ``MID_FILLER`` goes in the ``shift_positions`` and ``flip_names`` corruptions."""

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Michael", "Sarah", "David", "Emma", "James", "Laura",
    "Robert", "Linda", "William", "Susan", "Richard", "Karen", "Thomas", "Lisa", "Daniel", "Nancy",
    "Paul", "Anna", "Mark", "Jessica", "George", "Helen", "Steven", "Amy", "Kevin", "Rachel",
    "Brian", "Kate", "Jason", "Julia", "Eric", "Grace", "Peter", "Rose", "Adam", "Emily",
    "Andrew", "Sophie", "Ryan", "Hannah", "Jacob", "Claire", "Nathan", "Victoria", "Frank", "Diana",
    "Scott", "Maria", "Jack", "Jane", "Henry", "Lucy", "Samuel", "Amanda", "Patrick", "Kelly",
    "Tom", "Ruth", "Joe", "Ellen", "Carl", "Beth", "Luke", "Megan", "Max", "Alex",
    "Simon", "Sara", "Ben", "Tim", "Sam", "Dan", "Matt", "Chris", "Mike", "Jim",
)  # fmt: skip
"""Common first names; ``ioi_prompts`` uses those that are one token of its tokenizer."""
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
    "park", "library", "market", "beach",
)  # fmt: skip
"""Places of the templates' ``[PLACE]``."""
OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book",
    "letter", "cake", "ticket",
)  # fmt: skip
"""Objects of the templates' ``[OBJECT]`` (after "a": each starts with a consonant)."""

AND, ALONGSIDE = " and", " alongside"
"""The word between the two names, and what ``and_to_alongside`` puts in its place."""
PREFIX_FILLER = "It was a nice day."
"""Text before the prompt (after BOS) in ``shift_positions`` and ``flip_names``."""
MID_FILLER = " while the weather was nice"
"""Text at the end of the first clause (a template's ``|``) in ``shift_positions`` and
``flip_names``."""

_SLOT = re.compile(r" \[(A|B|S)\]| and(?= \[B\])|\|")
_PROBE = "Then,"  # a word is one token if it is one after _PROBE, as names are in the prompts


class _Draw(NamedTuple):
    """What one prompt is made of; its corruptions reuse it."""

    template: int
    order: Template
    io: str
    s: str
    place: str
    obj: str


class _Segment(NamedTuple):
    """A piece of a prompt's text."""

    text: str
    role: str | None
    """``"IO"``, ``"S1"``, ``"S2"`` or ``"and"`` for a one-token word, else ``None``."""
    key: int | None
    """The template piece it renders (a prompt and its corruptions align on it); ``None`` for a
    filler."""


class _Rendered(NamedTuple):
    """One prompt tokenized."""

    ids: list[int]
    spans: dict[int, tuple[int, int]]
    """Segment key -> ``[start, stop)`` in ``ids`` (BOS included, keyed ``_BOS_KEY``)."""
    words: dict[str, int]
    """Word of ``WORDS`` -> its position in ``ids``."""
    text: str


@dataclass(frozen=True, eq=False)
class IOIPrompts:
    """IOI prompts, clean or corrupted, tokenized and right-padded (module docstring)."""

    tokens: Int[Tensor, "n seq"]
    """Token ids, BOS first where the tokenizer has a BOS, right-padded."""
    attention_mask: Int[Tensor, "n seq"]
    """1 at real tokens, 0 at padding."""
    word_idx: Mapping[str, Int[Tensor, " n"]]
    """Per word of ``WORDS`` (``"IO"``, ``"S1"``, ``"S2"``, ``"and"``, ``"end"``), its position in
    each prompt. ``end`` is the last real token, whose next token should be the IO. In corrupted
    prompts ``and`` is the slot of " and", which holds " alongside" after ``and_to_alongside``."""
    io_ids: Int[Tensor, " n"]
    """The IO's name (the right answer) as a token id, per prompt."""
    s_ids: Int[Tensor, " n"]
    """The subject's name (the wrong answer) as a token id, per prompt."""
    template: tuple[Template, ...]
    """``"ABBA"`` or ``"BABA"`` per prompt (a corruption keeps its prompt's)."""
    texts: tuple[str, ...]
    """Each prompt as text, without BOS."""
    io_names: tuple[str, ...]
    """The IO's name per prompt."""
    s_names: tuple[str, ...]
    """The subject's name per prompt."""
    corruption: Corruption | None
    """``None`` for clean prompts, else the corruption that made these from them."""
    position_map: Int[Tensor, "n clean_seq"] | None
    """For corrupted prompts, ``position_map[i, p]``: the position in prompt ``i`` of the token
    aligned with position ``p`` of clean prompt ``i``; -1 where none is (clean padding, or an opening
    word the tokenizer splits differently after ``PREFIX_FILLER``). ``None`` for clean prompts."""
    tokenizer: Any = field(repr=False)
    """The tokenizer the prompts were made with."""
    _draws: tuple[_Draw, ...] = field(repr=False)
    """Template, names, place and object of each prompt, for ``corrupt``."""

    def __len__(self) -> int:
        return len(self.texts)

    def logit_diff(self) -> Metric:
        """The IOI metric of these prompts: ``logit(IO) - logit(S)`` at ``end``, per prompt."""
        return logit_diff(self.word_idx["end"], self.io_ids, self.s_ids)

    def corrupt(self, kind: Corruption) -> IOIPrompts:
        """These prompts corrupted by ``kind`` (module docstring), with their ``position_map``.

        Raises:
            ValueError: an unknown ``kind`` (the valid ones are listed), prompts that are already
                corrupted, or " alongside" is not one token of the tokenizer.
        """
        if kind not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {kind!r}; valid kinds: {list(CORRUPTIONS)}")
        if self.corruption is not None:
            raise ValueError(
                f"these prompts are already corrupted ({self.corruption!r}); call corrupt() on "
                "the clean prompts"
            )
        clean, _ = _render_all(self.tokenizer, self._draws, None)
        rendered, word_ids = _render_all(self.tokenizer, self._draws, kind)
        position_map = torch.full(tuple(self.tokens.shape), -1, dtype=torch.long)
        for i, (before, after) in enumerate(zip(clean, rendered, strict=True)):
            for key, (start, stop) in before.spans.items():
                to_start, to_stop = after.spans[key]
                if to_stop - to_start == stop - start:  # else no token-for-token counterpart
                    position_map[i, start:stop] = torch.arange(to_start, to_stop)
        return _assemble(self.tokenizer, self._draws, kind, rendered, word_ids, position_map)

    def source_positions(self, positions: Any) -> Int[Tensor, "n ..."]:
        """The positions in these corrupted prompts aligned with clean ``positions``.

        Args:
            positions: per clean prompt, one position (``[n]``) or several (``[n, k]``).

        Returns:
            ``position_map`` read at ``positions``, in their shape: the ``source_positions`` of
            activation patching when the clean run receives (noising). For S2 it equals
            ``word_idx["S2"]`` of these prompts.

        Raises:
            ValueError: these are clean prompts, ``positions`` is not ``[n]`` or ``[n, k]`` within
                the clean width, or a position has no aligned token (listed).
        """
        if self.position_map is None:
            raise ValueError(
                "these are clean prompts: source_positions maps clean positions into corrupted "
                "ones, so call it on prompts.corrupt(kind)"
            )
        n, width = self.position_map.shape
        query = torch.as_tensor(positions)
        if query.dtype.is_floating_point or query.dtype == torch.bool:
            raise TypeError(f"positions must be integers, got dtype {query.dtype}")
        if query.ndim not in (1, 2) or query.shape[0] != n:
            raise ValueError(
                f"positions must be [n] or [n, k] with n={n} prompts, got shape {tuple(query.shape)}"
            )
        query = query.long()
        outside = query[(query < 0) | (query >= width)]
        if outside.numel():
            raise ValueError(
                f"positions {outside.tolist()[:10]} are outside the clean prompts' {width} "
                f"positions (valid: 0..{width - 1})"
            )
        rows = query if query.ndim == 2 else query[:, None]
        mapped = self.position_map.gather(1, rows)
        missing = (mapped < 0).nonzero().tolist()
        if missing:
            pairs = [(i, int(rows[i, j])) for i, j in missing[:10]]
            raise ValueError(
                f"(prompt, clean position) pairs {pairs} have no aligned token in the "
                f"{self.corruption} prompts (padding, or an opening word tokenized differently)"
            )
        return mapped if query.ndim == 2 else mapped[:, 0]


def ioi_prompts(
    tokenizer: Any,
    n: int = 100,
    templates: TemplateChoice = "mixed",
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> IOIPrompts:
    """``n`` IOI prompts from Wang et al.'s templates (module docstring), seeded and deterministic.

    Each prompt draws a template of ``TEMPLATES``, two different names (IO and S), a place of
    ``PLACES`` and an object of ``OBJECTS`` from ``random.Random(seed)``.

    Args:
        tokenizer: a Hugging Face tokenizer (the model's).
        n: the number of prompts.
        templates: ``"ABBA"``, ``"BABA"``, or ``"mixed"``: ``ABBA`` and ``BABA`` alternately,
            ``ABBA`` first (half each).
        names: the names to draw from, each one token of ``tokenizer`` (with its leading space);
            by default those of ``NAMES`` that are (the others are skipped).
        seed: the seed of the draws.

    Raises:
        TypeError: ``tokenizer`` is not a tokenizer, ``names`` not a sequence of strings, or
            ``n``/``seed`` not integers.
        ValueError: ``n`` below 1; an unknown ``templates`` (the valid ones are listed); given
            ``names`` that are not one token (listed), repeated (listed) or fewer than two
            different; fewer than two default names that are one token; " and" is not one token;
            or the tokenizer splits a prompt at a word boundary differently from its parts.

    Examples:
        >>> prompts = ioi_prompts(model.tokenizer, n=8)
        >>> prompts.texts[0]  # e.g. 'Then, Mary and John went to the store. John gave a drink to'
        >>> prompts.logit_diff()(model(prompts.tokens))  # logit(IO) - logit(S) per prompt
        >>> corrupt = prompts.corrupt("and_to_alongside")
    """
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(
            "tokenizer must be a Hugging Face tokenizer (e.g. model.tokenizer), got "
            f"{type(tokenizer).__name__}"
        )
    n = check_count("n", n)
    if templates not in TEMPLATE_CHOICES:
        raise ValueError(f"unknown templates {templates!r}; valid: {list(TEMPLATE_CHOICES)}")
    chosen_seed = as_integer(seed)
    if chosen_seed is None:
        raise TypeError(f"seed must be an integer, got {seed!r}")
    pool = _names(tokenizer, names)
    rng = random.Random(chosen_seed)
    draws = []
    for i in range(n):
        order: Template = (
            "ABBA" if templates == "ABBA" or (templates == "mixed" and i % 2 == 0) else "BABA"
        )
        template = rng.randrange(len(TEMPLATES))
        io, s = rng.sample(pool, 2)
        draws.append(_Draw(template, order, io, s, rng.choice(PLACES), rng.choice(OBJECTS)))
    rendered, word_ids = _render_all(tokenizer, draws, None)
    return _assemble(tokenizer, tuple(draws), None, rendered, word_ids, None)


def _names(tokenizer: Any, names: Sequence[str] | None) -> list[str]:
    """The names to draw from: ``names`` checked, else the one-token names of ``NAMES``."""
    if names is None:
        pool = [name for name in NAMES if _word_token(tokenizer, " " + name) is not None]
        if len(pool) < 2:
            raise ValueError(
                f"{len(pool)} of the {len(NAMES)} default names {pool} are one token of this "
                "tokenizer (with a leading space, as mid-sentence) and IOI prompts need two; "
                "pass names= that are"
            )
        return pool
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a sequence of strings, got {type(names).__name__}")
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"names must be non-empty strings, got {list(names)!r}")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"names must be different, got {repeated} more than once")
    if len(names) < 2:
        raise ValueError(f"IOI prompts need at least two names, got {list(names)}")
    split = [name for name in names if _word_token(tokenizer, " " + name) is None]
    if split:
        raise ValueError(
            f"names {split} are not one token of this tokenizer (with a leading space, as they "
            f"stand mid-sentence: {', '.join(_pieces(tokenizer, ' ' + name) for name in split[:5])}"
            "); give names that are"
        )
    return list(names)


def _template_pieces(template: str) -> tuple[tuple[str, str], ...]:
    """``template`` as pieces: ``("text", text)``, or ``(slot, "")`` for a slot ``"A"``, ``"B"``,
    ``"S"``, ``"and"`` or ``"|"``."""
    pieces, last = [], 0
    for match in _SLOT.finditer(template):
        if match.start() > last:
            pieces.append(("text", template[last : match.start()]))
        pieces.append((match.group(1) or match.group(0).strip(), ""))
        last = match.end()
    if last < len(template):
        pieces.append(("text", template[last:]))
    return tuple(pieces)


_TEMPLATE_PIECES = tuple(_template_pieces(template) for template in TEMPLATES)
_BOS_KEY = -1


def _segments(draw: _Draw, kind: Corruption | None) -> list[_Segment]:
    """One prompt's text as segments: template text, one-token words with their role, fillers.

    Segments rendering the same template piece have the same key in a prompt and its corruptions.
    """
    io, s = (draw.s, draw.io) if kind == "flip_names" else (draw.io, draw.s)
    first, second = (("IO", io), ("S1", s)) if draw.order == "ABBA" else (("S1", s), ("IO", io))
    slots = {"A": first, "B": second, "S": ("S2", s)}
    fill = kind in ("flip_names", "shift_positions")
    segments = [_Segment(PREFIX_FILLER, None, None)] if fill else []
    for key, (piece, text) in enumerate(_TEMPLATE_PIECES[draw.template]):
        if piece == "text":
            text = text.replace("[PLACE]", draw.place).replace("[OBJECT]", draw.obj)
            opening = fill and key == 0  # the first word now follows PREFIX_FILLER
            segments.append(_Segment(" " + text if opening else text, None, key))
        elif piece == "|":
            if fill:
                segments.append(_Segment(MID_FILLER, None, None))
        elif piece == "and":
            segments.append(_Segment(ALONGSIDE if kind == "and_to_alongside" else AND, "and", key))
        else:
            role, name = slots[piece]
            segments.append(_Segment(" " + name, role, key))
    return segments


def _encode(
    tokenizer: Any, segments: Sequence[_Segment]
) -> tuple[list[int], dict[int, tuple[int, int]], str]:
    """The joined ``segments`` tokenized (no BOS), each keyed segment's ``[start, stop)`` in them,
    and the text.

    Raises:
        ValueError: the tokens of a leading part of the text are not a prefix of the whole text's
            (the tokenizer merges across a word boundary), so the words have no positions.
    """
    prefixes = ["".join(seg.text for seg in segments[: k + 1]) for k in range(len(segments))]
    encoded = tokenizer(prefixes, add_special_tokens=False)["input_ids"]
    ids = list(encoded[-1])
    spans, start = {}, 0
    for segment, prefix, part in zip(segments, prefixes, encoded, strict=True):
        if list(part) != ids[: len(part)]:
            raise ValueError(
                f"the tokenizer splits {prefixes[-1]!r} differently from its beginning "
                f"{prefix!r}, so the prompt's words have no positions of their own"
            )
        if segment.key is not None:
            spans[segment.key] = (start, len(part))
        start = len(part)
    return ids, spans, prefixes[-1]


def _word_token(tokenizer: Any, word: str) -> int | None:
    """The id of ``word`` (leading space included) where it stands after ``_PROBE``, if it is one
    token there, else ``None``."""
    try:
        ids, spans, _ = _encode(tokenizer, [_Segment(_PROBE, None, 0), _Segment(word, "word", 1)])
    except ValueError:
        return None
    start, stop = spans[1]
    return ids[start] if stop - start == 1 else None


def _pieces(tokenizer: Any, word: str) -> str:
    """``word`` and its tokens, for messages."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return f"{word!r} -> {[tokenizer.decode([i]) for i in ids]}"


def _render_all(
    tokenizer: Any, draws: Sequence[_Draw], kind: Corruption | None
) -> tuple[list[_Rendered], dict[str, int]]:
    """Every prompt of ``draws`` rendered, and the ids of their one-token words.

    Raises:
        ValueError: a word that must be one token is not (" and", " alongside", a name), or the
            tokenizer merges one with its neighbours inside a prompt.
    """
    words = {ALONGSIDE if kind == "and_to_alongside" else AND}
    words |= {" " + name for draw in draws for name in (draw.io, draw.s)}
    word_ids = {}
    for word in sorted(words):
        token = _word_token(tokenizer, word)
        if token is None:
            raise ValueError(
                f"{word!r} is not one token of this tokenizer ({_pieces(tokenizer, word)}); "
                "IOI prompts need it at one position"
            )
        word_ids[word] = token
    return [_render(tokenizer, draw, kind, word_ids) for draw in draws], word_ids


def _render(
    tokenizer: Any, draw: _Draw, kind: Corruption | None, word_ids: Mapping[str, int]
) -> _Rendered:
    """One prompt's tokens (BOS first where the tokenizer has one), spans and word positions."""
    segments = _segments(draw, kind)
    ids, spans, text = _encode(tokenizer, segments)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [int(bos), *ids]
        spans = {key: (start + 1, stop + 1) for key, (start, stop) in spans.items()}
        spans[_BOS_KEY] = (0, 1)
    words = {}
    for segment in segments:
        if segment.role is None or segment.key is None:
            continue
        start, stop = spans[segment.key]
        if stop - start != 1 or ids[start] != word_ids[segment.text]:
            raise ValueError(
                f"{segment.text!r} is one token on its own but not inside the prompt {text!r} "
                f"(there: {[tokenizer.decode([i]) for i in ids[start:stop]]}); this tokenizer "
                "merges it with its neighbours"
            )
        words[segment.role] = start
    words["end"] = len(ids) - 1
    return _Rendered(ids, spans, words, text)


def _assemble(
    tokenizer: Any,
    draws: tuple[_Draw, ...],
    kind: Corruption | None,
    rendered: Sequence[_Rendered],
    word_ids: Mapping[str, int],
    position_map: Tensor | None,
) -> IOIPrompts:
    """The rendered prompts right-padded and collected."""
    width = max(len(r.ids) for r in rendered)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = eos if eos is not None else 0
    tokens = torch.full((len(draws), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(draws), width), dtype=torch.long)
    for i, r in enumerate(rendered):
        tokens[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
    flip = kind == "flip_names"
    io_names = tuple(d.s if flip else d.io for d in draws)
    s_names = tuple(d.io if flip else d.s for d in draws)
    return IOIPrompts(
        tokens=tokens,
        attention_mask=mask,
        word_idx={word: torch.tensor([r.words[word] for r in rendered]) for word in WORDS},
        io_ids=torch.tensor([word_ids[" " + name] for name in io_names]),
        s_ids=torch.tensor([word_ids[" " + name] for name in s_names]),
        template=tuple(d.order for d in draws),
        texts=tuple(r.text for r in rendered),
        io_names=io_names,
        s_names=s_names,
        corruption=kind,
        position_map=position_map,
        tokenizer=tokenizer,
        _draws=draws,
    )
