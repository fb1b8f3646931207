"""The explorer's JSON API: typed request and response models (pydantic), shared by the server,
the static export and the documentation (``/api/openapi.json``).

Requests are strict: fields have their JSON types (``"layer": "1"`` is refused, not converted)
and unknown fields are refused, so a typo never passes silently.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RunRequest(_Request):
    """``POST /api/run``: a prompt to run through the model and every loaded SAE."""

    prompt: str = Field(description="Text; tokenized as the model's to_tokens does, BOS first.")


class FeatureRequest(_Request):
    """``POST /api/feature``: one feature of one layer's SAE, at one position of a prompt."""

    prompt: str = Field(description="The same text as in /api/run.")
    layer: int = Field(description="A layer with an SAE loaded (GET /api/info lists them).")
    feature: int = Field(description="Feature index, 0..d_sae-1.")
    position: int | None = Field(
        default=None,
        description="Token position (0 is BOS); default: where the feature is most active.",
    )


class AblateRequest(_Request):
    """``POST /api/ablate``: zero-ablate one feature at one position of a prompt."""

    prompt: str = Field(description="The same text as in /api/run.")
    layer: int = Field(description="A layer with an SAE loaded (GET /api/info lists them).")
    feature: int = Field(description="Feature index, 0..d_sae-1.")
    position: int = Field(
        description="Token position (0 is BOS) where the feature is ablated; the logits read "
        "are this position's, its prediction of the next token."
    )
    k: int | None = Field(
        default=None,
        description="Tokens listed per list (default: the explorer's logits_k), 1..d_vocab.",
    )


class ActiveFeature(BaseModel):
    """A feature active at a position."""

    feature: int = Field(description="Feature index.")
    activation: float = Field(description="The SAE's feature activation (its encode), > 0.")


class RunResponse(BaseModel):
    """The prompt's tokens and, per layer and position, its most active features."""

    tokens: list[str] = Field(description="Each token as text, BOS first.")
    token_ids: list[int] = Field(description="The token ids.")
    layers: dict[str, list[list[ActiveFeature]]] = Field(
        description="Layer (as a string) → per position, up to top_k active features, most "
        "active first (only features with activation > 0)."
    )
    top_k: int = Field(description="Most features listed per position and layer.")


class LogitToken(BaseModel):
    """A token and a feature's direct effect on its logit."""

    token: str
    token_id: int
    value: float = Field(description="W_dec[f] · W_O_cat · W_U at this token (no final norm).")


class FeatureLogitsView(BaseModel):
    """The tokens whose logits the feature raises and lowers most (analysis.feature_logits)."""

    top: list[LogitToken]
    bottom: list[LogitToken]


class FamilyView(BaseModel):
    """The feature's family (analysis.feature_families) over the explorer's label contexts."""

    label: str = Field(description="The family, 'unclassified' or 'never_fires'.")
    shares: dict[str, float | None] = Field(
        description="Family → share of the feature's contexts that fit it (null: no contexts)."
    )
    contexts: int = Field(description="Max-activating contexts examined.")


class FeatureResponse(BaseModel):
    """DFA of one feature at one position: its pre-activation split over source positions and
    over heads (``sum(by_src) + bias == pre_act``), and what else is known about the feature."""

    layer: int
    feature: int
    position: int = Field(description="The query position explained.")
    token: str = Field(description="The token at that position.")
    activation: float = Field(description="The feature's activation there.")
    pre_act: float = Field(description="Its encoder pre-activation there (hook_sae_acts_pre).")
    bias: float = Field(description="b_enc[f] − b_dec · W_enc[:, f]: the part no source explains.")
    by_src: list[float] = Field(
        description="Contribution of each source position (0 after the query position)."
    )
    by_head: list[float] = Field(description="Contribution of each head.")
    activations: list[float] = Field(description="The feature's activation at every position.")
    logits: FeatureLogitsView | None = Field(
        default=None, description="Its logit effects; null when the model has no unembedding."
    )
    family: FamilyView | None = Field(
        default=None, description="Its family; null when the explorer has no label contexts."
    )
    dashboard: str | None = Field(
        default=None, description="Link to its dashboard page, where one was given."
    )


class LogitChange(BaseModel):
    """A token's logit and probability at the position, before and after the ablation."""

    token: str
    token_id: int
    before: float = Field(description="Its logit in the model's own run.")
    after: float = Field(description="Its logit with the feature zero-ablated.")
    prob_before: float = Field(description="Its probability in the model's own run.")
    prob_after: float = Field(description="Its probability with the feature zero-ablated.")


class AblateResponse(BaseModel):
    """The next-token prediction at a position before and after zero-ablating one feature there,
    with the SAE spliced and its error term kept (z' = z − a_f·W_dec[f] at that position only)."""

    layer: int
    feature: int
    position: int = Field(description="Where the feature was ablated and the logits are read.")
    token: str = Field(description="The token at that position.")
    activation: float = Field(
        description="The feature's activation there; 0 means the ablation changes nothing."
    )
    next_token: LogitChange | None = Field(
        default=None,
        description="The prompt's own next token, where the position has one (null at the end).",
    )
    before: list[LogitChange] = Field(description="The k most likely tokens before, best first.")
    after: list[LogitChange] = Field(description="The k most likely tokens after, best first.")
    lowered: list[LogitChange] = Field(description="The k tokens whose logits fell most.")
    raised: list[LogitChange] = Field(description="The k tokens whose logits rose most.")


class LayerInfo(BaseModel):
    """One loaded SAE."""

    layer: int
    hook_name: str
    d_sae: int
    n_heads: int
    dashboards: bool = Field(description="Whether a dashboard folder was given for this layer.")


class InfoResponse(BaseModel):
    """``GET /api/info``: what the explorer serves."""

    model: str = Field(description="The model's name.")
    backend: str = Field(description="The backend running it (transformer_lens, nnsight, ...).")
    layers: list[LayerInfo]
    context: int | None = Field(description="Most tokens a prompt may have, BOS included.")
    top_k: int
    families: bool = Field(description="Whether family labels are computed.")
    max_body_bytes: int = Field(description="Largest request body accepted.")


class ErrorResponse(BaseModel):
    """Every error: what was wrong, and which check refused it."""

    error: str = Field(description="What was expected, what was given, and the valid choices.")
    kind: str = Field(description="The check: empty_prompt, prompt_too_long, unknown_layer, ...")
