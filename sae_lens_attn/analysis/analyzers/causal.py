"""Causal analyzers: feature ablation with the error term kept (``feature_ablation``) and
activation patching (``activation_patching``), and the prompts, positions and metrics they share
with ``repeats`` (the joint ablation of a layer's induction features, ``induction_ablation``).

The command's tokens are arbitrary text, so each analyzer says which prompts it runs on
(``prompts``), where it intervenes (``at``) and what it measures:

- ``prompts="ioi"`` (default of ``feature_ablation`` and ``activation_patching``): Wang et al.'s
  IOI prompts from the model's tokenizer (``sla.analysis.ioi_prompts``; ``n_prompts`` 100,
  ``templates`` ``"mixed"``, ``names``, ``seed`` 0), intervening at one word per prompt (``at``,
  default ``"S2"``), metric logit(IO) − logit(S) at the end; tables per template (``ABBA``,
  ``BABA``) and over ``all``. Needs names that are one token of the tokenizer (GPT-2's are);
  where they are not, the analyzer refuses and names the other modes.
- ``prompts="tokens"`` (``feature_ablation``; ``repeats.induction_ablation`` always): the command's own
  tokens, intervening at the second occurrence of repeated spans (``at="induction"``: positions
  whose token repeats an earlier ``A B`` and whose next token is that ``B``,
  ``sla.analysis.induction_proxy``) or at one position ``at=<int>`` in every context; metric the
  logit of the token that follows, averaged over a context's positions. Contexts without such a
  position are left out.
- ``prompts="repeated"``: rows ``[BOS, r, r]`` of uniformly random tokens (``n_prompts`` 64,
  ``repeat_len`` 20, ``seed``), intervening at the second copy; metric as for ``"tokens"``. The
  corrupt run of ``activation_patching`` draws the first copy afresh (``[BOS, r', r]``), so the
  second copy repeats nothing.

Options of ``feature_ablation``: ``features`` (default: every feature active at the positions in
some prompt, as ``sla.analysis.feature_ablation`` chooses; it ranks them by effect), ``mode``
(``"zero"``), ``method`` (``"patch"``, or ``"attribution"``: every feature from one backward
pass), ``top_effects`` (features tabled per group, 10), ``batch_size`` (64).

Options of ``activation_patching``: ``patch_layers`` (default: the SAE's layer), ``target``
(``"attn_out"``, ``"z"`` per head, ``"features"`` with the SAE), ``direction`` (``"noising"``),
``corruptions`` (IOI: all three of ``IOIPrompts.corrupt``), ``batch_size``. Beside the patched
runs it reports the clean and corrupt runs and a zero ablation of the layer at the same positions
(z set to 0 there, so the attention output is ``b_O``; at those positions only, not everywhere).

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis.ablation import feature_ablation
from sae_lens_attn.analysis.analyzers import NEEDS_Z
from sae_lens_attn.analysis.induction import bos_token_of, random_token_vocab, random_tokens
from sae_lens_attn.analysis.interventions import prompt_positions
from sae_lens_attn.analysis.ioi import CORRUPTIONS, WORDS, Corruption, IOIPrompts, ioi_prompts
from sae_lens_attn.analysis.metrics import Metric, logit_diff
from sae_lens_attn.analysis.patching import activation_patching
from sae_lens_attn.analysis.proxies import induction_proxy
from sae_lens_attn.analysis.registry import AnalysisInput, Table
from sae_lens_attn.backends import AttnBackend
from sae_lens_attn.corpus import CaptureExtra, Corpus

PROMPT_KINDS = ("ioi", "tokens", "repeated")
"""Values of the ``prompts`` option (module docstring)."""
ALL = "all"
"""The group of every prompt, beside the IOI templates."""
REPEATED_CORRUPTION = "fresh_first_copy"
"""The corruption of ``prompts="repeated"``: the first copy drawn afresh."""


@dataclass(frozen=True, eq=False)
class NextTokenLogit:
    """A ``Metric``: the logit (or log-probability) of the token that follows each marked
    position, averaged over a prompt's marked positions (0 for a prompt without any)."""

    mask: Bool[Tensor, "batch pos"]
    """The positions read."""
    targets: Int[Tensor, "batch pos"]
    """The token that follows each position (the next column of the tokens)."""
    log_probs: bool = False
    """Read log-probabilities instead of logits."""

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """One value per prompt, differentiable in ``logits``."""
        if tuple(logits.shape[:2]) != tuple(self.mask.shape):
            raise ValueError(
                f"logits must be [batch, pos, vocab] with [batch, pos] = {list(self.mask.shape)} "
                f"(this metric's prompts), got {list(logits.shape)}"
            )
        scores = logits.log_softmax(-1) if self.log_probs else logits
        mask = self.mask.to(logits.device)
        read = scores.gather(-1, self.targets.to(logits.device)[..., None])[..., 0]
        return (read * mask).sum(1) / mask.sum(1).clamp(min=1)


def next_token_logit(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], *, log_probs: bool = False
) -> NextTokenLogit:
    """The metric reading, at each marked position, the logit of the next token of ``tokens``.

    Raises:
        ValueError: ``mask`` is not the tokens' shape, or marks a last position (no next token).
    """
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"the mask must have the tokens' shape {list(tokens.shape)}, got {list(mask.shape)}"
        )
    if mask[:, -1].any():
        raise ValueError("the mask marks a last position, which has no next token to read")
    targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    return NextTokenLogit(mask.bool(), targets.long(), log_probs)


class Prompts(NamedTuple):
    """What an analyzer runs on: prompts, where it intervenes, what it measures."""

    corpus: Corpus
    """The prompts seen through the model (the command's own ``Corpus`` for ``"tokens"``): one
    capture and one encode, shared by the analysis and its tables."""
    positions: Int[Tensor, " batch"] | Bool[Tensor, "batch pos"]
    """Where, per prompt."""
    metric: Metric
    """What is measured, per prompt."""
    groups: tuple[str, ...]
    """Each prompt's group (IOI: its template; otherwise ``"all"``)."""
    counted: Bool[Tensor, " batch"]
    """Prompts the tables count (``"tokens"``: those with a position)."""
    description: str
    """The prompts, the positions and the metric, in words (for the summaries)."""
    ioi: IOIPrompts | None = None
    """The IOI prompts, for their corruptions."""


def analysis_prompts(inputs: AnalysisInput, *, default: str = "ioi") -> Prompts:
    """The prompts, positions and metric the options choose (module docstring).

    Raises:
        ValueError: an unknown ``prompts`` or ``at``; IOI prompts the tokenizer cannot make (the
            message says why and which options serve instead); no position to read.
    """
    kind = inputs.options.get("prompts", default)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompts {kind!r}; valid: {list(PROMPT_KINDS)}")
    if kind == "ioi":
        return _ioi(inputs)
    if kind == "repeated":
        tokens, _ = repeated_pair(inputs)
        corpus = Corpus(inputs.model, tokens)
        return _marked(corpus, _second_copy(tokens), "repeated random tokens [BOS, r, r]")
    return token_prompts(inputs)


def _ioi(inputs: AnalysisInput) -> Prompts:
    options = inputs.options
    at = options.get("at", "S2")
    if at not in WORDS:
        raise ValueError(f"with prompts='ioi', at must be a word of the prompts {list(WORDS)}")
    if inputs.tokenizer is None:
        raise ValueError("prompts='ioi' needs the model's tokenizer to write the prompts")
    try:
        prompts = ioi_prompts(
            inputs.tokenizer,
            n=options.get("n_prompts", 100),
            templates=options.get("templates", "mixed"),
            names=options.get("names"),
            seed=options.get("seed", 0),
        )
    except ValueError as err:
        raise ValueError(
            f"this tokenizer cannot make IOI prompts (prompts='ioi', the default): {err}. "
            'Give names that are one token (--option \'names=["A","B",...]\'), or analyse '
            "other prompts: --option prompts=tokens (the command's own text, at the second "
            "occurrence of repeated spans) or --option prompts=repeated (repeated random tokens)"
        ) from err
    return Prompts(
        corpus=Corpus(inputs.model, prompts.tokens, prompts.attention_mask),
        positions=prompts.word_idx[at],
        metric=prompts.logit_diff(),
        groups=prompts.template,
        counted=torch.ones(len(prompts), dtype=torch.bool),
        description=f"{len(prompts)} IOI prompts at {at}; metric logit(IO) - logit(S) at the end",
        ioi=prompts,
    )


def token_prompts(inputs: AnalysisInput) -> Prompts:
    """The command's own tokens at the ``at`` option's positions (module docstring)."""
    corpus = inputs.corpus
    at = inputs.options.get("at", "induction")
    if at == "induction":
        mask = repeat_positions(corpus)
        where = "the second occurrence of repeated spans"
    elif isinstance(at, int) and not isinstance(at, bool):
        n_pos = corpus.tokens.shape[1]
        if not 0 <= at < n_pos - 1:
            raise ValueError(
                f"at={at} is outside the contexts' positions that have a next token "
                f"(valid: 0..{n_pos - 2})"
            )
        mask = torch.zeros_like(corpus.real)
        mask[:, at] = _readable(corpus)[:, at]
        where = f"position {at}"
    else:
        raise ValueError(
            f"with prompts='tokens', at must be 'induction' or a position (an integer), got {at!r}"
        )
    if not mask.any():
        raise ValueError(
            f"no context of the command's tokens has a position at {where} with a next token "
            "to read; give other text, or at=<position>"
        )
    return _marked(corpus, mask, f"the command's tokens at {where}")


def _marked(corpus: Corpus, mask: Tensor, what: str) -> Prompts:
    ids = corpus.tokens.cpu()
    counted = mask.any(1)
    return Prompts(
        corpus=corpus,
        positions=mask,
        metric=next_token_logit(ids, mask),
        groups=(ALL,) * ids.shape[0],
        counted=counted,
        description=f"{int(counted.sum())} contexts, {what} ({int(mask.sum())} positions); "
        "metric the logit of the next token, averaged per context",
    )


def _readable(corpus: Corpus) -> Bool[Tensor, "batch pos"]:
    """Counted positions (real, not a special token) whose next token is counted too."""
    counted = corpus.counted.cpu()
    readable = torch.zeros_like(counted)
    readable[:, :-1] = counted[:, :-1] & counted[:, 1:]
    return readable


def repeat_positions(corpus: Corpus) -> Bool[Tensor, "batch pos"]:
    """The second occurrence of repeated spans in the corpus: positions whose token repeats an
    earlier ``A B`` and whose next token is that ``B`` (``induction_proxy``), both counted."""
    return induction_proxy(corpus.tokens.cpu()) & _readable(corpus)


def _second_copy(tokens: Tensor) -> Bool[Tensor, "batch pos"]:
    """Rows ``[BOS, r, r]``: the second copy's positions that have a next token."""
    half = (tokens.shape[1] - 1) // 2
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, half + 1 : -1] = True
    return mask


def repeated_pair(inputs: AnalysisInput) -> tuple[Tensor, Tensor]:
    """``[BOS, r, r]`` and ``[BOS, r', r]`` (``n_prompts``, ``repeat_len``, ``seed`` options)."""
    options = inputs.options
    bos = bos_token_of(inputs.model, options.get("bos_token_id"))
    vocab = random_token_vocab(inputs.model, bos)
    generator = torch.Generator().manual_seed(int(options.get("seed", 0)))
    n, length = int(options.get("n_prompts", 64)), int(options.get("repeat_len", 20))
    rows = random_tokens(vocab, bos_token_id=bos, n_samples=n, length=length, generator=generator)
    fresh = random_tokens(vocab, bos_token_id=bos, n_samples=n, length=length, generator=generator)
    return torch.cat([rows, rows[:, 1:]], 1), torch.cat([fresh, rows[:, 1:]], 1)


def _group_rows(groups: Sequence[str], counted: Tensor) -> dict[str, Tensor]:
    """Each group's counted prompts (indices), and ``all`` of them."""
    names = sorted(set(groups)) if set(groups) != {ALL} else []
    out = {}
    for name in [*names, ALL]:
        keep = torch.tensor([name in (ALL, g) for g in groups]) & counted.cpu()
        out[name] = keep.nonzero().flatten()
    return out


def mean_of(values: Tensor) -> float:
    """The mean as a float (NaN for no values)."""
    return float(values.double().mean()) if values.numel() else float("nan")


def _std(values: Tensor) -> float:
    return float(values.double().std()) if values.numel() > 1 else 0.0


@dataclass(frozen=True)
class _FeatureAblation:
    description: str = (
        "zero-ablate each feature at chosen positions (SAE spliced, error term kept): its effect "
        "on a metric per prompt group, the error term's row, and per-prompt effects"
    )
    needs: frozenset[CaptureExtra] = NEEDS_Z

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        options = inputs.options
        prompts = analysis_prompts(inputs)
        result = feature_ablation(
            inputs.model,
            inputs.sae,
            prompts.corpus,
            prompts.metric,
            prompts.positions,
            features=options.get("features"),
            mode=options.get("mode", "zero"),
            method=options.get("method", "patch"),
            batch_size=options.get("batch_size", 64),
        )
        active = _active(inputs.sae, prompts, result.features)  # [F, batch]
        k = int(options.get("top_effects", 10))
        effects: Table = []
        summary: Table = []
        shown: set[int] = set()
        groups = _group_rows(prompts.groups, prompts.counted)
        for group, rows in groups.items():
            clean = mean_of(result.clean[rows])
            deltas = result.delta[:, rows]  # (F, n)
            means = deltas.double().mean(1) if rows.numel() else torch.zeros(deltas.shape[0])
            order = means.abs().argsort(descending=True)[:k].tolist()
            base = {"group": group, "n_prompts": int(rows.numel()), "clean": clean}
            for rank, column in enumerate(order, 1):
                shown.add(column)
                effects.append(
                    base
                    | {
                        "rank": rank,
                        "component": "feature",
                        "feature": int(result.features[column]),
                        "mean_delta": float(means[column]),
                        "std_delta": _std(deltas[column]),
                        "relative": float(means[column]) / clean if clean else float("nan"),
                        "active_share": mean_of(active[column, rows].float()),
                    }
                )
            error = result.error_delta[rows]
            effects.append(
                base
                | {
                    "rank": None,
                    "component": "error",
                    "feature": None,
                    "mean_delta": mean_of(error),
                    "std_delta": _std(error),
                    "relative": mean_of(error) / clean if clean else float("nan"),
                    "active_share": None,
                }
            )
            summary.append(
                base
                | {
                    "features": int(result.features.numel()),
                    "error_delta": mean_of(error),
                    "method": result.method,
                    "mode": result.mode,
                    "prompts": prompts.description,
                }
            )
        per_prompt: Table = []
        for prompt in prompts.counted.nonzero().flatten().tolist():
            group = prompts.groups[prompt]
            for column in sorted(shown):
                per_prompt.append(
                    {
                        "group": group,
                        "prompt": prompt,
                        "component": "feature",
                        "feature": int(result.features[column]),
                        "delta": float(result.delta[column, prompt]),
                    }
                )
            per_prompt.append(
                {
                    "group": group,
                    "prompt": prompt,
                    "component": "error",
                    "feature": None,
                    "delta": float(result.error_delta[prompt]),
                }
            )
        return {
            "ablation_effects": effects,
            "ablation_summary": summary,
            "ablation_prompts": per_prompt,
        }


def _active(sae: SAE[Any], prompts: Prompts, features: Tensor) -> Bool[Tensor, "F batch"]:
    """Whether each feature is active at some position of each prompt."""
    corpus = prompts.corpus
    acts = corpus.activations(sae).detach()
    where = prompt_positions(prompts.positions, corpus.tokens.shape, corpus.attention_mask)
    rows, cols = where.rows.to(acts.device), where.cols.to(acts.device)
    on = acts[rows, cols][:, features.to(acts.device)] > 0  # (N, F)
    by_prompt = torch.zeros(corpus.tokens.shape[0], features.numel(), dtype=torch.long)
    by_prompt.index_add_(0, where.rows, on.long().cpu())
    return (by_prompt > 0).T


class _Pair(NamedTuple):
    """A corruption's corrupt run and the alignment of positions."""

    name: str
    tokens: Tensor
    attention_mask: Tensor | None
    clean_positions: Tensor
    corrupt_positions: Tensor
    metrics: Metric | tuple[Metric, Metric]


@dataclass(frozen=True)
class _ActivationPatching:
    description: str = (
        "noising (or denoising) of each layer's attention output, head z or SAE features at "
        "chosen positions, per corruption, beside the clean, corrupt and zero-ablated runs"
    )
    needs: frozenset[CaptureExtra] = NEEDS_Z

    def __call__(self, inputs: AnalysisInput) -> dict[str, Table]:
        options = inputs.options
        if options.get("prompts", "ioi") == "tokens":
            raise ValueError(
                "activation_patching needs a corrupted run beside the clean one, which the "
                "command's own text does not give: use --option prompts=ioi (IOI prompts and "
                "their corruptions) or --option prompts=repeated (repeated random tokens, the "
                "first copy drawn afresh)"
            )
        prompts = analysis_prompts(inputs)
        backend = prompts.corpus.backend
        layers = options.get("patch_layers", [prompts.corpus.site_of(inputs.sae)[0].layer])
        layers = [int(layer) for layer in ([layers] if isinstance(layers, int) else layers)]
        target = options.get("target", "attn_out")
        direction = options.get("direction", "noising")
        clean_tokens, clean_mask = prompts.corpus.tokens, prompts.corpus.attention_mask
        rows: Table = []
        zeroed: dict[tuple[str, int], Tensor] = {}
        groups = _group_rows(prompts.groups, prompts.counted)
        for pair in _pairs(inputs, prompts):
            noising = direction == "noising"
            aligned = (pair.clean_positions, pair.corrupt_positions)
            receiving, giving = aligned if noising else aligned[::-1]
            result = activation_patching(
                inputs.model,
                clean_tokens,
                pair.tokens,
                pair.metrics,
                layers,
                target=target,
                positions=receiving,
                source_positions=giving,
                direction=direction,
                sae=inputs.sae if target == "features" else None,
                clean_attention_mask=clean_mask,
                corrupt_attention_mask=pair.attention_mask,
                batch_size=options.get("batch_size", 64),
            )
            receiver = (
                (clean_tokens, clean_mask, pair.clean_positions, prompts.metric)
                if noising
                else (pair.tokens, pair.attention_mask, pair.corrupt_positions, _on_corrupt(pair))
            )
            for index, layer in enumerate(result.layers.tolist()):
                key = ("clean" if noising else pair.name, layer)
                if key not in zeroed:
                    zeroed[key] = zero_ablated(backend, layer, *receiver)
                patched = result.patched[index]
                heads = [None] if target != "z" else list(range(patched.shape[0]))
                for head in heads:
                    values = patched if head is None else patched[head]
                    for group, members in groups.items():
                        rows.append(
                            {
                                "corruption": pair.name,
                                "layer": layer,
                                "head": head,
                                "group": group,
                                "n_prompts": int(members.numel()),
                                "clean": mean_of(result.clean[members]),
                                "corrupt": mean_of(result.corrupt[members]),
                                "patched": mean_of(values[members]),
                                "zero_ablated": mean_of(zeroed[key][members]),
                                "target": target,
                                "direction": direction,
                                "prompts": prompts.description,
                            }
                        )
        return {"patching": rows}


def _pairs(inputs: AnalysisInput, prompts: Prompts) -> list[_Pair]:
    """The corrupt runs the options ask for, with their alignments and metrics."""
    options = inputs.options
    if prompts.ioi is None:  # repeated random tokens
        _, fresh = repeated_pair(inputs)
        positions = prompts.positions
        return [_Pair(REPEATED_CORRUPTION, fresh, None, positions, positions, prompts.metric)]
    clean = prompts.ioi
    at = options.get("at", "S2")
    chosen = options.get("corruptions", list(CORRUPTIONS))
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    unknown = [c for c in chosen if c not in CORRUPTIONS]
    if unknown or not chosen:
        raise ValueError(f"unknown corruptions {unknown or chosen}; valid: {list(CORRUPTIONS)}")
    pairs = []
    for name in chosen:
        corrupt = clean.corrupt(cast(Corruption, name))
        # the clean answer, read at the corrupt prompts' own end
        on_corrupt = logit_diff(corrupt.word_idx["end"], clean.io_ids, clean.s_ids)
        pairs.append(
            _Pair(
                name,
                corrupt.tokens,
                corrupt.attention_mask,
                clean.word_idx[at],
                corrupt.source_positions(clean.word_idx[at]),
                (clean.logit_diff(), on_corrupt),
            )
        )
    return pairs


def _on_corrupt(pair: _Pair) -> Metric:
    return pair.metrics[1] if isinstance(pair.metrics, tuple) else pair.metrics


@torch.no_grad()
def zero_ablated(
    backend: AttnBackend,
    layer: int,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    positions: Any,
    metric: Metric,
) -> Float[Tensor, " batch"]:
    """The metric with the layer's z set to 0 at each prompt's ``positions`` (its attention
    output there becomes ``b_O``), and nowhere else."""
    where = prompt_positions(positions, tokens.shape, attention_mask)

    def zero(z: Tensor) -> Tensor:
        out = z.clone()
        out[where.rows.to(z.device), where.cols.to(z.device)] = 0
        return out

    with backend.splicing({backend.site(layer): zero}, convention=backend.native_convention):
        logits = backend.forward(tokens, attention_mask=attention_mask)
    assert logits is not None
    return metric(logits).detach().float().cpu()


FEATURE_ABLATION = _FeatureAblation()
ACTIVATION_PATCHING = _ActivationPatching()
