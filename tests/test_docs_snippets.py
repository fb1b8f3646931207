"""The documentation as a user meets it: every Python snippet of ``docs/quickstart.md`` runs as
written (in order, in one namespace, offline; the GPT-2 Small one against a local Hub cache holding
a stand-in GPT-2 of the same head structure), docstring examples are in the section the docs
render as code, and the package's own pages and assets load nothing from outside hosts."""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import sae_lens_attn as sla
from sae_lens_attn.pretrained.kissane import config_file_for

from .hf_twins import make_tokenizer
from .hub_cache import add_repo, folder_files, use_hub_cache

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
PACKAGE = ROOT / "sae_lens_attn"
DOWNLOAD_MARK = "# downloads:"
"""First line of a snippet that needs the Hugging Face Hub (the page says so above it)."""
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXTERNAL_RESOURCE = re.compile(
    r"""(?:\b(?:src|href|action)\s*=\s*["']?|@import\s+(?:url\()?["']?|url\(\s*["']?)"""
    r"""(?:https?:)?//""",
    re.IGNORECASE,
)
"""An attribute or CSS rule that loads a URL of another host (``xmlns="http://..."`` is none)."""


def snippets() -> list[str]:
    found = SNIPPET.findall(QUICKSTART.read_text(encoding="utf-8"))
    assert found, f"no ```python blocks found in {QUICKSTART}"
    return found


def run_snippet(code: str, namespace: dict[str, Any], index: int) -> None:
    exec(compile(code, f"{QUICKSTART.name}[python block {index}]", "exec"), namespace)


def test_the_quickstart_has_its_snippets_and_each_parses() -> None:
    found = snippets()
    assert len(found) >= 5
    for code in found:
        ast.parse(code)
    assert [code.startswith(DOWNLOAD_MARK) for code in found].count(True) == 1


@pytest.mark.slow  # trains SAEs twice: about a minute on 2 busy cores
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_every_offline_quickstart_snippet_runs_as_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__quickstart__"}
    for index, code in enumerate(snippets()):
        if not code.startswith(DOWNLOAD_MARK):
            run_snippet(code, namespace, index)
    # what the snippets claim they made
    assert namespace["peak"].by_src.shape[0] == namespace["tokens"].shape[0] == 16
    assert sorted(namespace["saved"]) == [0, 1]
    assert (Path(namespace["saved"][1]) / "cfg.json").is_file()
    assert (tmp_path / "out" / "saes" / "blocks.1.attn.hook_z").is_dir()
    assert any((tmp_path / "out" / "runner-sae").rglob("cfg.json"))
    assert namespace["metrics"]["l0"] > 0


def stand_in_gpt2(folder: Path) -> Path:
    """A GPT-2 with GPT-2 Small's widths (12 heads of 64, d_mlp 3072: TransformerLens takes
    GPT-2's shapes as given) but one layer and a 64-token word-level vocabulary."""
    real_gpt2_keys: dict[str, Any] = {
        "n_ctx": 32
    }  # in GPT-2's config.json; TransformerLens reads it
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=768,
        n_layer=1,
        n_head=12,
        bos_token_id=0,
        eos_token_id=0,
        **real_gpt2_keys,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    make_tokenizer(64).save_pretrained(folder)
    return folder


def kissane_sae_files(layer: int, d_sae: int) -> dict[str, bytes]:
    """One SAE of the ``gpt2-small-attn-z`` release under its real file names: a state dict of
    Kissane et al.'s format and the config keys their loader reads."""
    path = sla.get_release("gpt2-small-attn-z").sae(f"blocks.{layer}").path
    g = torch.Generator().manual_seed(layer)
    W_dec = torch.randn(d_sae, 768, generator=g)
    state = {
        "W_enc": torch.randn(768, d_sae, generator=g) * 0.1,
        "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(768, generator=g) * 0.1,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    cfg = {
        "seed": 49,
        "l1_coeff": 1.0,
        "dict_mult": d_sae // 768,
        "seq_len": 128,
        "enc_dtype": "fp32",
        "model_name": "gpt2-small",
        "site": "z",
        "layer": layer,
        "act_name": f"blocks.{layer}.attn.hook_z",
        "act_size": 768,
        "dict_size": d_sae,
        "name": f"gpt2-small_{layer}_{d_sae}_z",
    }
    return {path: buffer.getvalue(), config_file_for(path): json.dumps(cfg).encode()}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_the_gpt2_small_snippet_runs_as_written_against_a_hub_cache(tmp_path, monkeypatch) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    add_repo(cache, "gpt2", folder_files(stand_in_gpt2(tmp_path / "gpt2")))
    add_repo(cache, "ckkissane/attn-saes-gpt2-small-all-layers", kissane_sae_files(0, 2048))
    monkeypatch.chdir(tmp_path)
    found = snippets()
    download = next(code for code in found if code.startswith(DOWNLOAD_MARK))
    namespace: dict[str, Any] = {"__name__": "__quickstart__"}
    run_snippet(found[0], namespace, 0)  # the imports the page's first snippet made
    run_snippet(download, namespace, found.index(download))
    assert namespace["model"].cfg.n_layers == 1  # the stand-in, from the cache
    assert sla.AttnSite.from_sae(namespace["sae"]) == sla.AttnSite(0, 12, 12, 64)
    by_src = namespace["peak"].by_src  # [prompt, query, src, feature]
    assert (by_src.shape[0], by_src.shape[-1]) == (
        1,
        2,
    ) and by_src.nansum() != 0  # NaN: never fired


def docstrings(tree: ast.AST) -> list[str]:
    nodes = [tree, *ast.walk(tree)]
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in nodes if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def test_docstring_examples_are_in_the_section_rendered_as_code() -> None:
    """mkdocstrings' Google parser renders ``Examples:`` as code; ``Example:`` becomes a note in
    which ``>>>`` lines turn into nested block quotes."""
    wrong = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        for doc in docstrings(ast.parse(path.read_text(encoding="utf-8")))
        if re.search(r"^\s*Example:\s*$", doc, re.MULTILINE)
    ]
    assert wrong == [], f"write 'Examples:' (rendered as code), not 'Example:', in {wrong}"


def test_the_packages_pages_and_assets_load_nothing_from_other_hosts() -> None:
    """Dashboard, explorer and demo pages are built from these files; a page that loads a font,
    script or style from a CDN leaks that it was opened and breaks offline."""
    sources = [
        path
        for path in sorted(PACKAGE.rglob("*"))
        if path.suffix in {".html", ".js", ".css", ".py"} and "__pycache__" not in path.parts
    ]
    assert any(path.suffix == ".html" for path in sources)
    loads = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in sources
        for match in EXTERNAL_RESOURCE.finditer(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert loads == []


def test_the_pattern_catches_external_resources() -> None:
    caught = [
        '<script src="https://cdn.example/x.js">',
        "<link href='//fonts.googleapis.com/css'>",
        "@import url(https://fonts.googleapis.com/css2?family=Roboto);",
        "background: url('http://example.com/a.png')",
    ]
    assert all(EXTERNAL_RESOURCE.search(text) for text in caught)
    assert not EXTERNAL_RESOURCE.search('<svg xmlns="http://www.w3.org/2000/svg">')
    assert not EXTERNAL_RESOURCE.search('<script src="static/explorer.js">')
