"""The default model's metrics file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_lens_attn.default_model.model import METRICS_FILE, PACKAGE_DIR, read_json


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as JSON."""
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def read_metrics(directory: str | Path | None = None) -> dict[str, Any]:
    """The metrics shipped with the default model (or written to ``directory`` by the recipe)."""
    return read_json((PACKAGE_DIR if directory is None else Path(directory)) / METRICS_FILE)
