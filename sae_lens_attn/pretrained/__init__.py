"""Pretrained attention SAEs: releases in SAELens's directory, converters, and publishing.

``register_pretrained()`` runs at ``import sae_lens_attn``; after it,
``SAE.from_pretrained("gpt2-small-attn-z", "blocks.5")`` loads Kissane et al.'s layer-5 SAE with
the attention metadata. See ``directory`` for the release sources and ``publish`` for writing
releases of one's own.
"""

from sae_lens_attn.pretrained.directory import (
    RELEASES_ENV_VAR,
    attention_releases,
    get_release,
    list_releases,
    register_pretrained,
    register_release,
    unregister_release,
)
from sae_lens_attn.pretrained.hub import push_to_hub
from sae_lens_attn.pretrained.kissane import KISSANE_CONVERSION_FUNC
from sae_lens_attn.pretrained.metrics import REPORTED_METRICS, SAEMetrics, measure
from sae_lens_attn.pretrained.publishing import PublishResult, publish
from sae_lens_attn.pretrained.releases import (
    Release,
    ReleaseSAE,
    dump_releases_yaml,
    parse_releases_yaml,
    read_releases_file,
)

__all__ = [
    "KISSANE_CONVERSION_FUNC",
    "RELEASES_ENV_VAR",
    "REPORTED_METRICS",
    "PublishResult",
    "Release",
    "ReleaseSAE",
    "SAEMetrics",
    "attention_releases",
    "dump_releases_yaml",
    "get_release",
    "list_releases",
    "measure",
    "parse_releases_yaml",
    "publish",
    "push_to_hub",
    "read_releases_file",
    "register_pretrained",
    "register_release",
    "unregister_release",
]
