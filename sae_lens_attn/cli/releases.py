"""``sae-lens-attn releases``: the attention releases registered with SAELens and their SAE ids."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "releases",
        help="list the attention releases registered with SAELens and their SAE ids",
        description="List the releases this package registers in SAELens's pretrained directory "
        "(its own, those of register_release and of the files named by SAE_LENS_ATTN_RELEASES) "
        "with their SAE ids, as SAE.from_pretrained(RELEASE, ID) takes them. Given names, show "
        "those releases only (SAELens's own releases too).",
    )
    parser.add_argument("names", nargs="*", metavar="RELEASE", help="releases to show")
    parser.add_argument("--json", action="store_true", help="print {release: [ids]} as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_lens_attn.pretrained.directory import attention_releases, get_release

    if args.names:
        releases = {name: get_release(name) for name in args.names}  # unknown: lists the valid
    else:
        releases = dict(sorted(attention_releases().items()))
    if args.json:
        print(json.dumps({name: release.ids for name, release in releases.items()}, indent=1))
        return 0
    for name, release in releases.items():
        print(f"{name}  (model {release.model}, https://huggingface.co/{release.repo_id})")
        print(f"  {len(release.ids)} SAEs: {', '.join(release.ids)}")
    return 0
