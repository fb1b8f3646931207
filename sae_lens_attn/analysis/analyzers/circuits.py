"""Analyzers of circuits: prefix-length induction and recursive DFA.

Options (``AnalysisInput.options``; on the command line ``--option KEY=VALUE``):

- ``prefix_induction``: ``layers`` (default: all), ``prefix_lengths`` (default 1..9),
  ``n_samples`` (default 200), ``seq_len``, ``seed``, ``bos_token_id``, and for the events on the
  given tokens ``threshold`` (0.3), ``match`` (``"exact"`` or ``"fuzzy"``), ``max_corrupted``
  (100) and ``max_length`` (the last bucket of the counts, 8).
- ``rdfa``: ``feature`` (default: the first of ``features``, else the most active), ``prompt``
  and ``position`` (default: where that feature peaks at a real position; a position on padding
  is refused), ``upstream_saes`` (the SAEs of earlier
  layers; without them their attention outputs are error terms), ``expand`` (3), ``depth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_lens_attn.analysis.analyzers import NEEDS_DFA, chosen_features, shown_token
from sae_lens_attn.analysis.long_prefix import prefix_events, prefix_induction
from sae_lens_attn.analysis.recursive_dfa import rdfa
from sae_lens_attn.analysis.registry import AnalysisInput, Table
from sae_lens_attn.corpus import CaptureExtra
from sae_lens_attn.validation import check_features, check_positions


@dataclass(frozen=True)
class _PrefixInduction:
    description: str = (
        "attention against prefix length per head on repeated random tokens (Kissane et al.), "
        "prefix lengths of induction events in the text, and the corruption test"
    )
    needs: frozenset[CaptureExtra] = frozenset({"pattern", "every_layer"})

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        options = inputs.options
        layers = options.get("layers")
        scores = prefix_induction(
            inputs.model,
            layers=layers,
            prefix_lengths=options.get("prefix_lengths", range(1, 10)),
            n_samples=options.get("n_samples", 200),
            seq_len=options.get("seq_len"),
            seed=options.get("seed", 0),
            bos_token_id=options.get("bos_token_id"),
        )
        events = prefix_events(
            inputs.model,
            inputs.corpus,
            layers=layers,
            threshold=options.get("threshold", 0.3),
            match=options.get("match", "exact"),
            max_corrupted=options.get("max_corrupted", 100),
            seed=options.get("seed", 0),
            tokenizer=inputs.tokenizer,
        )
        max_length = int(options.get("max_length", 8))
        counts: Table = []
        corruption: Table = []
        for layer in scores.layers:
            for head in range(scores.scores.shape[1]):
                for length, n in enumerate(events.prefix_counts(layer, head, max_length)):
                    counts.append(
                        {"layer": layer, "head": head, "prefix_length": length, "events": n}
                    )
                n, clean, corrupted = events.corruption(layer, head)
                corruption.append(
                    {"layer": layer, "head": head, "n": n, "clean": clean, "corrupted": corrupted}
                )
        return {
            "prefix_scores": scores.rows(),
            "prefix_events": counts,
            "prefix_corruption": corruption,
        }


@dataclass(frozen=True)
class _RDFA:
    description: str = (
        "recursive DFA of one feature at one position: every upstream part of the residual "
        "stream (SAE features, errors, embeddings, biases, MLPs), recursing into features"
    )
    needs: frozenset[CaptureExtra] = NEEDS_DFA

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        options = inputs.options
        feature = _feature(inputs)
        prompt, position = _query(inputs, feature)
        saes = [inputs.sae, *options.get("upstream_saes", [])]
        result = rdfa(
            inputs.model,
            saes,
            inputs.tokens,
            layer=inputs.corpus.site_of(inputs.sae)[0].layer,
            feature=feature,
            position=position,
            prompt=prompt,
            expand=options.get("expand", 3),
            depth=options.get("depth"),
        )
        token = shown_token(inputs, result.prompt, result.position)
        summary = {
            "layer": result.layer,
            "feature": result.feature,
            "prompt": result.prompt,
            "position": result.position,
            "token": token,
            "pre_act": result.pre_act,
            "bias": result.bias,
            "activation": result.activation,
            "sum": sum(row.value for row in result.contributions) + result.bias,
            "notes": " ".join(result.notes),
        }
        return {"rdfa": result.rows(inputs.tokenizer), "rdfa_summary": [summary]}


def _feature(inputs: AnalysisInput) -> int:
    given = inputs.options.get("feature")
    chosen = [given] if given is not None else chosen_features(inputs)[:1]
    return int(check_features(chosen, inputs.sae.cfg.d_sae)[0])


def _query(inputs: AnalysisInput, feature: int) -> tuple[int, int]:
    """The ``prompt`` and ``position`` options, else where ``feature`` is largest at a real
    position of the corpus (of the given prompt, or at the given position)."""
    prompt, position = inputs.options.get("prompt"), inputs.options.get("position")
    corpus = inputs.corpus
    acts = corpus.activations(inputs.sae)[..., feature].float()  # (B, pos)
    real = corpus.real.to(acts.device)
    if prompt is not None:
        prompt = _index("prompt", prompt, acts.shape[0])
    if position is not None:
        position = int(check_positions(torch.tensor([int(position)]), corpus.tokens[:1])[0, 0])
    allowed = real.clone()
    if prompt is not None:
        allowed[torch.arange(acts.shape[0]) != prompt] = False
    if position is not None:
        allowed[:, torch.arange(acts.shape[1]) != position] = False
    if not allowed.any():
        raise ValueError(
            f"rdfa was asked for prompt {prompt} at position {position}, which is padding: give "
            f"a real position (the prompt's real positions: "
            f"{real[prompt or 0].nonzero().flatten().tolist()[:20]})"
        )
    best = int(acts.masked_fill(~allowed, float("-inf")).flatten().argmax())
    return divmod(best, acts.shape[1])


def _index(name: str, value: object, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{name} must be an integer in 0..{size - 1}, got {value!r}")
    return value


PREFIX_INDUCTION = _PrefixInduction()
RDFA = _RDFA()
