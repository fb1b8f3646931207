"""The default model's corpus: source files split into training and held-out sets, and its tokenizer.

The split is a pure function of each file's path relative to the corpus root, so the same files
are held out on every machine and for every Python version's standard library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|endoftext|>"
"""The tokenizer's only special token: BOS, EOS, padding and document separator (id 0)."""
TOKENIZER_NAME = "sae-lens-attn/stdlib-bpe"
"""``name_or_path`` of the default tokenizer (TransformerLens's ``set_tokenizer`` requires one)."""
HELD_OUT_PER_MILLE = 50
"""Files whose path hash falls below this (out of 1000) are held out: about 5% of the corpus."""
SKIPPED_DIRS = frozenset({"site-packages", "__pycache__", "dist-packages"})
"""Folders never read: installed third-party packages and bytecode caches are not the corpus."""


@dataclass(frozen=True)
class CorpusSplit:
    """Source files of a corpus, split into training and held-out files."""

    root: Path
    """The corpus folder."""
    train: tuple[Path, ...]
    """Files to train on, sorted."""
    held_out: tuple[Path, ...]
    """Files kept apart for evaluation, sorted."""


def is_held_out(relative_path: str | Path) -> bool:
    """Whether the file at ``relative_path`` (relative to the corpus root) is held out.

    Decided by the SHA-256 of the POSIX path, so it is the same on every machine.
    """
    digest = hashlib.sha256(Path(relative_path).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def split_corpus(root: str | Path, *, suffixes: Sequence[str] = (".py",)) -> CorpusSplit:
    """The files under ``root`` with one of ``suffixes``, split into training and held-out sets.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no such files, or none fall on one side of the split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {str(root)!r} is not a folder")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix in suffixes
        and p.is_file()
        and not SKIPPED_DIRS.intersection(p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no files ending in {list(suffixes)} under {str(root)!r}")
    held = tuple(p for p in files if is_held_out(p.relative_to(root)))
    train = tuple(p for p in files if not is_held_out(p.relative_to(root)))
    if not held or not train:
        raise ValueError(
            f"{len(files)} files under {str(root)!r} give {len(train)} training and {len(held)} "
            "held-out files; the corpus needs files on both sides"
        )
    return CorpusSplit(root, train, held)


def read_texts(paths: Iterable[Path]) -> list[str]:
    """The contents of ``paths`` as text (undecodable bytes replaced), empty files left out."""
    texts = (p.read_text(encoding="utf-8", errors="replace") for p in paths)
    return [t for t in texts if t.strip()]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, max_bytes: int | None = None
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts``.

    Id 0 is ``BOS_TOKEN``, then the 256 bytes, then merges. Encodings start with BOS.

    Args:
        texts: training texts.
        vocab_size: total number of tokens, at least 257 (BOS and the 256 bytes).
        max_bytes: stop reading texts after this many characters (None: all).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (BOS and 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def limited() -> Iterable[str]:
        seen = 0
        for text in texts:
            if max_bytes is not None and seen >= max_bytes:
                return
            seen += len(text)
            yield text

    backend.train_from_iterator(limited(), trainer)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    """``backend`` as a Transformers tokenizer that TransformerLens accepts offline.

    BOS is prepended to every encoding (``add_bos_token``), so ``tokenizer(text)`` and
    TransformerLens's ``to_tokens(text)`` agree, and ``name_or_path`` is set, without which
    TransformerLens's ``set_tokenizer`` fails.
    """
    bos_id = backend.token_to_id(BOS_TOKEN)
    if bos_id is None:
        raise ValueError(f"the tokenizer has no {BOS_TOKEN!r} token; it is not a default tokenizer")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        unk_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        add_bos_token=True,
        name_or_path=TOKENIZER_NAME,
    )


def save_tokenizer(tokenizer: Any, path: str | Path) -> None:
    """Write the tokenizer's ``tokenizer.json`` (the only file ``load_tokenizer`` needs)."""
    backend: Tokenizer = tokenizer.backend_tokenizer
    Path(path).write_text(json.dumps(json.loads(backend.to_str()), indent=0), encoding="utf-8")


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer saved at ``path`` by ``save_tokenizer``.

    Raises:
        ValueError: the file is not a valid tokenizer (corrupted or truncated), naming it.
    """
    path = Path(path)
    try:
        backend = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a plain Exception on bad JSON
        raise ValueError(
            f"cannot read the tokenizer file {str(path)!r} (corrupted or truncated?): {err}"
        ) from None
    return wrap_tokenizer(backend)
