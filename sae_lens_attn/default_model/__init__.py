"""The embedded default model: a 2-layer attention-only transformer trained on the Python standard
library, its byte-level BPE tokenizer, and its attention SAEs (release ``stdlib-2l-attn-z``).

Everything is shipped inside the package and loads offline: ``sla.load_default_model()`` and
``SAE.from_pretrained("stdlib-2l-attn-z", "blocks.1")``. ``recipes/train_default_model.py`` makes
the files; ``metrics.json`` beside them records their quality on held-out files.
"""

from sae_lens_attn.default_model import corpus
from sae_lens_attn.default_model.metrics import read_metrics, write_metrics
from sae_lens_attn.default_model.model import (
    MODEL_NAME,
    PACKAGE_DIR,
    load_default_model,
    save_default_model,
    write_checksums,
)
from sae_lens_attn.default_model.release import (
    PACKAGED_CONVERSION_FUNC,
    RELEASE_NAME,
    default_release,
    register_default_release,
)

__all__ = [
    "MODEL_NAME",
    "PACKAGED_CONVERSION_FUNC",
    "PACKAGE_DIR",
    "RELEASE_NAME",
    "corpus",
    "default_release",
    "load_default_model",
    "read_metrics",
    "register_default_release",
    "save_default_model",
    "write_checksums",
    "write_metrics",
]
