"""Static export: the explorer's views for a list of prompts, as HTML pages that open from disk.

Each page is the served page with its script and style inlined and the API's answers embedded:
the run of its prompt and, for every feature shown at a position (and at the position where it
is most active), that feature's detail there. A Content-Security-Policy forbids every request,
so the pages make none.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_lens_attn.analysis import dfa
from sae_lens_attn.explorer.app import ASSETS
from sae_lens_attn.explorer.session import ExplorerSession, RequestRefused
from sae_lens_attn.outputs import atomic_output

OUTPUT_KIND = "explorer-export"
"""Kind of output folder an export writes (see ``sae_lens_attn.outputs``)."""
EXPORT_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)
"""Content-Security-Policy of an exported page: inline code only, no requests."""
_STYLE_TAG = '<link rel="stylesheet" href="/static/explorer.css">'
_SCRIPT_TAG = '<script src="/static/explorer.js"></script>'


@dataclass(frozen=True)
class Export:
    """What an export wrote."""

    out_dir: Path
    """The folder."""
    index: Path
    """``index.html``, linking every prompt's page."""
    pages: tuple[Path, ...]
    """One page per prompt, in order."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a ``.json`` list of strings, else one prompt per non-empty line.

    Raises:
        ValueError: a ``.json`` file that is not a non-empty list of strings, or a file with
            no prompts.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{str(path)!r} must hold a JSON list of prompt strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{str(path)!r} holds no prompts")
    return prompts


def export_prompts(
    session: ExplorerSession, prompts: Sequence[str], out: str | Path, *, overwrite: bool = False
) -> Export:
    """Write one self-contained page per prompt, and an index, into ``out``.

    Every prompt is checked before anything is written.

    Raises:
        ValueError: no prompts, or a prompt the explorer refuses (empty, longer than the
            context); the message names the prompt's number.
        FileExistsError: ``out`` may not be written (``sae_lens_attn.outputs.check_output``).
    """
    if not prompts:
        raise ValueError("no prompts to export: give at least one")
    for number, prompt in enumerate(prompts, start=1):
        try:
            session.tokenize(prompt)
        except RequestRefused as err:
            raise ValueError(f"prompt {number} ({prompt[:40]!r}): {err}") from None
    out = Path(out)
    names = [f"prompt_{number}.html" for number in range(1, len(prompts) + 1)]
    listing = [{"title": f"{n + 1}", "href": name} for n, name in enumerate(names)]
    template = _template()
    with atomic_output(out, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
        for prompt, name in zip(prompts, names, strict=True):
            data = prompt_data(session, prompt, out_dir=out.resolve())
            data["pages"] = listing
            (tmp / name).write_text(_page(template, data), encoding="utf-8")
        (tmp / "index.html").write_text(_index(prompts, names), encoding="utf-8")
    return Export(out, out / "index.html", tuple(out / name for name in names))


def prompt_data(session: ExplorerSession, prompt: str, *, out_dir: Path) -> dict[str, Any]:
    """What a page embeds for ``prompt``: the info, the run, and the shown features' details.

    ``features["L:F"]`` holds what does not depend on the position (activations, logits,
    family, dashboard link relative to ``out_dir``), ``positions["L:F"][q]`` the DFA at ``q``.
    """
    run = session.run(prompt)
    tokens = session.tokenize(prompt)
    features: dict[str, Any] = {}
    positions: dict[str, dict[int, Any]] = {}
    for layer_key, per_position in run.layers.items():
        layer = int(layer_key)
        shown = sorted({item.feature for items in per_position for item in items})
        if not shown:
            continue
        with session.guarded():
            result = dfa(session.backend, session.saes[layer], tokens, features=shown)
            extras = [(session.feature_logits(layer, f), session.family(layer, f)) for f in shown]
        at_positions: dict[int, set[int]] = {f: set() for f in shown}
        for q, items in enumerate(per_position):
            for item in items:
                at_positions[item.feature].add(q)
        for column, (feature, (logits, family)) in enumerate(zip(shown, extras, strict=True)):
            peak = int(result.acts[0, :, column].argmax())
            details = {
                q: session.detail(tokens, layer, result, column, q, logits=logits, family=family)
                for q in sorted(at_positions[feature] | {peak})
            }
            key = f"{layer}:{feature}"
            first = next(iter(details.values()))
            page = session.dashboard_page(layer, feature)
            link = None if page is None else Path(os.path.relpath(page, out_dir)).as_posix()
            features[key] = {
                "activations": _rounded(first.activations),
                "bias": first.bias,
                "logits": None if logits is None else logits.model_dump(),
                "family": None if family is None else family.model_dump(),
                "dashboard": link,
            }
            positions[key] = {
                q: {
                    "activation": d.activation,
                    "pre_act": d.pre_act,
                    "by_src": _rounded(d.by_src),
                    "by_head": _rounded(d.by_head),
                }
                for q, d in details.items()
            }
    return {
        "info": session.info().model_dump(),
        "prompt": prompt,
        "run": run.model_dump(),
        "features": features,
        "positions": positions,
    }


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.5g}") for v in values]


def _template() -> str:
    page = (ASSETS / "index.html").read_text(encoding="utf-8")
    for tag in (_STYLE_TAG, _SCRIPT_TAG):
        if tag not in page:
            raise RuntimeError(f"the explorer's index.html lacks {tag!r}, which export replaces")
    return page


def _page(template: str, data: dict[str, Any]) -> str:
    css = (ASSETS / "explorer.css").read_text(encoding="utf-8")
    script = (ASSETS / "explorer.js").read_text(encoding="utf-8").replace("</script", "<\\/script")
    embedded = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    csp = f'<meta http-equiv="Content-Security-Policy" content="{EXPORT_CSP}">'
    return (
        template.replace('<meta charset="utf-8">', f'<meta charset="utf-8">\n{csp}')
        .replace(_STYLE_TAG, f"<style>\n{css}</style>")
        .replace(
            _SCRIPT_TAG,
            f'<script type="application/json" id="explorer-data">{embedded}</script>\n'
            f"<script>\n{script}</script>",
        )
    )


def _index(prompts: Sequence[str], names: Sequence[str]) -> str:
    items = "\n".join(
        f'<li><a href="{name}">{html.escape(prompt[:120])}</a></li>'
        for prompt, name in zip(prompts, names, strict=True)
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{EXPORT_CSP}">\n'
        '<link rel="icon" href="data:,"><title>Prompt explorer: exported prompts</title></head>\n'
        f"<body><h1>Prompt explorer: exported prompts</h1><ol>\n{items}\n</ol></body></html>\n"
    )
