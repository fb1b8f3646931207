"""The prompt explorer's JSON API, served by uvicorn on loopback: results against independent
computations from TransformerLens's cache and plain torch hooks, bad input, safety, concurrency,
the static export and the command line."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_attn import AttnSite
from sae_lens_attn.analysis.families import LABELS
from sae_lens_attn.cli.main import main
from sae_lens_attn.explorer import (
    ExplorerSession,
    PortInUse,
    bind,
    create_app,
    export_prompts,
    is_loopback,
    serving,
)

from .factories import PROMPT, PROMPTS, default_session, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def post(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
    """POST JSON (or ``raw`` bytes); the status and the decoded JSON answer."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as given (no client-side normalisation of ``..``)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def session() -> ExplorerSession:
    return default_session()


@pytest.fixture(scope="module")
def url(session) -> Any:
    with serving(create_app(session)) as base:
        yield base


# -- results against independent computations ------------------------------------------------


def cache_of(session: ExplorerSession, prompt: str) -> tuple[torch.Tensor, Any]:
    model = session.backend.model
    tokens = model.to_tokens(prompt)
    _, cache = model.run_with_cache(tokens)
    return tokens, cache


def test_run_lists_each_layers_top_features_as_saelens_encodes_them(session, url) -> None:
    status, answer = post(f"{url}/api/run", {"prompt": PROMPT})
    assert status == 200
    tokens, cache = cache_of(session, PROMPT)
    tokenizer = session.tokenizer
    assert answer["token_ids"] == tokens[0].tolist()
    assert answer["tokens"] == [tokenizer.decode([i]) for i in tokens[0].tolist()]
    assert answer["tokens"][0] == tokenizer.bos_token
    assert sorted(answer["layers"]) == ["0", "1"]
    for layer, sae in session.saes.items():
        acts = sae.encode(cache[f"blocks.{layer}.attn.hook_z"][0])  # SAELens reshapes hook_z
        listed = answer["layers"][str(layer)]
        assert len(listed) == tokens.shape[1]
        for position, items in enumerate(listed):
            values, indices = acts[position].topk(session.top_k)
            expected = [(int(i), float(v)) for i, v in zip(indices, values, strict=True) if v > 0]
            assert [item["feature"] for item in items] == [f for f, _ in expected]
            torch.testing.assert_close(
                torch.tensor([item["activation"] for item in items]),
                torch.tensor([v for _, v in expected]),
            )


def test_feature_detail_is_dfa_by_its_definition(session, url) -> None:
    layer, position = 1, 9
    _, run = post(f"{url}/api/run", {"prompt": PROMPT})
    feature = run["layers"][str(layer)][position][0]["feature"]
    status, d = post(
        f"{url}/api/feature",
        {"prompt": PROMPT, "layer": layer, "feature": feature, "position": position},
    )
    assert status == 200
    _, cache = cache_of(session, PROMPT)
    sae = session.saes[layer]
    n_heads, d_head = session.sites[layer].n_heads, session.sites[layer].d_head
    w = sae.W_enc[:, feature].detach()  # (n_heads * d_head,)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, position]  # (n_heads, s)
    v = cache[f"blocks.{layer}.attn.hook_v"][0]  # (s, n_heads, d_head)
    per_head_src = pattern * torch.einsum("shd,hd->hs", v, w.view(n_heads, d_head))
    z = cache[f"blocks.{layer}.attn.hook_z"][0, position].flatten()
    bias = sae.b_enc[feature] - sae.b_dec @ w
    torch.testing.assert_close(torch.tensor(d["by_src"]), per_head_src.sum(0))
    torch.testing.assert_close(torch.tensor(d["by_head"]), per_head_src.sum(1))
    torch.testing.assert_close(torch.tensor(d["bias"]), bias.detach())
    torch.testing.assert_close(torch.tensor(d["pre_act"]), (z @ w + bias).detach())
    assert sum(d["by_src"]) + d["bias"] == pytest.approx(d["pre_act"], abs=1e-5)
    acts = sae.encode(cache[f"blocks.{layer}.attn.hook_z"][0])[:, feature]
    torch.testing.assert_close(torch.tensor(d["activations"]), acts.detach())
    assert d["activation"] == pytest.approx(float(acts[position]), abs=1e-6)
    assert d["token"] == run["tokens"][position]
    # logit effects: W_dec[f] · W_O_cat · W_U, no final norm
    model = session.backend.model
    effect = sae.W_dec[feature] @ model.blocks[layer].attn.W_O.flatten(0, 1) @ model.W_U
    top = effect.topk(session.logits_k)
    assert [t["token_id"] for t in d["logits"]["top"]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([t["value"] for t in d["logits"]["top"]]), top.values)
    bottom = (-effect).topk(session.logits_k).indices.tolist()
    assert [t["token_id"] for t in d["logits"]["bottom"]] == bottom
    assert d["family"]["label"] in LABELS
    assert set(d["family"]["shares"]) <= set(LABELS)
    assert d["dashboard"] is None


def test_feature_detail_defaults_to_the_features_peak(session, url) -> None:
    _, run = post(f"{url}/api/run", {"prompt": PROMPT})
    feature = run["layers"]["1"][5][0]["feature"]
    status, d = post(f"{url}/api/feature", {"prompt": PROMPT, "layer": 1, "feature": feature})
    assert status == 200
    assert d["activations"][d["position"]] == max(d["activations"]) > 0


def test_hugging_face_models_through_nnsight() -> None:
    hf: Any = build_hf("gpt2")
    tokenizer = make_tokenizer(VOCAB_SIZE)
    layer = 1
    sae: Any = random_sae(AttnSite.from_model(hf, layer), "topk", value_bias_convention="included")
    session = ExplorerSession(hf, [sae], tokenizer=tokenizer, top_k=5)
    assert session.backend.name == "nnsight"
    prompt = "w5 w9 w12 w5 w9"
    with serving(create_app(session)) as url:
        status, run = post(f"{url}/api/run", {"prompt": prompt})
        assert status == 200
        position = 4
        feature = run["layers"][str(layer)][position][0]["feature"]
        status, d = post(
            f"{url}/api/feature",
            {"prompt": prompt, "layer": layer, "feature": feature, "position": position},
        )
        assert status == 200
    assert run["tokens"] == ["<bos>", "w5", "w9", "w12", "w5", "w9"]
    captured: list[torch.Tensor] = []  # z: the input of the output projection, by a plain hook
    hook = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            hf(torch.tensor([run["token_ids"]]))
    finally:
        hook.remove()
    z = captured[0][0]  # (pos, d_in)
    acts = sae.encode(z.unflatten(-1, (hf.config.n_head, -1)))  # SAELens reshapes hook_z
    values, indices = acts[position].topk(5)
    expected = [int(i) for i, v in zip(indices, values, strict=True) if v > 0]
    assert [item["feature"] for item in run["layers"][str(layer)][position]] == expected
    w = sae.W_enc[:, feature].detach()
    bias = (sae.b_enc[feature] - sae.b_dec @ w).detach()
    torch.testing.assert_close(torch.tensor(d["pre_act"]), (z[position] @ w + bias))
    assert sum(d["by_src"]) + d["bias"] == pytest.approx(d["pre_act"], abs=1e-5)
    assert len(d["by_head"]) == hf.config.n_head
    assert d["family"] is None  # no label contexts were given


def test_info_and_openapi_document_the_api(url) -> None:
    status, body = get(url, "/api/info")
    info = json.loads(body)
    assert status == 200
    assert [layer["layer"] for layer in info["layers"]] == [0, 1]
    assert info["context"] == 128 and info["families"] is True
    status, body = get(url, "/api/openapi.json")
    schema = json.loads(body)
    assert status == 200 and {"/api/run", "/api/feature", "/api/info"} <= set(schema["paths"])
    components = schema["components"]["schemas"]
    assert set(components["RunRequest"]["properties"]) == {"prompt"}
    assert {"pre_act", "bias", "by_src", "by_head"} <= set(
        components["FeatureResponse"]["required"]
    )


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "kind", "words"),
    [
        ("run", {"prompt": ""}, "empty_prompt", "empty"),
        ("run", {"prompt": "x = 1\n" * 200}, "prompt_too_long", "at most 128 positions"),
        ("feature", {"prompt": PROMPT, "layer": 1, "feature": 512}, "feature_out_of_range",
         "valid: 0..511"),
        ("feature", {"prompt": PROMPT, "layer": 1, "feature": -1}, "feature_out_of_range",
         "valid: 0..511"),
        ("feature", {"prompt": PROMPT, "layer": 7, "feature": 3}, "unknown_layer",
         "loaded layers: [0, 1]"),
        ("feature", {"prompt": PROMPT, "layer": 1, "feature": 3, "position": 99},
         "position_out_of_range", "valid: 0.."),
        ("feature", {"prompt": PROMPT, "layer": "1", "feature": 3}, "invalid_request",
         "layer: Input should be a valid integer"),
        ("run", {"prompt": PROMPT, "promt": "typo"}, "invalid_request", "promt"),
        ("run", {}, "invalid_request", "prompt: Field required"),
        ("run", ["not", "an", "object"], "invalid_request", "valid dictionary"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_json_error(url, route, body, kind, words) -> None:
    status, answer = post(f"{url}/api/{route}", body)
    assert status == 422
    assert answer["kind"] == kind
    assert words in answer["error"]


def test_too_long_prompt_says_by_how_much_and_is_never_cut(session, url) -> None:
    prompt = "x = 1\n" * 200
    n_tokens = session.backend.model.to_tokens(prompt, truncate=False).shape[1]
    _, answer = post(f"{url}/api/run", {"prompt": prompt})
    assert f"is {n_tokens} tokens long" in answer["error"]
    assert f"shorten it by {n_tokens - 128} tokens" in answer["error"]


def test_non_json_body_is_refused(url) -> None:
    status, answer = post(f"{url}/api/run", None, raw=b"prompt=hello")
    assert status == 400 and answer["kind"] == "invalid_json"
    assert "not valid JSON" in answer["error"]


def test_oversized_bodies_are_refused_declared_or_streamed(session, url) -> None:
    limit = session.max_body_bytes
    status, answer = post(f"{url}/api/run", {"prompt": "x" * (limit + 10)})
    assert status == 413 and answer["kind"] == "body_too_large"
    assert str(limit) in answer["error"]
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b'{"prompt": "' + b"x" * 8192 for _ in range(limit // 8192 + 2))
    connection.request(  # chunked: no Content-Length to refuse up front
        "POST", "/api/run", body=chunks, headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )  # fmt: skip
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["kind"] == "body_too_large"
    connection.close()


def test_static_routes_cannot_read_outside_their_folders(tmp_path) -> None:
    board = tmp_path / "board"
    board.mkdir()
    (board / "feature_3.html").write_text("<html>feature 3</html>")
    (tmp_path / "secret.txt").write_text("SECRET")
    session = default_session(dashboards={1: board})
    with serving(create_app(session)) as url:
        assert get(url, "/static/explorer.js")[0] == 200
        assert get(url, "/dashboards/1/feature_3.html") == (200, b"<html>feature 3</html>")
        for path in [
            "/static/../app.py",
            "/static/%2e%2e/session.py",
            "/static/..%2fsession.py",
            "/static/%2e%2e%2f%2e%2e%2f__init__.py",
            "/dashboards/1/../secret.txt",
            "/dashboards/1/%2e%2e/secret.txt",
            "/dashboards/1/..%2fsecret.txt",
            "/dashboards/1//etc/passwd",
            "/dashboards/0/feature_3.html",  # no folder given for layer 0
        ]:
            status, body = get(url, path)
            assert status == 404, path
            assert b"SECRET" not in body and b"import" not in body, path
        _, with_page = post(f"{url}/api/feature", {"prompt": PROMPT, "layer": 1, "feature": 3})
        _, without = post(f"{url}/api/feature", {"prompt": PROMPT, "layer": 1, "feature": 4})
    assert with_page["dashboard"] == "/dashboards/1/feature_3.html"
    assert without["dashboard"] is None


def test_requests_for_other_host_names_are_refused(url) -> None:
    status, _ = get(url, "/api/info", headers={"Host": "attacker.example"})  # DNS rebinding
    assert status == 400
    assert get(url, "/api/info", headers={"Host": "localhost"})[0] == 200


def test_a_model_error_is_a_json_error_and_the_server_keeps_serving(session, url, monkeypatch):
    forward = session.backend.forward
    poisoned = session.backend.model.to_tokens("boom boom")

    def failing(tokens, **kwargs):
        if tokens.shape == poisoned.shape and bool((tokens.cpu() == poisoned).all()):
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(tokens, **kwargs)

    monkeypatch.setattr(session.backend, "forward", failing)
    status, answer = post(f"{url}/api/run", {"prompt": "boom boom"})
    assert status == 500 and answer["kind"] == "model_error"
    assert "RuntimeError: CUDA out of memory (simulated)" in answer["error"]
    status, answer = post(f"{url}/api/feature", {"prompt": "boom boom", "layer": 0, "feature": 1})
    assert status == 500 and answer["kind"] == "model_error"
    status, answer = post(f"{url}/api/run", {"prompt": PROMPT})
    assert status == 200 and len(answer["tokens"]) > 1


def test_concurrent_requests_get_their_own_results(session, url) -> None:
    requests = []
    for i, prompt in enumerate(PROMPTS * 4):
        if i % 2:
            requests.append(("run", {"prompt": prompt}))
        else:
            requests.append(("feature", {"prompt": prompt, "layer": i % 2, "feature": 7 + i}))
    expected = [post(f"{url}/api/{route}", body) for route, body in requests]  # one at a time
    assert all(status == 200 for status, _ in expected)
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda r: post(f"{url}/api/{r[0]}", r[1]), requests))
    assert answers == expected


def test_port_in_use_names_the_port_and_suggests_port(capsys) -> None:
    taken = bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(PortInUse, match=f"port {port} .*already in use.*--port"):
            bind("127.0.0.1", port)
        assert main(["explore", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert f"error: port {port} on 127.0.0.1 is already in use" in err and "--port" in err
        assert main(["explore", "--host", "0.0.0.0", "--port", str(port)]) == 1
        assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
    finally:
        taken.close()


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "example.com"))


def test_cli_refuses_inconsistent_flags(capsys) -> None:
    assert main(["explore", "--export", "x"]) == 2
    assert "--export DIR and --prompts FILE go together" in capsys.readouterr().err
    assert main(["explore", "--model", "hf:/nowhere"]) == 2
    assert "needs its SAEs: give --release or --sae" in capsys.readouterr().err


def test_session_refuses_bad_setups(session) -> None:
    model, sae = session.backend.model, session.saes[1]
    with pytest.raises(ValueError, match="at least one SAE"):
        ExplorerSession(model, [])
    with pytest.raises(ValueError, match="two SAEs read layer 1"):
        ExplorerSession(model, [sae, sae])
    with pytest.raises(ValueError, match="layer 0, which has no SAE loaded"):
        ExplorerSession(model, [sae], dashboards={0: "."})


# -- static export ------------------------------------------------------------------------------


def embedded(page: Path) -> dict[str, Any]:
    text = page.read_text()
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', text)
    assert match is not None
    return json.loads(match.group(1))


def test_export_embeds_the_same_views_and_loads_nothing(session, url, tmp_path) -> None:
    prompts = PROMPTS[:2]
    export = export_prompts(session, prompts, tmp_path / "export")
    assert [p.name for p in export.pages] == ["prompt_1.html", "prompt_2.html"]
    for page in [export.index, *export.pages]:
        text = page.read_text()
        assert EXTERNAL.search(text) is None
        assert "/static/" not in text and "Content-Security-Policy" in text
    data = embedded(export.pages[0])
    _, run = post(f"{url}/api/run", {"prompt": prompts[0]})
    assert data["run"] == run and data["prompt"] == prompts[0]
    position = 6
    item = run["layers"]["1"][position][1]
    _, detail = post(
        f"{url}/api/feature",
        {"prompt": prompts[0], "layer": 1, "feature": item["feature"], "position": position},
    )
    key = f"1:{item['feature']}"
    at = data["positions"][key][str(position)]
    assert at["pre_act"] == pytest.approx(detail["pre_act"])
    assert at["by_src"] == pytest.approx(detail["by_src"], rel=1e-4, abs=1e-6)
    assert at["by_head"] == pytest.approx(detail["by_head"], rel=1e-4, abs=1e-6)
    assert data["features"][key]["logits"] == detail["logits"]
    assert data["features"][key]["family"] == detail["family"]
    shown = {
        f"{layer}:{i['feature']}" for layer, rows in run["layers"].items() for r in rows for i in r
    }
    assert set(data["features"]) == shown


def test_export_checks_every_prompt_before_writing(session, tmp_path) -> None:
    with pytest.raises(ValueError, match="prompt 2 .*at most 128 positions"):
        export_prompts(session, [PROMPT, "y = 2\n" * 300], tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_cli_export(tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS[:2]))
    out = tmp_path / "pages"
    args = ["explore", "--export", str(out), "--prompts", str(prompts), "--family-contexts", "0"]
    assert main(args) == 0
    assert "wrote 2 prompt pages" in capsys.readouterr().out
    data = embedded(out / "prompt_2.html")
    assert data["prompt"] == PROMPTS[1]
    assert all(f["family"] is None for f in data["features"].values())
    assert main(args) == 1  # an earlier export is replaced only with --overwrite
    assert main([*args, "--overwrite"]) == 0


# -- the host behaviour anyio_compat relies on --------------------------------------------------

ANYIO_AFTER_NNSIGHT = """
import nnsight, importlib, sys
try:
    importlib.import_module("anyio._backends._asyncio")
except TypeError as err:
    print("refused:", err)
"""


@pytest.mark.slow
def test_nnsight_breaks_anyio_unless_prepared() -> None:
    """nnsight's object.save makes anyio refuse its own classes: what prepare_anyio works
    around. When this stops failing, anyio_compat can go."""
    plain = subprocess.run(
        [sys.executable, "-c", ANYIO_AFTER_NNSIGHT], capture_output=True, text=True
    )
    assert "refused: Attribute 'save' is missing its type annotation" in plain.stdout
    prepared = ANYIO_AFTER_NNSIGHT.replace(
        "try:", "from sae_lens_attn.explorer.anyio_compat import prepare_anyio\n"
        "prepare_anyio()\nassert hasattr(object(), 'save')\ntry:",
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", prepared], capture_output=True, text=True)
    assert result.returncode == 0 and "refused" not in result.stdout, result.stderr


def test_free_port_is_reported() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
        assert sock.proto == socket.IPPROTO_TCP  # else asyncio leaves Nagle on: +40 ms a reply
        probe = socket.create_connection(sock.getsockname()[:2], timeout=5)
        probe.close()
    finally:
        sock.close()


@pytest.mark.slow
def test_the_command_serves_and_prints_its_url() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sae_lens_attn", "explore", "--family-contexts", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.match(r"prompt explorer: (http://127\.0\.0\.1:\d+)/", line)
        assert match is not None, (line, process.stderr and process.stderr.read())
        url = match.group(1)
        status, answer = post(f"{url}/api/run", {"prompt": PROMPT})
        assert status == 200 and sorted(answer["layers"]) == ["0", "1"]
        status, page = get(url, "/")
        assert status == 200 and b"/static/explorer.js" in page
    finally:
        process.terminate()
        process.wait(30)
