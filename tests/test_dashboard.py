"""Feature dashboards: SAEDashboard with our panels on TransformerLens, ours on Hugging Face models,
offline; and in a real browser where Chromium is installed."""

from __future__ import annotations

import importlib.util
import inspect
import json.decoder
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer
from transformers import AutoTokenizer

import sae_lens_attn as sla
from sae_lens_attn import AttnSite
from sae_lens_attn.cli.main import main
from sae_lens_attn.outputs import OUTPUT_MARKER
from sae_lens_attn.viz.dashboard import build_dashboard, collect, saedashboard

from .browser import needs_browser, open_page, save_screenshot
from .factories import build_model, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
needs_saedashboard = pytest.mark.skipif(
    not saedashboard.installed(),
    reason="SAEDashboard is not installed (the saedashboard extra, oldest stack only)",
)
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)
RENDERED = """(() => {
  const drawn = id => { const el = document.getElementById(id); if (!el) return false;
    const box = el.getBoundingClientRect();
    return box.width > 0 && box.height > 0 &&
      [...el.querySelectorAll('rect')].some(r => r.getBoundingClientRect().width > 0); };
  return {dfa: drawn('dfa-panel'), heads: drawn('head-attribution-panel'),
          saedashboard_columns: document.querySelectorAll('.grid-column').length,
          plotly_plots: document.querySelectorAll('.js-plotly-plot').length};
})()"""


@pytest.fixture(scope="module")
def tl_model(tmp_path_factory) -> HookedTransformer:
    """The test model with a tokenizer (SAEDashboard decodes tokens with it)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(VOCAB_SIZE).save_pretrained(folder)
    model = build_model()
    model.set_tokenizer(AutoTokenizer.from_pretrained(folder))
    return model


def prompts(rows: int = 16, ctx: int = 16) -> torch.Tensor:
    tokens = torch.randint(2, VOCAB_SIZE, (rows, ctx), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 0
    return tokens


def no_external_resources(folder: Path) -> None:
    for page in folder.glob("*.html"):
        match = EXTERNAL.search(page.read_text())
        assert match is None, f"{page.name} loads {match and match.group(0)}"


@needs_saedashboard
def test_transformer_lens_pages_are_saedashboards_with_our_panels(tl_model, tmp_path) -> None:
    sae = random_sae(AttnSite.from_model(tl_model, 1), value_bias_convention="included")
    board = build_dashboard(tl_model, sae, prompts(), tmp_path / "d", top=2, progress=False)
    assert board.engine == "saedashboard" and board.note == ""
    assert sorted(p.name for p in (tmp_path / "d" / "assets").iterdir()) == [
        "LICENSE.d3", "d3.v6.min.js", "plotly.min.js",
    ]  # fmt: skip
    for feature, page in board.pages.items():
        text = page.read_text()
        assert 'class="grid-container"' in text.replace("'", '"')  # SAEDashboard's grid
        assert 'src="assets/d3.v6.min.js"' in text and 'src="assets/plotly.min.js"' in text
        assert 'id="dfa-panel"' in text and 'id="head-attribution-panel"' in text
        assert f'href="feature_{feature}.html"' in board.index.read_text()
    no_external_resources(tmp_path / "d")


def test_hugging_face_pages_are_ours(tmp_path) -> None:
    hf = build_hf("llama")
    tokenizer = make_tokenizer(VOCAB_SIZE)
    sae = random_sae(AttnSite.from_model(hf, 1), "topk")
    board = build_dashboard(
        hf, sae, prompts(), tmp_path / "d", features=[3, 7], tokenizer=tokenizer, progress=False
    )
    assert board.engine == "own" and "TransformerLens models only" in board.note
    assert sorted(board.pages) == [3, 7] and not (tmp_path / "d" / "assets").exists()
    for page in board.pages.values():
        text = page.read_text()
        for panel in ("contexts-panel", "histogram-panel", "dfa-panel", "head-attribution-panel"):
            assert f'id="{panel}"' in text
    no_external_resources(tmp_path / "d")
    with pytest.raises(ValueError, match="engine='saedashboard' cannot build.*TransformerLens"):
        build_dashboard(hf, sae, prompts(), tmp_path / "e", engine="saedashboard", progress=False)


def test_without_saedashboard_our_engine_serves_and_asking_for_it_says_how_to_install(
    tl_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(saedashboard.importlib.util, "find_spec", lambda name, *a: None)
    sae = random_sae(AttnSite.from_model(tl_model, 1), value_bias_convention="included")
    board = build_dashboard(tl_model, sae, prompts(), tmp_path / "d", top=1, progress=False)
    assert board.engine == "own" and "SAEDashboard is not installed" in board.note
    with pytest.raises(
        ValueError, match=r"engine='saedashboard'.*pip install 'sae-lens-attn\[saedashboard\]'"
    ):
        build_dashboard(tl_model, sae, prompts(), tmp_path / "e", engine="saedashboard")
    assert not (tmp_path / "e").exists()


@needs_saedashboard
def test_folded_saes_do_not_go_through_saedashboard(tl_model, tmp_path) -> None:
    sae = random_sae(AttnSite.from_model(tl_model, 0), value_bias_convention="folded")
    board = build_dashboard(tl_model, sae, prompts(), tmp_path / "d", top=1, progress=False)
    assert board.engine == "own" and "trained on folded z" in board.note


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_panel_data_is_the_dfa_decomposition(tl_model, apply_b_dec_to_input) -> None:
    sae = random_sae(AttnSite.from_model(tl_model, 1), value_bias_convention="included")
    sae.cfg.apply_b_dec_to_input = apply_b_dec_to_input
    tokens = prompts()
    counted = tokens != 0
    data = collect(tl_model, sae, tokens, [5, 11, 40], counted=counted, n_contexts=4)
    for feature in data:
        assert sum(feature.head_shares) == pytest.approx(1.0)
        peaks = [ctx.activation for ctx in feature.contexts]
        assert peaks == sorted(peaks, reverse=True) and all(p > 0 for p in peaks)
        assert sum(feature.histogram_counts) == round(feature.density * int(counted.sum()))
        for ctx in feature.contexts:
            assert ctx.position > 0  # BOS is never a peak
            assert sum(ctx.dfa_by_src) + feature.bias == pytest.approx(ctx.pre_act, abs=1e-4)
            assert sum(ctx.dfa_by_head) == pytest.approx(sum(ctx.dfa_by_src), abs=1e-4)
            assert ctx.activation == pytest.approx(max(ctx.pre_act, 0.0), abs=1e-4)  # ReLU
            assert ctx.activation == max(ctx.activations[1:])


def test_a_feature_that_never_fires_is_shown_as_such(tl_model, tmp_path) -> None:
    sae: Any = random_sae(AttnSite.from_model(tl_model, 1), value_bias_convention="included")
    with torch.no_grad():
        sae.b_enc[6] = -100.0  # feature 6 never fires on any token
        sae.b_enc[5] = 100.0  # feature 5 fires on every token
    tokens = prompts()
    assert not (sla.analysis.dfa(tl_model, sae, tokens, features=[6]).acts > 0).any()
    never, fires = collect(tl_model, sae, tokens, [6, 5], n_contexts=3)
    assert never.contexts == () and never.density == 0 and never.histogram_counts == ()
    assert fires.contexts and all(ctx.activation > 0 for ctx in fires.contexts)
    board = build_dashboard(
        tl_model, sae, tokens, tmp_path / "d", features=[6], engine="own", progress=False
    )
    page = board.pages[6].read_text()
    assert "never fires on these tokens: nothing to attribute" in page


def test_features_out_of_range_are_refused(tl_model, tmp_path, capsys) -> None:
    sae = random_sae(AttnSite.from_model(tl_model, 1))
    with pytest.raises(
        ValueError, match=r"feature indices \[96, -1\] are out of range.*valid: 0\.\.95"
    ):
        build_dashboard(tl_model, sae, prompts(), tmp_path / "d", features=[1, 96, -1])
    assert not (tmp_path / "d").exists()
    sae.save_model(tmp_path / "sae")
    hf_dir = tmp_path / "hf"
    build_hf("gpt2").save_pretrained(hf_dir)
    make_tokenizer(VOCAB_SIZE).save_pretrained(hf_dir)
    torch.save(prompts(), tmp_path / "tokens.pt")
    args = ["dashboard", "--out", str(tmp_path / "d"), "--model", f"hf:{hf_dir}",
            "--sae", str(tmp_path / "sae"), "--tokens", str(tmp_path / "tokens.pt")]  # fmt: skip
    assert main([*args, "--features", "2,500"]) == 1
    assert "feature indices [500] are out of range" in capsys.readouterr().err
    assert main([*args, "--features", "2,3", "--contexts", "2"]) == 0
    assert "wrote 2 feature pages (own)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        OUTPUT_MARKER, "feature_2.html", "feature_3.html", "index.html",
    ]  # fmt: skip


def test_an_sae_for_another_model_is_refused(tl_model, gqa_model, tmp_path) -> None:
    sae = random_sae(AttnSite.from_model(gqa_model, 1))
    with pytest.raises(ValueError, match="trained for another model's site"):
        build_dashboard(tl_model, sae, prompts(), tmp_path / "d", progress=False)


@pytest.mark.skipif(
    importlib.util.find_spec("sae_lens_attn.default_model") is None,
    reason="the embedded default model is not in this checkout",
)
@pytest.mark.slow
def test_evaluate_and_dashboard_on_the_default_model(tmp_path, capsys) -> None:
    model, _ = sla.load_default_model()
    text = tmp_path / "held_out.txt"
    text.write_text(inspect.getsource(json.decoder))
    ctx = str(min(64, model.cfg.n_ctx))
    common = ["--model", "default", "--text", str(text), "--context-size", ctx]
    assert main(["evaluate", "--release", "stdlib-2l-attn-z", *common, "--max-prompts", "8"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == [
        str(layer) for layer in range(model.cfg.n_layers)
    ]
    out = tmp_path / "board"
    assert main(["dashboard", "--out", str(out), "--sae", "stdlib-2l-attn-z:blocks.1",
                 *common, "--top", "2", "--max-prompts", "8"]) == 0  # fmt: skip
    assert len(list(out.glob("feature_*.html"))) == 2
    no_external_resources(out)


@pytest.mark.browser
@needs_browser
@pytest.mark.parametrize("kind", ["transformer_lens", "hugging_face"])
@pytest.mark.slow
def test_dashboard_renders_in_chromium(kind, tl_model, tmp_path) -> None:
    model: Any = tl_model if kind == "transformer_lens" else build_hf("gpt2")
    sae = random_sae(AttnSite.from_model(model, 1), value_bias_convention="included")
    board = build_dashboard(
        model, sae, prompts(), tmp_path / "d", features=[4], tokenizer=make_tokenizer(VOCAB_SIZE),
        progress=False,
    )  # fmt: skip
    report = open_page(board.pages[4], RENDERED)
    save_screenshot(report.screenshot, REPO / "out" / "screenshots" / f"dashboard_{kind}.png")
    assert report.errors == ()
    assert report.remote_requests == ()
    assert report.check["dfa"] and report.check["heads"], report.check
    if board.engine == "saedashboard":  # SAEDashboard's own parts drew too (d3, Plotly loaded)
        assert report.check["saedashboard_columns"] > 0 and report.check["plotly_plots"] > 0
    assert report.screenshot[:4] == b"\x89PNG" and len(report.screenshot) > 10_000


def test_the_index_and_each_page_say_why_a_feature_is_shown(tl_model, tmp_path) -> None:
    sae = random_sae(AttnSite.from_model(tl_model, 1), value_bias_convention="included")
    columns = {
        "shown because": {3: "top by max activation (#1)", 5: "induction feature #1 of 2"},
        "induction verdict": {3: "control", 5: "induction"},
    }
    board = build_dashboard(
        tl_model, sae, prompts(), tmp_path / "d", features=[3, 5], engine="own",
        tokenizer=make_tokenizer(VOCAB_SIZE), progress=False, index_columns=columns,
    )  # fmt: skip
    index = board.index.read_text()
    assert "<th>shown because</th><th>induction verdict</th>" in index
    for feature in (3, 5):
        row = re.search(rf'<tr><td><a href="feature_{feature}.html">.*?</tr>', index)
        assert row, f"no index row for feature {feature}"
        cells = re.findall(r"<td>([^<]*)</td>", row.group(0))
        assert cells[-2:] == [
            columns["shown because"][feature],
            columns["induction verdict"][feature],
        ]
        notes = re.search(r"<p id='feature-notes'>(.*?)</p>", board.pages[feature].read_text())
        assert notes and columns["induction verdict"][feature] in notes.group(1)


def test_byte_level_tokens_are_shown_with_visible_whitespace() -> None:
    """Every token of the default model's byte-level vocabulary that holds a space (``Ġ``),
    newline (``Ċ``) or tab (``ĉ``) is shown with the mark of each, in place."""
    from sae_lens_attn.validation import token_text
    from sae_lens_attn.viz.dashboard.data import readable_token

    _, tokenizer = sla.load_default_model()
    marks = {"Ġ": "·", "Ċ": "⏎\n", "ĉ": "→"}  # GPT-2's byte-to-unicode alphabet
    checked = 0
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if not set(piece) & set(marks) or set(piece) - set(marks) - set(map(chr, range(33, 127))):
            continue  # no whitespace, or other non-ASCII bytes (multi-byte characters)
        expected = "".join(marks.get(char, char) for char in piece)
        assert readable_token(token_text(tokenizer, token_id)) == expected, piece
        checked += 1
    assert checked > 20
    assert readable_token(" the") == "·the" and readable_token("\x0c") == "\\x0c"
