"""``sae-lens-attn explore --model hf:PATH`` end to end: a tiny GPT-2 and its tokenizer saved as a
Hugging Face folder, two attention SAEs saved as SAE folders, the app the command builds, and both
JSON routes checked against plain torch hooks on an independently loaded copy of the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from sae_lens import SAE

import sae_lens_attn.explorer as explorer
from sae_lens_attn import AttnSite
from sae_lens_attn.cli.main import main

from .factories import random_sae
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

PROMPT = "w5 w9 w12 w5 w9 w30 w12"
LAYERS = (0, 1)
TOP = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A saved Hugging Face GPT-2 folder and one saved SAE folder per layer."""
    root = tmp_path_factory.mktemp("explore-hf")
    model: Any = build_hf("gpt2")
    model.save_pretrained(root / "model")
    make_tokenizer(VOCAB_SIZE).save_pretrained(root / "model")
    saes = []
    for layer in LAYERS:
        sae = random_sae(
            AttnSite.from_model(model, layer),
            "topk",
            seed=layer,
            value_bias_convention="included",
        )
        sae.save_model(root / f"sae-{layer}")
        saes.append(root / f"sae-{layer}")
    return root / "model", saes


@pytest.fixture(scope="module")
def client(folders: tuple[Path, list[Path]]) -> Any:
    """The app ``explore --model hf:PATH --sae ...`` serves, captured where it would be served."""
    model_dir, sae_dirs = folders
    served: list[Any] = []

    def capture(app: Any, sock: Any) -> None:
        sock.close()
        served.append(app)

    patch = pytest.MonkeyPatch()
    patch.setattr(explorer, "serve", capture)
    try:
        argv = ["explore", "--model", f"hf:{model_dir}", "--top", str(TOP)]
        assert main([*argv, "--family-contexts", "0", "--sae", *map(str, sae_dirs)]) == 0
    finally:
        patch.undo()
    assert len(served) == 1
    with TestClient(served[0], base_url="http://127.0.0.1") as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reference(folders: tuple[Path, list[Path]]) -> dict[str, Any]:
    """z, values and patterns of every layer on the prompt, from a fresh load of the folder with
    forward hooks on ``c_attn`` (values) and ``c_proj`` (z: its input), and the SAEs loaded
    from their folders."""
    model_dir, sae_dirs = folders
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt")
    z: dict[int, torch.Tensor] = {}
    qkv: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in LAYERS:
        attn = model.transformer.h[layer].attn
        hooks.append(
            attn.c_proj.register_forward_pre_hook(
                lambda _m, args, layer=layer: z.__setitem__(layer, args[0][0].detach())
            )
        )
        hooks.append(
            attn.c_attn.register_forward_hook(
                lambda _m, _args, out, layer=layer: qkv.__setitem__(layer, out[0].detach())
            )
        )
    try:
        with torch.no_grad():
            out = model(tokens.input_ids, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    n_heads, d_model = model.config.n_head, model.config.n_embd
    return {
        "token_ids": tokens.input_ids[0].tolist(),
        "n_heads": n_heads,
        "z": z,
        "v": {  # (pos, head, d_head)
            layer: qkv[layer][:, 2 * d_model :].unflatten(-1, (n_heads, -1)) for layer in LAYERS
        },
        "pattern": {layer: out.attentions[layer][0] for layer in LAYERS},  # (head, q, k)
        "saes": {layer: SAE.load_from_disk(sae_dirs[i]) for i, layer in enumerate(LAYERS)},
    }


def test_run_lists_each_layers_top_features_as_the_sae_encodes_hooked_z(client, reference):
    response = client.post("/api/run", json={"prompt": PROMPT})
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["token_ids"] == reference["token_ids"]
    assert run["tokens"] == ["<bos>", *PROMPT.split()]
    assert sorted(run["layers"]) == [str(layer) for layer in LAYERS]
    for layer in LAYERS:
        z = reference["z"][layer].unflatten(-1, (reference["n_heads"], -1))
        with torch.no_grad():
            acts = reference["saes"][layer].encode(z)  # (pos, d_sae)
        listed = run["layers"][str(layer)]
        assert len(listed) == len(reference["token_ids"])
        for position, items in enumerate(listed):
            values, indices = acts[position].topk(TOP)
            expected = [int(i) for i, v in zip(indices, values, strict=True) if v > 0]
            assert [item["feature"] for item in items] == expected, (layer, position)
            torch.testing.assert_close(
                torch.tensor([item["activation"] for item in items]),
                values[: len(expected)],
            )


@pytest.mark.parametrize("layer", LAYERS)
def test_feature_dfa_matches_patterns_times_values_through_the_encoder(client, reference, layer):
    run = client.post("/api/run", json={"prompt": PROMPT}).json()
    position = len(reference["token_ids"]) - 1
    feature = run["layers"][str(layer)][position][0]["feature"]
    body = {"prompt": PROMPT, "layer": layer, "feature": feature, "position": position}
    response = client.post("/api/feature", json=body)
    assert response.status_code == 200, response.text
    d = response.json()
    assert (d["layer"], d["feature"], d["position"], d["token"]) == (
        layer,
        feature,
        position,
        PROMPT.split()[-1],
    )
    sae = reference["saes"][layer]
    n_heads = reference["n_heads"]
    w = sae.W_enc[:, feature].detach().unflatten(0, (n_heads, -1))  # (head, d_head)
    bias = float((sae.b_enc[feature] - sae.b_dec @ sae.W_enc[:, feature]).detach())
    # z[q, h] = Σ_src pattern[h, q, src] · v[src, h]  (b_V included in v: "included" convention)
    per_src_head = torch.einsum(
        "hs,shd,hd->sh", reference["pattern"][layer][:, position], reference["v"][layer], w
    )
    z = reference["z"][layer][position].unflatten(-1, (n_heads, -1))
    torch.testing.assert_close(torch.tensor(d["by_src"]), per_src_head.sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(d["by_head"]), (z * w).sum(-1), atol=1e-5, rtol=0)
    assert d["bias"] == pytest.approx(bias, abs=1e-5)
    assert d["pre_act"] == pytest.approx(float((z * w).sum()) + bias, abs=1e-5)
    with torch.no_grad():
        acts = sae.encode(reference["z"][layer].unflatten(-1, (n_heads, -1)))[:, feature]
    torch.testing.assert_close(torch.tensor(d["activations"]), acts, atol=1e-5, rtol=0)
    assert all(value == 0 for value in d["by_src"][position + 1 :])
    assert d["family"] is None  # --family-contexts 0
    assert d["logits"] is not None and len(d["logits"]["top"]) > 0


def test_info_names_the_folder_model_and_both_layers(client, folders):
    info = client.get("/api/info").json()
    assert info["backend"] == "nnsight"
    assert [item["layer"] for item in info["layers"]] == list(LAYERS)
    assert [item["hook_name"] for item in info["layers"]] == [
        f"blocks.{layer}.attn.hook_z" for layer in LAYERS
    ]
