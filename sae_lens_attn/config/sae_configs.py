"""Attention SAE training configs, registered with SAELens as ``attn_standard``, ``attn_topk``, ...

Each is the SAELens training config of its base architecture plus the head structure. Trained
through SAELens's own runner or trainer, the SAE is saved as a plain SAELens SAE of the base
inference architecture with ``reshape_activations="hook_z"`` and the attention metadata, so vanilla
SAELens loads it and splices it at hook_z.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainStepInput, TrainStepOutput

from sae_lens_attn.config.metadata import (
    attention_metadata,
    check_hf_architecture,
    check_value_bias_convention,
    recorded_site,
)
from sae_lens_attn.site import AttnSite, ValueBiasConvention, convention_of_model_kwargs
from sae_lens_attn.validation import check_count

AttnArchitecture = Literal["standard", "topk", "jumprelu", "batchtopk"]
"""Base SAELens architectures with an attention variant; its registered name is ``attn_<base>``."""


@dataclass(kw_only=True)
class AttnTrainingFields:
    """Head structure and conventions shared by every attention training config."""

    n_heads: int
    """Number of query heads in z; ``d_in`` must be ``n_heads * d_head``."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); defaults to ``n_heads``."""
    value_bias_convention: ValueBiasConvention | None = None
    """Whether the training z carries ``b_V + β·W_V``. ``None``: read it off the runner's model
    kwargs (see ``convention_of_model_kwargs``)."""
    hf_architecture: str | None = None
    """Hugging Face class of the model (e.g. ``GPT2LMHeadModel``), to record the module path."""
    reshape_activations: Literal["none", "hook_z"] = field(default="hook_z")
    """Saved SAEs reshape ``[..., n_heads, d_head]`` at hook_z; always ``"hook_z"`` here."""

    base_architecture: ClassVar[str]
    inference_architecture: ClassVar[str]
    fractional_k: ClassVar[bool] = False
    """Whether ``k`` (TopK-style configs) may be fractional: BatchTopK's is a mean per token."""

    @classmethod
    def architecture(cls) -> str:
        return f"attn_{cls.base_architecture}"

    def __post_init__(self) -> None:
        self._check_counts()
        super().__post_init__()  # type: ignore[misc]
        d_in: int = self.d_in  # type: ignore[attr-defined]
        if not isinstance(self.n_heads, int) or self.n_heads < 1 or d_in % self.n_heads:
            raise ValueError(
                f"d_in={d_in} is not n_heads*d_head for n_heads={self.n_heads!r}: an attention "
                "SAE reads z with every head's d_head block concatenated"
            )
        source = f"{self.architecture()} config"
        check_value_bias_convention(self.value_bias_convention, source)
        if self.reshape_activations != "hook_z":
            raise ValueError(
                f"attention SAEs use reshape_activations='hook_z', got {self.reshape_activations!r}"
            )
        if self.hf_architecture is not None:
            check_hf_architecture(self.hf_architecture, source)
        self.site_for(self.metadata.hook_name)  # type: ignore[attr-defined]

    def _check_counts(self) -> None:
        """``d_in`` and ``d_sae`` are counts; a TopK-style ``k`` is in ``1..d_sae``."""
        cfg: Any = self
        cfg.d_in = check_count("d_in", cfg.d_in)
        cfg.d_sae = check_count("d_sae", cfg.d_sae)
        if not hasattr(cfg, "k"):
            return
        if not self.fractional_k:
            cfg.k = check_count("k", cfg.k)
        elif isinstance(cfg.k, bool) or not isinstance(cfg.k, int | float) or not cfg.k > 0:
            raise ValueError(
                f"k must be a number > 0 (mean active features per token), got {cfg.k!r}"
            )
        if cfg.k > cfg.d_sae:
            raise ValueError(
                f"k={cfg.k} exceeds d_sae={cfg.d_sae}: the SAE keeps k of its d_sae features "
                "active per token; choose k <= d_sae"
            )

    def site_for(self, hook_name: str | None) -> AttnSite | None:
        """The site this config trains on at ``hook_name`` (``None`` while it is unknown).

        Raises:
            ValueError: ``hook_name`` is not a hook_z name, or the head structure is not a site.
        """
        if hook_name is None:
            return None
        d_in: int = self.d_in  # type: ignore[attr-defined]
        return recorded_site(AttnSite.layer_of(hook_name), d_in, self.n_heads, self.n_kv_heads)

    def get_inference_config_class(self) -> type[SAEConfig]:
        return get_sae_class(self.inference_architecture)[1]

    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        cfg: dict[str, Any] = super().get_inference_sae_cfg_dict()  # type: ignore[misc]
        cfg["reshape_activations"] = "hook_z"
        cfg["metadata"].update(self.attention_metadata())
        return cfg

    def attention_metadata(self) -> dict[str, Any]:
        """The metadata an attention SAE is saved with (see DESIGN: config)."""
        meta = self.metadata  # type: ignore[attr-defined]
        site = self.site_for(meta.hook_name)
        if site is None:
            raise ValueError("cannot save an attention SAE whose metadata has no hook_name")
        kwargs = meta.model_from_pretrained_kwargs or {}
        return attention_metadata(
            site,
            self.value_bias_convention or convention_of_model_kwargs(kwargs),
            hf_architecture=self.hf_architecture,
            model_from_pretrained_kwargs=kwargs,
        )


@dataclass(kw_only=True)
class AttnStandardTrainingSAEConfig(AttnTrainingFields, StandardTrainingSAEConfig):
    """Standard (ReLU + L1) SAE on hook_z."""

    base_architecture: ClassVar[str] = "standard"
    inference_architecture: ClassVar[str] = "standard"


@dataclass(kw_only=True)
class AttnTopKTrainingSAEConfig(AttnTrainingFields, TopKTrainingSAEConfig):
    """TopK SAE on hook_z."""

    base_architecture: ClassVar[str] = "topk"
    inference_architecture: ClassVar[str] = "topk"


@dataclass(kw_only=True)
class AttnJumpReLUTrainingSAEConfig(AttnTrainingFields, JumpReLUTrainingSAEConfig):
    """JumpReLU SAE on hook_z."""

    base_architecture: ClassVar[str] = "jumprelu"
    inference_architecture: ClassVar[str] = "jumprelu"


@dataclass(kw_only=True)
class AttnBatchTopKTrainingSAEConfig(AttnTrainingFields, BatchTopKTrainingSAEConfig):
    """BatchTopK SAE on hook_z; saved as JumpReLU, as SAELens saves BatchTopK."""

    base_architecture: ClassVar[str] = "batchtopk"
    inference_architecture: ClassVar[str] = "jumprelu"
    fractional_k: ClassVar[bool] = True


class AttnTrainingChecks:
    """Checks, at the first training step, that the runner's hook is a hook_z of this SAE's shape.

    SAELens's runner sets ``metadata.hook_name`` only when ``run()`` starts, so this is the
    earliest point the hook is known.
    """

    _site_checked: bool = False

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self._site_checked:
            cfg: Any = self.cfg  # type: ignore[attr-defined]
            cfg.site_for(cfg.metadata.hook_name)
            self._site_checked = True
        return super().training_forward_pass(step_input)  # type: ignore[misc]


class AttnStandardTrainingSAE(AttnTrainingChecks, StandardTrainingSAE):
    """``StandardTrainingSAE`` on hook_z."""


class AttnTopKTrainingSAE(AttnTrainingChecks, TopKTrainingSAE):
    """``TopKTrainingSAE`` on hook_z."""


class AttnJumpReLUTrainingSAE(AttnTrainingChecks, JumpReLUTrainingSAE):
    """``JumpReLUTrainingSAE`` on hook_z."""


class AttnBatchTopKTrainingSAE(AttnTrainingChecks, BatchTopKTrainingSAE):
    """``BatchTopKTrainingSAE`` on hook_z."""


AttnTrainingSAEConfig = (
    AttnStandardTrainingSAEConfig
    | AttnTopKTrainingSAEConfig
    | AttnJumpReLUTrainingSAEConfig
    | AttnBatchTopKTrainingSAEConfig
)
"""Any attention training config: a SAELens ``TrainingSAEConfig`` with ``AttnTrainingFields``."""

ATTN_TRAINING_CLASSES: dict[str, tuple[type[TrainingSAE[Any]], type[AttnTrainingSAEConfig]]] = {
    cfg_cls.architecture(): (sae_cls, cfg_cls)
    for sae_cls, cfg_cls in [
        (AttnStandardTrainingSAE, AttnStandardTrainingSAEConfig),
        (AttnTopKTrainingSAE, AttnTopKTrainingSAEConfig),
        (AttnJumpReLUTrainingSAE, AttnJumpReLUTrainingSAEConfig),
        (AttnBatchTopKTrainingSAE, AttnBatchTopKTrainingSAEConfig),
    ]
}
"""Registered name (``attn_<base>``) → (training SAE class, training config class)."""
