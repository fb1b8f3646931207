"""The prompt explorer in a real browser: headless Chromium through Playwright, against the
server on loopback and against a static export opened from disk."""

from __future__ import annotations

from typing import Any

import pytest

from sae_lens_attn.explorer import create_app, export_prompts, serving

from .browser import chromium, needs_browser, open_page, save_screenshot, watched
from .factories import PROMPT, PROMPTS, default_session

pytestmark = [pytest.mark.browser, pytest.mark.slow, needs_browser]


@pytest.fixture(scope="module")
def session() -> Any:
    return default_session()


def test_explorer_page_runs_a_prompt_and_shows_dfa(session, tmp_path) -> None:
    run = session.run(PROMPT)
    position = 9  # a position past the first line
    feature = run.layers["1"][position][0].feature
    with serving(create_app(session)) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        watch = watched(page)
        page.goto(f"{url}/")
        page.wait_for_function("() => document.getElementById('search-layer').options.length === 2")
        page.fill("#prompt", PROMPT)
        page.click("#run")
        page.wait_for_selector("#feature-table .feature")
        assert page.locator("#tokens .token").count() == len(run.tokens)

        page.click(
            f'#feature-table tr[data-position="{position}"] .feature[data-layer="1"] >> nth=0'
        )
        page.wait_for_selector("#dfa-panel:not([hidden]) #dfa-heads")
        summary = page.inner_text("#dfa-summary")
        assert f"at position {position}" in summary
        assert page.inner_text("#dfa-panel h2") == f"Layer 1 · feature {feature}"
        heads = page.locator("#dfa-heads .bar").count()
        assert heads == session.sites[1].n_heads
        # DFA highlighted in the prompt: the prompt's own tokens are coloured by source
        coloured = page.eval_on_selector_all(
            "#tokens .token", "els => els.filter(e => e.style.background !== '').length"
        )
        assert coloured == len(run.tokens)
        assert page.locator("#feature-logits li").count() == 2 * session.logits_k
        assert page.locator("#feature-family .family").count() == 1
        save_screenshot(page.screenshot(full_page=True), tmp_path / "explorer.png")

        page.click(f'#tokens .token[data-position="{position}"]')  # all layers at one token
        page.wait_for_selector("#token-panel:not([hidden])")
        assert page.locator("#token-panel h3").all_inner_texts() == ["layer 0", "layer 1"]

        page.fill("#search-feature", str(feature + 1))  # feature search by index
        page.select_option("#search-layer", "0")
        page.click("#search-go")
        page.wait_for_function(  # a function, not a string: the page's CSP forbids eval
            "title => document.querySelector('#dfa-panel h2').textContent === title",
            arg=f"Layer 0 · feature {feature + 1}",
        )

        assert watch.errors == []
        page.fill("#prompt", "")  # an empty prompt: the server's message, shown on the page
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        assert "empty" in page.inner_text("#error")
    # Chromium logs the refusal's HTTP status itself; the page logs nothing
    assert [e for e in watch.errors if "status of 422" not in e] == []
    assert watch.requests_outside(url) == []
    assert {r.split(url)[1] for r in watch.requests} >= {"/", "/api/run", "/api/feature"}


EXPORTED = """(async () => {
  const before = document.querySelectorAll('#feature-table .feature').length;
  document.querySelector('#feature-table tr[data-position="5"] .feature').click();
  for (let i = 0; i < 50 && document.getElementById('dfa-panel').hidden; i++)
    await new Promise(r => setTimeout(r, 20));
  return {chips: before, dfa: !document.getElementById('dfa-panel').hidden,
          heads: document.querySelectorAll('#dfa-heads .bar').length,
          error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent};
})()"""


def test_static_export_opens_from_disk(session, tmp_path) -> None:
    export = export_prompts(session, PROMPTS[:2], tmp_path / "export")
    report = open_page(export.pages[0], EXPORTED)
    save_screenshot(report.screenshot, tmp_path / "explorer_export.png")
    assert report.errors == ()
    assert report.remote_requests == ()
    assert report.check["chips"] > 0 and report.check["error"] is None, report.check
    assert report.check["dfa"] and report.check["heads"] == session.sites[1].n_heads
