"""What the explorer computes: a model and its SAEs (one per layer), run on one prompt at a time.

Every forward pass and tokenizer call runs under one lock: hooks and nnsight traces are not
safe to interleave, nor are calls of a fast tokenizer, so concurrent requests queue and each gets
its own prompt's results. Feature families are labelled
once per layer, on the label contexts, when a feature of that layer is first asked for.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from sae_lens_attn.analysis import (
    DFAResult,
    Edit,
    FeatureFamilies,
    FeatureLogits,
    dfa,
    feature_families,
    feature_logits,
    spliced,
)
from sae_lens_attn.backends import AttnBackend, backend_for
from sae_lens_attn.corpus import Corpus
from sae_lens_attn.explorer.schemas import (
    AblateResponse,
    FamilyView,
    FeatureLogitsView,
    FeatureResponse,
    InfoResponse,
    LayerInfo,
    LogitChange,
    LogitToken,
    RunResponse,
)
from sae_lens_attn.sae_adapter import sae_convention
from sae_lens_attn.site import AttnSite, ValueBiasConvention, saes_by_layer
from sae_lens_attn.validation import (
    check_count,
    context_limit,
    token_texts,
    tokenizer_of,
)

MAX_BODY_BYTES = 64 * 1024
"""Default limit on a request body: far above any prompt a model's context holds."""


class RequestRefused(ValueError):
    """A request the explorer refuses; ``kind`` names the check that refused it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ModelFailed(RuntimeError):
    """The model or an SAE raised while running a valid request (the server keeps serving)."""


class ExplorerSession:
    """A model, its SAEs, and what the explorer's routes compute with them.

    Args:
        model: any model a backend supports (``backend_for``).
        saes: hook_z SAEs of the model, at most one per layer, each of a kind DFA supports.
        tokenizer: the model's tokenizer (default: the one it carries).
        top_k: features listed per position and layer.
        logits_k: tokens listed per direction in a feature's logit effects.
        family_tokens: label contexts ``[contexts, ctx]`` from the model's distribution for
            ``feature_families``; without them no family labels are given.
        dashboards: layer → a folder of ``sae-lens-attn dashboard`` pages for that layer's SAE.
        max_body_bytes: the largest request body the server accepts.

    Raises:
        ValueError: no SAEs, two SAEs on one layer, an SAE of another model or one DFA refuses,
            a model without a tokenizer, bad label contexts, or a dashboard folder that is not
            a folder or belongs to no loaded layer.
    """

    def __init__(
        self,
        model: Any,
        saes: Sequence[SAE[Any]],
        *,
        tokenizer: Any = None,
        top_k: int = 10,
        logits_k: int = 10,
        family_tokens: Int[Tensor, "contexts ctx"] | None = None,
        dashboards: Mapping[int, str | Path] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.backend: AttnBackend = backend_for(model)
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_of(self.backend)
        if self.tokenizer is None:
            raise ValueError("the explorer needs the model's tokenizer to read prompts; pass one")
        self.top_k = check_count("top_k", top_k)
        self.logits_k = check_count("logits_k", logits_k)
        self.max_body_bytes = check_count("max_body_bytes", max_body_bytes)
        self.context = context_limit(self.backend)
        self.saes = saes_by_layer(saes, self.backend)
        self.sites = {
            layer: AttnSite.from_sae(sae, self.backend) for layer, sae in self.saes.items()
        }
        self.family_tokens = (
            None if family_tokens is None else Corpus(self.backend, family_tokens)
        )  # one capture per layer and one encode per SAE, shared by every layer's families
        self.dashboards = _dashboard_folders(dashboards or {}, self.saes)
        self._lock = threading.RLock()  # the model's, and the tokenizer's: fast tokenizers
        # refuse concurrent calls ("Already borrowed")
        self._families: dict[int, FeatureFamilies] = {}
        self._logits: dict[tuple[int, int], FeatureLogitsView | None] = {}
        self.has_unembed = _has_unembed(self.backend)
        self._probe()

    # -- the routes -------------------------------------------------------------------------

    def info(self) -> InfoResponse:
        """What the explorer serves (``GET /api/info``)."""
        return InfoResponse(
            model=_model_name(self.backend),
            backend=self.backend.name,
            layers=[
                LayerInfo(
                    layer=layer,
                    hook_name=self.sites[layer].hook_name,
                    d_sae=int(sae.cfg.d_sae),
                    n_heads=self.sites[layer].n_heads,
                    dashboards=layer in self.dashboards,
                )
                for layer, sae in self.saes.items()
            ],
            context=self.context,
            top_k=self.top_k,
            families=self.family_tokens is not None and self.has_unembed,
            max_body_bytes=self.max_body_bytes,
        )

    def run(self, prompt: str) -> RunResponse:
        """The prompt's tokens and each layer's ``top_k`` features per position (``/api/run``)."""
        tokens = self.tokenize(prompt)
        with self.guarded():
            acts = self.activations(tokens)
        return RunResponse.model_validate(
            {
                "tokens": self.token_texts(tokens[0].tolist()),
                "token_ids": tokens[0].tolist(),
                "layers": {str(layer): _top_features(a, self.top_k) for layer, a in acts.items()},
                "top_k": self.top_k,
            }
        )

    def feature(
        self, prompt: str, layer: int, feature: int, position: int | None = None
    ) -> FeatureResponse:
        """DFA of ``feature`` at ``position`` with its logits and family (``/api/feature``)."""
        tokens = self.tokenize(prompt)
        self.check_feature(layer, feature)
        if position is not None:
            self.check_position(position, tokens.shape[1])
        with self.guarded():
            result = dfa(self.backend, self.saes[layer], tokens, features=[feature])
            logits, family = self.feature_logits(layer, feature), self.family(layer, feature)
        activations = result.acts[0, :, 0]
        if position is None:
            position = int(activations.argmax())
        return self.detail(tokens, layer, result, 0, position, logits=logits, family=family)

    def ablate(
        self, prompt: str, layer: int, feature: int, position: int, k: int | None = None
    ) -> AblateResponse:
        """The next-token prediction at ``position`` before and after zero-ablating ``feature``
        there, the SAE spliced with its error term kept (``/api/ablate``)."""
        tokens = self.tokenize(prompt)
        self.check_feature(layer, feature)
        self.check_position(position, tokens.shape[1])
        if not self.has_unembed:
            raise RequestRefused(
                "no_logits", "the model has no unembedding (no LM head), so it gives no logits"
            )
        d_vocab = int(self.backend.unembed().shape[-1])
        k = self.logits_k if k is None else k
        if not 1 <= k <= d_vocab:
            raise RequestRefused(
                "k_out_of_range", f"k must be in 1..{d_vocab} (the vocabulary), got {k}"
            )
        sae = self.saes[layer]
        edit = Edit(sae, [feature], torch.tensor([position]), mode="zero")
        with self.guarded(), torch.no_grad():
            activation = float(Corpus(self.backend, tokens).activations(sae)[0, position, feature])
            before = self.backend.forward(tokens)
            with spliced(self.backend, edits=[edit]) as run:
                after = run(tokens)
        assert before is not None
        logits = torch.stack([before[0, position], after[0, position]]).float().cpu()  # (2, V)
        probs = logits.softmax(-1)

        def changes(ids: Sequence[int]) -> list[LogitChange]:
            texts = self.token_texts(ids)
            return [
                LogitChange(
                    token=text,
                    token_id=i,
                    before=float(logits[0, i]),
                    after=float(logits[1, i]),
                    prob_before=float(probs[0, i]),
                    prob_after=float(probs[1, i]),
                )
                for text, i in zip(texts, ids, strict=True)
            ]

        moved = logits[1] - logits[0]
        following = int(tokens[0, position + 1]) if position + 1 < tokens.shape[1] else None
        return AblateResponse(
            layer=layer,
            feature=feature,
            position=position,
            token=self.token_texts([int(tokens[0, position])])[0],
            activation=activation,
            next_token=None if following is None else changes([following])[0],
            before=changes(logits[0].topk(k).indices.tolist()),
            after=changes(logits[1].topk(k).indices.tolist()),
            lowered=changes(moved.topk(k, largest=False).indices.tolist()),
            raised=changes(moved.topk(k).indices.tolist()),
        )

    # -- the parts, also used by the static export ---------------------------------------------

    def tokenize(self, prompt: str) -> Int[Tensor, "1 pos"]:
        """``[1, pos]`` token ids, BOS first, as the model's ``to_tokens`` gives them.

        Raises:
            RequestRefused: an empty prompt, or one longer than the model's context (never cut).
        """
        if not isinstance(prompt, str):
            raise RequestRefused(
                "invalid_request", f"the prompt must be text, got {type(prompt).__name__}"
            )
        with self._lock:
            tokens = _to_tokens(self.backend, self.tokenizer, prompt).cpu()
        bos = getattr(self.tokenizer, "bos_token_id", None)
        text_tokens = tokens.shape[1] - int(bos is not None and int(tokens[0, 0]) == bos)
        if not prompt or text_tokens == 0:
            raise RequestRefused(
                "empty_prompt", "the prompt is empty: type some text to run through the model"
            )
        if self.context is not None and tokens.shape[1] > self.context:
            raise RequestRefused(
                "prompt_too_long",
                f"the prompt is {tokens.shape[1]} tokens long (BOS included) but the model reads "
                f"at most {self.context} positions: shorten it by {tokens.shape[1] - self.context} "
                "tokens (prompts are never cut)",
            )
        return tokens

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token id as text."""
        with self._lock:
            return token_texts(self.tokenizer, ids)

    def check_feature(self, layer: int, feature: int) -> None:
        """Raise ``RequestRefused`` unless ``layer`` has an SAE with a feature ``feature``."""
        if layer not in self.saes:
            raise RequestRefused(
                "unknown_layer",
                f"no SAE is loaded at layer {layer}; loaded layers: {sorted(self.saes)}",
            )
        d_sae = int(self.saes[layer].cfg.d_sae)
        if not 0 <= feature < d_sae:
            raise RequestRefused(
                "feature_out_of_range",
                f"feature {feature} is out of range: layer {layer}'s SAE has d_sae={d_sae} "
                f"features (valid: 0..{d_sae - 1})",
            )

    @staticmethod
    def check_position(position: int, n_tokens: int) -> None:
        """Raise ``RequestRefused`` unless ``position`` indexes one of ``n_tokens`` tokens."""
        if not 0 <= position < n_tokens:
            raise RequestRefused(
                "position_out_of_range",
                f"position {position} is outside the prompt's {n_tokens} tokens "
                f"(valid: 0..{n_tokens - 1}, 0 is BOS)",
            )

    @torch.no_grad()
    def activations(self, tokens: Int[Tensor, "1 pos"]) -> dict[int, Float[Tensor, "pos d_sae"]]:
        """Each SAE's feature activations at every position, from one pass per convention.

        Call under ``guarded`` (the model lock).
        """
        corpus = Corpus(self.backend, tokens)
        by_convention: dict[ValueBiasConvention, list[AttnSite]] = {}
        for layer, sae in self.saes.items():
            convention = sae_convention(sae, self.backend.native_convention)
            by_convention.setdefault(convention, []).append(self.sites[layer])
        for convention, sites in by_convention.items():
            corpus.capture_many(sites, convention)  # one pass per convention
        return {
            layer: corpus.activations(sae)[0].float().cpu()
            for layer, sae in sorted(self.saes.items())
        }

    def feature_logits(self, layer: int, feature: int) -> FeatureLogitsView | None:
        """The feature's top and bottom logit effects (``None`` without an unembedding)."""
        key = (layer, feature)
        if key not in self._logits:
            self._logits[key] = None
            if self.has_unembed:
                logits = feature_logits(
                    self.backend, self.saes[layer], [feature], k=self.logits_k,
                    tokenizer=self.tokenizer,
                )  # fmt: skip
                self._logits[key] = _logits_view(logits)
        return self._logits[key]

    def family(self, layer: int, feature: int) -> FamilyView | None:
        """The feature's family over the label contexts (``None`` without them)."""
        if self.family_tokens is None or not self.has_unembed:
            return None
        families = self._families.get(layer)
        if families is None:
            families = feature_families(
                self.backend, self.saes[layer], self.family_tokens, tokenizer=self.tokenizer
            )
            self._families[layer] = families
        column = int((families.features == feature).nonzero()[0])
        return FamilyView(
            label=families.labels[feature],
            shares={name: _finite(share[column]) for name, share in families.shares.items()},
            contexts=int(families.contexts[column]),
        )

    def dashboard_page(self, layer: int, feature: int) -> Path | None:
        """The feature's dashboard page, if its layer has a dashboard folder holding one."""
        folder = self.dashboards.get(layer)
        page = None if folder is None else folder / f"feature_{feature}.html"
        return page if page is not None and page.is_file() else None

    def detail(
        self,
        tokens: Int[Tensor, "1 pos"],
        layer: int,
        result: DFAResult,
        column: int,
        position: int,
        *,
        logits: FeatureLogitsView | None,
        family: FamilyView | None,
    ) -> FeatureResponse:
        """The response for feature ``result.features[column]`` at ``position``, from a DFA of
        every position of ``tokens``."""
        feature = int(result.features[column])
        page = self.dashboard_page(layer, feature)
        return FeatureResponse(
            layer=layer,
            feature=feature,
            position=position,
            token=self.token_texts([int(tokens[0, position])])[0],
            activation=float(result.acts[0, position, column]),
            pre_act=float(result.pre_act[0, position, column]),
            bias=float(result.bias[column]),
            by_src=result.by_src[0, position, :, column].tolist(),
            by_head=result.by_head[0, position, :, column].tolist(),
            activations=result.acts[0, :, column].tolist(),
            logits=logits,
            family=family,
            dashboard=None if page is None else f"/dashboards/{layer}/{page.name}",
        )

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Hold the model lock; errors of the model or the SAEs become ``ModelFailed``."""
        with self._lock:
            try:
                yield
            except RequestRefused:
                raise
            except Exception as err:
                raise ModelFailed(
                    f"the model failed on this request: {type(err).__name__}: {err}"
                ) from err

    def _probe(self) -> None:
        """Run every SAE through DFA on two tokens, so an SAE DFA refuses (or one on another
        device) fails here rather than on the first click."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        probe = torch.tensor([[bos if bos is not None else 0, 0]])
        for sae in self.saes.values():
            dfa(self.backend, sae, probe, features=[0])


def _dashboard_folders(
    dashboards: Mapping[int, str | Path], saes: Mapping[int, SAE[Any]]
) -> dict[int, Path]:
    folders = {}
    for layer, folder in dashboards.items():
        if layer not in saes:
            raise ValueError(
                f"dashboards given for layer {layer}, which has no SAE loaded (loaded: "
                f"{sorted(saes)})"
            )
        path = Path(folder).resolve()
        if not path.is_dir():
            raise ValueError(f"dashboard folder {str(folder)!r} for layer {layer} is not a folder")
        folders[layer] = path
    return folders


def _to_tokens(backend: AttnBackend, tokenizer: Any, prompt: str) -> Int[Tensor, "1 pos"]:
    to_tokens = getattr(backend.model, "to_tokens", None) if backend.name != "nnsight" else None
    if callable(to_tokens):  # HookedTransformer, TransformerBridge
        return cast(Tensor, to_tokens(prompt, truncate=False))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id  # as sla.hooked's to_tokens (TransformerLens's): BOS first
    return torch.tensor([[bos, *ids] if bos is not None else ids], dtype=torch.long)


def _top_features(acts: Float[Tensor, "pos d_sae"], k: int) -> list[list[dict[str, Any]]]:
    """Per position, the ``k`` most active features with activation > 0 (plain dicts: pydantic
    validates the whole answer at once, ten times faster than building each entry)."""
    values, indices = acts.topk(min(k, acts.shape[-1]), dim=-1)
    return [
        [{"feature": f, "activation": a} for f, a in zip(idx, vals, strict=True) if a > 0]
        for idx, vals in zip(indices.tolist(), values.tolist(), strict=True)
    ]


def _logits_view(logits: FeatureLogits) -> FeatureLogitsView:
    def tokens(ids: Tensor, values: Tensor, texts: Sequence[str]) -> list[LogitToken]:
        return [
            LogitToken(token=text, token_id=i, value=v)
            for text, i, v in zip(texts, ids.tolist(), values.tolist(), strict=True)
        ]

    return FeatureLogitsView(
        top=tokens(logits.top_ids[0], logits.top_values[0], logits.top_tokens[0]),
        bottom=tokens(logits.bottom_ids[0], logits.bottom_values[0], logits.bottom_tokens[0]),
    )


def _has_unembed(backend: AttnBackend) -> bool:
    try:
        backend.unembed()
    except ValueError:
        return False
    return True


def _model_name(backend: AttnBackend) -> str:
    model = backend.model
    cfg, config = getattr(model, "cfg", None), getattr(model, "config", None)
    name = getattr(cfg, "model_name", None) or getattr(config, "_name_or_path", None)
    return str(name or getattr(config, "model_type", None) or type(model).__name__)


def _finite(value: Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
