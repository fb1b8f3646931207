"""Dashboard pages of the embedded default model in Chromium: they fit the window (no horizontal
scrolling) at a desktop and at a narrow width, with its byte-level tokens shown readably."""

from __future__ import annotations

import inspect
import json.decoder
import re
from pathlib import Path
from typing import Any

import pytest
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn.default_model import RELEASE_NAME
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.viz.dashboard import build_dashboard

from .browser import chromium, needs_browser, save_screenshot

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (1280, 800)
CODE = inspect.getsource(json.decoder)
FITS = "({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})"


def default_model_board(folder: Path, text: str) -> Any:
    """A dashboard of the shipped layer-1 SAE on ``text`` in 128-token contexts of byte-level
    tokens, with long index columns."""
    model, tokenizer = sla.load_default_model()
    tokens = TokenBatches.from_texts(
        tokenizer, [text], context_size=model.cfg.n_ctx, batch_size=8
    ).tokens[:8]
    sae = SAE.from_pretrained(RELEASE_NAME, "blocks.1")
    reasons = {
        f: f"a rather long reason why feature {f} is shown on this dashboard" for f in (0, 1)
    }
    return build_dashboard(
        model, sae, tokens, folder, features=[0, 1], tokenizer=tokenizer, engine="own",
        progress=False,
        index_columns={"shown because": reasons, "induction verdict": dict.fromkeys((0, 1), "control")},
    )  # fmt: skip


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Any:
    """Real code: leading spaces, newlines, indentation."""
    return default_model_board(tmp_path_factory.mktemp("code") / "d", CODE)


@pytest.fixture(scope="module")
def one_line_board(tmp_path_factory) -> Any:
    """The same code on one line: every context is a row of 128 tokens with no line break, the
    widest row a page can get."""
    return default_model_board(tmp_path_factory.mktemp("line") / "d", " ".join(CODE.split()))


def test_byte_level_tokens_render_as_visible_whitespace(board) -> None:
    text = board.pages[0].read_text()
    shown = re.findall(r"<span title=\"pos \d+: [^\"]*\"[^>]*>([^<]*)</span>", text)
    assert shown, "no token spans on the page"
    assert not [t for t in shown if " " in t or "\t" in t], "a space or tab shown as blank"
    assert not [t for t in shown if t.count("\n") != t.count("⏎\n")], "an unmarked newline"
    assert any(t.startswith("·") and len(t) > 1 for t in shown)  # a space-led word: ' def' etc.
    assert any("⏎" in t for t in shown)  # source code has newlines


@pytest.mark.browser
@needs_browser
def test_index_and_feature_pages_fit_the_window(one_line_board) -> None:
    pages = {"index": one_line_board.index, "feature": one_line_board.pages[0]}
    with chromium() as browser:
        for width in WIDTHS:
            tab = browser.new_page(viewport={"width": width, "height": 900})
            for name, page in pages.items():
                tab.goto(page.resolve().as_uri(), wait_until="load")
                size = tab.evaluate(FITS)
                shot = tab.screenshot(full_page=True)
                save_screenshot(shot, REPO / "out" / "screenshots" / f"fit_{name}_{width}.png")
                assert size["scroll"] <= size["inner"], (name, width, size)
            tab.close()
