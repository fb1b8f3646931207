"""The explorer's ablation route, ``POST /api/ablate``: the logits against the splice formula
computed with TransformerLens hooks and SAELens's own encode and decode, refusals, the schema,
and the page's ablate button in headless Chromium."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import torch

from sae_lens_attn.explorer import ExplorerSession, create_app, serving

from .browser import chromium, needs_browser, save_screenshot, watched
from .factories import PROMPT, default_session, sae_lens_encode


def post(url: str, body: Any) -> tuple[int, Any]:
    """POST JSON; the status and the decoded JSON answer."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.fixture(scope="module")
def session() -> ExplorerSession:
    return default_session()


@pytest.fixture(scope="module")
def url(session) -> Any:
    with serving(create_app(session)) as base:
        yield base


def spliced_logits(session: ExplorerSession, layer: int, feature: int, position: int) -> Any:
    """Logits at ``position`` with ``z' = z + decode(a') − decode(a)`` there (a' = a with the
    feature zeroed), from TransformerLens hooks and SAELens's encode and decode."""
    model = session.backend.model
    sae = session.saes[layer]
    tokens = model.to_tokens(PROMPT)
    hook = f"blocks.{layer}.attn.hook_z"

    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:  # z in the SAE's convention here
        _, acts = sae_lens_encode(sae, z[0, position])
        edited = acts.clone()
        edited[feature] = 0
        change = (sae.decode(edited[None]) - sae.decode(acts[None])).reshape(z.shape[2:])
        z = z.clone()
        z[0, position] += change
        return z

    with torch.no_grad():
        before = model(tokens)[0, position]
        after = model.run_with_hooks(tokens, fwd_hooks=[(hook, ablate)])[0, position]
    return tokens, before, after


def test_ablate_moves_the_logits_as_the_splice_formula_says(session, url) -> None:
    layer, position = 1, 9
    _, run = post(f"{url}/api/run", {"prompt": PROMPT})
    item = run["layers"][str(layer)][position][0]
    feature = item["feature"]
    status, a = post(
        f"{url}/api/ablate",
        {"prompt": PROMPT, "layer": layer, "feature": feature, "position": position, "k": 7},
    )
    assert status == 200, a
    tokens, before, after = spliced_logits(session, layer, feature, position)
    assert (a["layer"], a["feature"], a["position"]) == (layer, feature, position)
    assert a["token"] == run["tokens"][position]
    assert a["activation"] == pytest.approx(item["activation"], abs=1e-5)
    top_before, top_after = before.topk(7), after.topk(7)
    assert [t["token_id"] for t in a["before"]] == top_before.indices.tolist()
    assert [t["token_id"] for t in a["after"]] == top_after.indices.tolist()
    every = a["before"] + a["after"] + a["lowered"] + a["raised"]
    ids = torch.tensor([t["token_id"] for t in every])
    torch.testing.assert_close(torch.tensor([t["before"] for t in every]), before[ids])
    torch.testing.assert_close(torch.tensor([t["after"] for t in every]), after[ids])
    torch.testing.assert_close(
        torch.tensor([t["prob_after"] for t in every]), after.softmax(-1)[ids]
    )
    moved = after - before
    assert [t["token_id"] for t in a["lowered"]] == moved.topk(7, largest=False).indices.tolist()
    assert [t["token_id"] for t in a["raised"]] == moved.topk(7).indices.tolist()
    assert a["lowered"][0]["after"] < a["lowered"][0]["before"]  # an active feature moves them
    following = int(tokens[0, position + 1])
    assert a["next_token"]["token_id"] == following
    assert a["next_token"]["token"] == run["tokens"][position + 1]


def test_ablating_an_inactive_feature_changes_nothing(session) -> None:
    run = session.run(PROMPT)
    position = 5
    active = {item.feature for item in run.layers["1"][position]}
    acts = session.activations(session.tokenize(PROMPT))[1][position]
    inactive = int((acts == 0).nonzero()[0])
    assert inactive not in active
    a = session.ablate(PROMPT, 1, inactive, position)
    assert a.activation == 0
    assert all(t.before == t.after for t in a.before + a.lowered + a.raised)
    assert len(a.before) == session.logits_k  # k defaults to the explorer's logits_k


def test_ablating_the_last_position_has_no_next_token(session) -> None:
    n = session.tokenize(PROMPT).shape[1]
    a = session.ablate(PROMPT, 0, 3, n - 1, k=2)
    assert a.next_token is None and len(a.after) == 2


@pytest.mark.parametrize(
    ("body", "kind", "words"),
    [
        ({"prompt": PROMPT, "layer": 7, "feature": 3, "position": 2}, "unknown_layer",
         "loaded layers: [0, 1]"),
        ({"prompt": PROMPT, "layer": 1, "feature": 512, "position": 2}, "feature_out_of_range",
         "valid: 0..511"),
        ({"prompt": PROMPT, "layer": 1, "feature": -1, "position": 2}, "feature_out_of_range",
         "valid: 0..511"),
        ({"prompt": PROMPT, "layer": 1, "feature": 3, "position": 99}, "position_out_of_range",
         "valid: 0.."),
        ({"prompt": PROMPT, "layer": 1, "feature": 3, "position": -1}, "position_out_of_range",
         "0 is BOS"),
        ({"prompt": PROMPT, "layer": 1, "feature": 3, "position": 2, "k": 0}, "k_out_of_range",
         "k must be in 1.."),
        ({"prompt": PROMPT, "layer": 1, "feature": 3}, "invalid_request",
         "position: Field required"),
        ({"prompt": PROMPT, "layer": 1, "feature": "3", "position": 2}, "invalid_request",
         "feature: Input should be a valid integer"),
        ({"prompt": "", "layer": 1, "feature": 3, "position": 0}, "empty_prompt", "empty"),
    ],
)  # fmt: skip
def test_bad_ablations_are_refused_with_the_reason(url, body, kind, words) -> None:
    status, answer = post(f"{url}/api/ablate", body)
    assert status == 422
    assert answer["kind"] == kind
    assert words in answer["error"]


def test_the_schema_documents_the_route(url) -> None:
    with urllib.request.urlopen(f"{url}/api/openapi.json", timeout=60) as response:
        schema = json.load(response)
    route = schema["paths"]["/api/ablate"]["post"]
    assert "422" in route["responses"]
    fields = schema["components"]["schemas"]["AblateRequest"]["properties"]
    assert set(fields) == {"prompt", "layer", "feature", "position", "k"}
    assert schema["components"]["schemas"]["AblateRequest"]["required"] == [
        "prompt",
        "layer",
        "feature",
        "position",
    ]


@pytest.mark.browser
@pytest.mark.slow
@needs_browser
def test_page_ablates_a_feature_and_shows_the_logits_move(session, tmp_path) -> None:
    run = session.run(PROMPT)
    position = 9
    feature = run.layers["1"][position][0].feature
    expected = session.ablate(PROMPT, 1, feature, position)
    with serving(create_app(session)) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        watch = watched(page)
        page.goto(f"{url}/")
        page.wait_for_function("() => document.getElementById('search-layer').options.length === 2")
        page.fill("#prompt", PROMPT)
        page.click("#run")
        page.wait_for_selector("#feature-table .feature")
        page.click(
            f'#feature-table tr[data-position="{position}"] .feature[data-layer="1"] >> nth=0'
        )
        page.wait_for_selector("#dfa-panel:not([hidden]) #ablate")
        assert page.is_hidden("#ablate-panel")
        page.click("#ablate")
        page.wait_for_selector("#ablate-panel:not([hidden]) #ablate-lowered li")
        header = page.inner_text("#ablate-panel h2")
        assert header == f"Ablating layer 1 · feature {feature} at position {position}"
        summary = page.inner_text("#ablate-summary")
        assert "error term kept" in summary and "next token" in summary
        lowered = page.locator("#ablate-lowered li").all_inner_texts()
        assert len(lowered) == session.logits_k
        first = expected.lowered[0]
        assert f"{first.before:.3g}" in lowered[0] and "→" in lowered[0]
        assert page.locator("#ablate-before li").count() == session.logits_k
        save_screenshot(page.screenshot(full_page=True), tmp_path / "explorer_ablate.png")

        page.click("#run")  # a new run hides the old ablation
        page.wait_for_selector("#ablate-panel", state="hidden")
    assert watch.errors == []
    assert watch.requests_outside(url) == []
    assert "/api/ablate" in {r.split(url)[1] for r in watch.requests}


def test_ablate_on_a_hugging_face_model_matches_a_torch_hook() -> None:
    """The same route on a plain Hugging Face GPT-2: z is ``attn.c_proj``'s input there."""
    from sae_lens_attn import AttnSite

    from .factories import random_sae
    from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

    model: Any = build_hf("gpt2")
    tokenizer = make_tokenizer(VOCAB_SIZE)
    site = AttnSite.from_model(model, 0)
    sae = random_sae(site, "topk", value_bias_convention="included", std=0.5)
    session = ExplorerSession(model, [sae], tokenizer=tokenizer, logits_k=5)
    prompt, position = "w5 w9 w12 w5 w9 w30 w12", 4
    tokens = session.tokenize(prompt)
    acts = session.activations(tokens)[0][position]
    feature = int(acts.argmax())
    assert acts[feature] > 0
    answer = session.ablate(prompt, 0, feature, position)

    def edit(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (z,) = args  # (batch, pos, n_heads * d_head), heads concatenated
        _, a = sae_lens_encode(sae, z[0, position].reshape(site.n_heads, site.d_head))
        cut = a.clone()
        cut[feature] = 0
        z = z.clone()
        z[0, position] += (sae.decode(cut[None]) - sae.decode(a[None])).reshape(-1)
        return (z,)

    with torch.no_grad():
        before = model(tokens).logits[0, position]
        handle = model.transformer.h[0].attn.c_proj.register_forward_pre_hook(edit)
        try:
            after = model(tokens).logits[0, position]
        finally:
            handle.remove()
    assert answer.activation == pytest.approx(float(acts[feature]), abs=1e-5)
    assert [t.token_id for t in answer.after] == after.topk(5).indices.tolist()
    ids = torch.tensor([t.token_id for t in answer.lowered])
    assert ids.tolist() == (after - before).topk(5, largest=False).indices.tolist()
    torch.testing.assert_close(torch.tensor([t.after for t in answer.lowered]), after[ids])
