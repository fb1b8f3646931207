"""Loading what command-line tools are pointed at: a model, an SAE, and text or tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_lens_attn.store import TokenBatches
from sae_lens_attn.validation import check_sae_folder


def load_model(spec: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a spec.

    ``default``: the embedded default model. ``hf:NAME_OR_DIR``: a Hugging Face causal LM (eager
    attention, for patterns). ``tl:NAME``: a TransformerLens model.
    """
    kind, _, name = spec.partition(":")
    if spec == "default":
        from sae_lens_attn.default_model import load_default_model

        return load_default_model()
    if kind == "hf" and name:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="eager").eval()
        return model, AutoTokenizer.from_pretrained(name)
    if kind == "tl" and name:
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained(name).eval()
        return model, model.tokenizer
    raise ValueError(
        f"unknown model spec {spec!r}; expected 'default', 'hf:NAME_OR_DIR' or 'tl:NAME'"
    )


def load_sae(spec: str) -> Any:
    """An SAE from a folder (SAELens format) or ``RELEASE:ID`` (SAELens's pretrained directory).

    Raises:
        FileNotFoundError: the folder lacks ``cfg.json`` or ``sae_weights.safetensors`` (named).
        ValueError: a file of the folder is corrupt, empty or truncated, or ``cfg.json`` does not
            describe a SAELens SAE (the message names the file); or ``spec`` is neither form.
    """
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME

    if Path(spec).is_dir():
        folder = check_sae_folder(spec)
        try:
            return SAE.load_from_disk(folder)
        except (KeyError, TypeError) as err:  # SAELens builds its config from cfg.json
            raise ValueError(
                f"{str(folder / SAE_CFG_FILENAME)!r} does not describe a SAELens SAE: "
                f"{type(err).__name__}: {err}"
            ) from None
    release, sep, sae_id = spec.rpartition(":")
    if not sep or not release:
        raise ValueError(f"SAE {spec!r} is neither a folder nor RELEASE:ID")
    return SAE.from_pretrained(release, sae_id)


def load_tokens(
    *, text: str | None, tokens: str | None, tokenizer: Any, context_size: int, max_prompts: int
) -> Tensor:
    """``[prompts, ctx]`` token ids from a text file (cut into BOS-led contexts) or a ``.pt`` file."""
    if (text is None) == (tokens is None):
        raise ValueError("give exactly one of a text file or a token file")
    if tokens is not None:
        loaded = torch.load(tokens, weights_only=True)
        if not isinstance(loaded, Tensor) or loaded.ndim != 2 or loaded.numel() == 0:
            raise ValueError(f"{tokens} must hold a non-empty [prompts, ctx] tensor of token ids")
        return loaded[:max_prompts].long()
    if tokenizer is None:
        raise ValueError("a text file needs the model's tokenizer, and this model has none")
    assert text is not None
    batches = TokenBatches.from_texts(
        tokenizer, [Path(text).read_text(errors="replace")], context_size=context_size, batch_size=1
    )
    return batches.tokens[:max_prompts]
