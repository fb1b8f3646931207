"""What a pull request adding a release to SAELens needs: its YAML entry and its loader test.

See ``docs/upstream.md``. ``publish`` writes both under ``upstream/`` of the published folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sae_lens.loading.pretrained_sae_loaders import (
    get_sae_lens_config_from_disk,
    handle_config_defaulting,
)

from sae_lens_attn.pretrained.releases import Release, dump_releases_yaml
from sae_lens_attn.site import AttnSite

UPSTREAM_DIR = "upstream"
"""Folder of the published release holding the material for SAELens (never uploaded)."""
YAML_ENTRY_FILE = "pretrained_saes.yaml"
"""The release's entry, to paste into SAELens's ``sae_lens/pretrained_saes.yaml``."""


def yaml_entry_text(release: Release, *, tool: str) -> str:
    """The release's entry for SAELens's ``pretrained_saes.yaml``, with a header comment."""
    header = (
        f"# Entry for SAELens's sae_lens/pretrained_saes.yaml, written by {tool}.\n"
        "# Also a releases file for sae_lens_attn: SAE_LENS_ATTN_RELEASES=<this file>.\n"
    )
    return header + dump_releases_yaml([release])


def loader_test_name(release: Release) -> str:
    """File name of the release's loader test, ``test_<release>.py``."""
    return f"test_{_snake(release.name)}.py"


def expected_loader_config(release: Release, sae_id: str, sae_folder: Path) -> dict[str, Any]:
    """What SAELens's ``load_sae_config_from_huggingface(release, sae_id)`` returns once the
    release is in its YAML, computed with SAELens's own functions from the published folder.

    Only releases in SAELens's native format (``conversion_func`` null) are supported.
    """
    if release.conversion_func not in (None, "sae_lens"):
        raise ValueError(
            f"expected a release in SAELens's native format (conversion_func null or 'sae_lens'), "
            f"got {release.conversion_func!r}"
        )
    lookup = release.to_lookup()
    # SAELens passes the release's config_overrides plus the SAE's neuronpedia id (even None).
    overrides: dict[str, Any] = {**(lookup.config_overrides or {})}
    if sae_id in lookup.neuronpedia_id:
        overrides["neuronpedia_id"] = lookup.neuronpedia_id[sae_id]
    return handle_config_defaulting(get_sae_lens_config_from_disk(sae_folder, "cpu", overrides))


def loader_test_source(
    release: Release, sae_id: str, expected_cfg: dict[str, Any], site: AttnSite, *, tool: str
) -> str:
    """A pytest module in the style of SAELens's ``tests/loading/test_pretrained_sae_loaders.py``:
    the config SAELens loads for ``sae_id``, and a hook_z-shaped forward pass."""
    snake = _snake(release.name)
    name, first = json.dumps(release.name), json.dumps(sae_id)
    expected = _python_literal(expected_cfg, indent=4)
    return f'''"""Loader tests for the {release.name} release ({release.repo_id}).

Written by {tool},
for SAELens's tests/loading/test_pretrained_sae_loaders.py. They download {sae_id}
from the Hugging Face Hub.
"""

import torch

from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
from sae_lens.saes.sae import SAE


def test_load_sae_config_from_huggingface_{snake}():
    cfg_dict = load_sae_config_from_huggingface({name}, sae_id={first})

    expected_cfg_dict = {expected}

    assert cfg_dict == expected_cfg_dict


def test_{snake}_runs_on_hook_z_shaped_input():
    sae = SAE.from_pretrained({name}, {first})
    sae_in = torch.randn(1, 4, {site.n_heads}, {site.d_head})
    assert sae(sae_in).shape == sae_in.shape
'''


def _python_literal(value: Any, indent: int) -> str:
    """``value`` (JSON data) as Python source laid out as ruff formats it, one key per line."""
    pad = " " * (indent + 4)
    if isinstance(value, dict) and value:
        items = "".join(
            f"{pad}{json.dumps(k)}: {_python_literal(v, indent + 4)},\n" for k, v in value.items()
        )
        return "{\n" + items + " " * indent + "}"
    if isinstance(value, list) and value:
        items = "".join(f"{pad}{_python_literal(v, indent + 4)},\n" for v in value)
        return "[\n" + items + " " * indent + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
