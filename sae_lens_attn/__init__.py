"""sae-lens-attn: sparse autoencoders on attention layer outputs (hook_z) for SAELens.

Importing the package registers the ``attn_*`` training architectures with SAELens, and its
pretrained releases (``gpt2-small-attn-z``, and ``stdlib-2l-attn-z`` of the embedded default
model) and converters with SAELens's pretrained directory and
loader tables (idempotent, no network), and changes nothing else: nnsight (whose default
configuration adds ``save`` to every object) is imported only when a Hugging Face model first
meets a backend, and plots never switch matplotlib's backend.
"""

from typing import TYPE_CHECKING, Any

from sae_lens_attn import analysis
from sae_lens_attn.backends import SUPPORTED_MODEL_TYPES, AttnBackend, AttnCapture, backend_for
from sae_lens_attn.backends.hooked import HookedHFModel, hooked
from sae_lens_attn.backends.transformer_lens import TransformerLensBackend
from sae_lens_attn.config.registration import register_training_classes
from sae_lens_attn.config.sae_configs import (
    AttnBatchTopKTrainingSAEConfig,
    AttnJumpReLUTrainingSAEConfig,
    AttnStandardTrainingSAEConfig,
    AttnTopKTrainingSAEConfig,
)
from sae_lens_attn.default_model import load_default_model, register_default_release
from sae_lens_attn.evaluation import Evaluation, evaluate
from sae_lens_attn.pretrained import (
    RELEASES_ENV_VAR,
    PublishResult,
    Release,
    ReleaseSAE,
    SAEMetrics,
    get_release,
    list_releases,
    publish,
    register_pretrained,
    register_release,
    unregister_release,
)
from sae_lens_attn.site import AttnSite, ValueBiasConvention
from sae_lens_attn.store import AttnActivationStore, TokenBatches
from sae_lens_attn.training.resampling import (
    ResampleSchedule,
    ResampleWarmupLR,
    cosine_warmup_factor,
    resample_dead_features,
    select_dead_features,
)
from sae_lens_attn.training.train import attn_sae_training_config, train_attn_saes

if TYPE_CHECKING:
    from sae_lens_attn.backends.nnsight import NNsightBackend

__version__ = "0.1.0"

register_training_classes()
register_pretrained()
register_default_release()

__all__ = [
    "RELEASES_ENV_VAR",
    "SUPPORTED_MODEL_TYPES",
    "AttnActivationStore",
    "AttnBackend",
    "AttnBatchTopKTrainingSAEConfig",
    "AttnCapture",
    "AttnJumpReLUTrainingSAEConfig",
    "AttnSite",
    "AttnStandardTrainingSAEConfig",
    "AttnTopKTrainingSAEConfig",
    "Evaluation",
    "HookedHFModel",
    "NNsightBackend",
    "PublishResult",
    "Release",
    "ReleaseSAE",
    "ResampleSchedule",
    "ResampleWarmupLR",
    "SAEMetrics",
    "TokenBatches",
    "TransformerLensBackend",
    "ValueBiasConvention",
    "__version__",
    "analysis",
    "attn_sae_training_config",
    "backend_for",
    "cosine_warmup_factor",
    "evaluate",
    "get_release",
    "hooked",
    "list_releases",
    "load_default_model",
    "publish",
    "register_release",
    "resample_dead_features",
    "select_dead_features",
    "train_attn_saes",
    "unregister_release",
]


def __getattr__(name: str) -> Any:
    """``NNsightBackend`` on first use: importing it imports nnsight."""
    if name == "NNsightBackend":
        from sae_lens_attn.backends.nnsight import NNsightBackend

        return NNsightBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
