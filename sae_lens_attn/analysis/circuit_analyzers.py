"""Analyzers for prefix-length induction and recursive DFA, registered through the
``sae_lens_attn.analyzers`` entry points (pyproject.toml) beside the built-in ones.

Options (``AnalysisInput.options``; on the command line ``--option KEY=VALUE``):

- ``prefix_induction``: ``layers`` (default: all), ``prefix_lengths`` (default 1..9),
  ``n_samples`` (default 200), ``seq_len``, ``seed``, ``bos_token_id``, and for the events on the
  given tokens ``threshold`` (0.3), ``match`` (``"exact"`` or ``"fuzzy"``), ``max_corrupted``
  (100) and ``max_length`` (the last bucket of the counts, 8).
- ``rdfa``: ``feature`` (default: the first of ``features``, else the most active), ``prompt``
  and ``position`` (default: where that feature peaks), ``upstream_saes`` (the SAEs of earlier
  layers; without them their attention outputs are error terms), ``expand`` (3), ``depth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_lens_attn.analysis.attribution import encode_z, sae_convention
from sae_lens_attn.analysis.builtin import top_features
from sae_lens_attn.analysis.long_prefix import prefix_events, prefix_induction
from sae_lens_attn.analysis.recursive_dfa import rdfa
from sae_lens_attn.analysis.registry import AnalysisInput, Table
from sae_lens_attn.backends import backend_for
from sae_lens_attn.site import AttnSite
from sae_lens_attn.validation import check_features


@dataclass(frozen=True)
class _PrefixInduction:
    description: str = (
        "attention against prefix length per head on repeated random tokens (Kissane et al.), "
        "prefix lengths of induction events in the text, and the corruption test"
    )

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
            inputs.tokens,
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

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        options = inputs.options
        feature = _feature(inputs)
        prompt, position = _query(inputs, feature)
        saes = [inputs.sae, *options.get("upstream_saes", [])]
        result = rdfa(
            inputs.model,
            saes,
            inputs.tokens,
            layer=AttnSite.from_sae(inputs.sae, backend_for(inputs.model)).layer,
            feature=feature,
            position=position,
            prompt=prompt,
            expand=options.get("expand", 3),
            depth=options.get("depth"),
        )
        last = result.tokens[-1]
        token = str(last) if inputs.tokenizer is None else inputs.tokenizer.decode([last])
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
    if given is None:
        features = inputs.options.get("features")
        given = features[0] if features else top_features(inputs, 1)[0]
    return int(check_features([given], inputs.sae.cfg.d_sae)[0])


@torch.no_grad()
def _query(inputs: AnalysisInput, feature: int) -> tuple[int, int]:
    """The ``prompt`` and ``position`` options, else where ``feature`` peaks in the tokens."""
    prompt, position = inputs.options.get("prompt"), inputs.options.get("position")
    if prompt is not None and position is not None:
        return int(prompt), int(position)
    backend = backend_for(inputs.model)
    site = AttnSite.from_sae(inputs.sae, backend)
    convention = sae_convention(inputs.sae, backend.native_convention)
    rows = inputs.tokens if prompt is None else inputs.tokens[int(prompt) : int(prompt) + 1]
    z = backend.capture(rows, [site], convention=convention)[site.layer].z
    acts = encode_z(inputs.sae, z)[..., feature]  # (B, pos)
    if position is not None:
        return int(acts[:, int(position)].argmax()) if prompt is None else int(prompt), int(
            position
        )
    row, peak = divmod(int(acts.flatten().argmax()), acts.shape[1])
    return (row if prompt is None else int(prompt)), peak


PREFIX_INDUCTION = _PrefixInduction()
RDFA = _RDFA()
