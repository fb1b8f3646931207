"""Recursive DFA through the backend interface: the residual reads and weights of TransformerLens,
the TransformerBridge and nnsight agree on the same weights, so do their splits; a bridge's split
sums to SAELens's pre-activation on z taken by an independent hook; dashboards with the RDFA panel
build on bridges; and what cannot be split raises one error type that the panel shows."""

from __future__ import annotations

import re

import pytest

pytest.importorskip(
    "transformer_lens.model_bridge",
    reason="TransformerBridge exists only in TransformerLens >= 3 (the new stack)",
)

from pathlib import Path
from typing import Any

import torch
import transformers
from sae_lens import SAE

from sae_lens_attn import AttnSite, backend_for
from sae_lens_attn.analysis.recursive_dfa import Contribution, RDFAResult, rdfa
from sae_lens_attn.backends import AttnBackend, UnsupportedModelError
from sae_lens_attn.sae_adapter import encode_z
from sae_lens_attn.viz.dashboard import build_dashboard, collect
from sae_lens_attn.viz.dashboard.feature_analyses import peak_rdfa

from .factories import batch, boot, hook_counts, independent_z, random_sae
from .hf_twins import VOCAB_SIZE, build_hf, build_twin, make_tokenizer

ARCHS = ("gpt2", "llama")  # LayerNorm, learned positions, Conv1D; RMSNorm, rotary, GQA
KINDS = ("nnsight", "transformer_lens", "bridge", "bridge_compat")
LAYER, POSITION = 1, 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``make_tokenizer``'s tokenizer loaded back from disk, as ``boot_transformers`` needs."""
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(VOCAB_SIZE).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def model_of(kind: str, arch: str, tokenizer: Any) -> Any:
    """The same weights (``build_hf(arch)``) behind each backend; ``bridge_compat`` is a bridge in
    compatibility mode (LayerNorm and value biases folded, writing weights centred)."""
    if kind == "nnsight":
        return build_hf(arch)
    if kind == "transformer_lens":
        return build_twin(build_hf(arch))
    if kind == "bridge":
        return boot(arch, tokenizer)
    return boot(arch, tokenizer, fold_ln=True)


def saes_for(model: Any, convention: str) -> list[SAE[Any]]:
    """Random SAEs on layers 0 and 1, identical across backends (same sites, same seeds)."""
    return [
        random_sae(AttnSite.from_model(model, layer), seed=layer, value_bias_convention=convention)
        for layer in (0, 1)
    ]


def tokens() -> torch.Tensor:
    return batch(1, 12, seed=3)


def strongest_feature(model: Any, sae: SAE[Any], prompts: torch.Tensor, position: Any) -> int:
    """The feature with the largest activation over ``prompts`` at ``position`` (a slice: all)."""
    site = AttnSite.from_sae(sae, model)
    z = backend_for(model).capture(prompts, [site])[site.layer].z
    return int(encode_z(sae, z)[:, position].flatten(0, -2).amax(0).argmax())


def firing_feature(model: Any, sae: SAE[Any]) -> int:
    """The feature with the largest activation at ``POSITION`` of ``tokens()``."""
    return strongest_feature(model, sae, tokens(), POSITION)


def walk(rows: tuple[Contribution, ...]) -> list[Contribution]:
    out = []
    for row in rows:
        out.append(row)
        out.extend(walk(row.children))
    return out


def assert_sums(result: RDFAResult, pre_act: float) -> None:
    """The invariant against an independent pre-activation, and every expanded row's children."""
    assert result.pre_act == pytest.approx(pre_act, abs=1e-4, rel=1e-4)
    top = sum(row.value for row in result.contributions) + result.bias
    assert top == pytest.approx(pre_act, abs=1e-4, rel=1e-4)
    expanded = [row for row in walk(result.contributions) if row.children]
    assert expanded
    for row in expanded:
        total = sum(c.value for c in row.children) + row.children_bias
        assert total == pytest.approx(row.value, abs=1e-5, rel=1e-3)


# --- the backend interface --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_reads_and_weights_agree_across_backends(arch, tokenizer) -> None:
    backends = {kind: backend_for(model_of(kind, arch, tokenizer)) for kind in KINDS[:3]}
    reads = {kind: b.capture_residual(tokens(), LAYER) for kind, b in backends.items()}
    reference = reads["nnsight"]
    assert len(reference.resid_pre) == 2 and len(reference.attn_out) == 1
    assert (reference.position_embedding is not None) == (arch == "gpt2")
    for kind, read in reads.items():
        for field in ("resid_pre", "norm_scale", "attn_out"):
            for mine, theirs in zip(getattr(read, field), getattr(reference, field), strict=True):
                torch.testing.assert_close(mine.double(), theirs.double(), atol=1e-5, rtol=1e-5)
        if arch == "gpt2":
            assert read.position_embedding is not None and reference.position_embedding is not None
            torch.testing.assert_close(read.position_embedding, reference.position_embedding)
        else:
            assert read.position_embedding is None, kind
        for layer in (0, 1):
            torch.testing.assert_close(read.attention[layer].z, reference.attention[layer].z)
    for layer in (0, 1):
        norms = {kind: b.attn_norm(layer) for kind, b in backends.items()}
        for kind, backend in backends.items():
            norm = norms[kind]
            assert norm is not None and norm.centres == (arch == "gpt2"), kind
            torch.testing.assert_close(norm.weight, norms["nnsight"].weight)  # type: ignore[union-attr]
            for method in ("values_weight", "out_proj_weight", "out_proj_bias"):
                mine = getattr(backend, method)(layer)
                theirs = getattr(backends["nnsight"], method)(layer)
                torch.testing.assert_close(mine, theirs, msg=f"{kind} {method}")
        site = backends["nnsight"].site(layer)
        assert backends["nnsight"].values_weight(layer).shape == (
            site.n_heads,
            32,
            site.d_head,
        )  # grouped KV heads expanded (Llama: 2 KV heads for 4)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_the_residual_hooks_are_removed_after_the_pass(kind, tokenizer) -> None:
    backend = backend_for(model_of(kind, "gpt2", tokenizer))
    backend.forward(tokens())  # a bridge wires hooks of its own on its first pass
    before = hook_counts(backend.model)
    backend.capture_residual(tokens(), LAYER)
    assert hook_counts(backend.model) == before
    with pytest.raises(ValueError, match="out of range"):
        backend.capture_residual(tokens(), 2)
    assert hook_counts(backend.model) == before


# --- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "convention"),
    [
        ("gpt2", "included"),
        ("gpt2", "folded"),
        ("llama", "included"),
        pytest.param("llama", "folded", marks=pytest.mark.slow),  # about 7 s on 2 cores
    ],
)
def test_rdfa_is_the_same_on_every_backend(arch, convention, tokenizer) -> None:
    kinds = KINDS if convention == "folded" else KINDS[:3]  # compatibility mode folds b_V away
    results = {}
    for kind in kinds:
        model = model_of(kind, arch, tokenizer)
        saes = saes_for(model, convention)
        feature = firing_feature(model, saes[1])
        results[kind] = rdfa(model, saes, tokens(), LAYER, feature, POSITION, expand=2)
    reference = results["nnsight"].rows()
    kinds_seen = {row["kind"] for row in reference}
    assert {"feature", "mlp", "sae_error", "sae_decoder_bias", "token_embedding"} <= kinds_seen
    assert ("position_embedding" in kinds_seen) == (arch == "gpt2")
    assert ("value_bias" in kinds_seen) == (convention == "included")
    for kind, result in results.items():
        rows = result.rows()
        keys = [(r["kind"], r["layer"], r["position"], r["feature"]) for r in rows]
        assert keys == [(r["kind"], r["layer"], r["position"], r["feature"]) for r in reference]
        torch.testing.assert_close(
            torch.tensor([r["value"] for r in rows], dtype=torch.float64),
            torch.tensor([r["value"] for r in reference], dtype=torch.float64),
            atol=1e-5,
            rtol=1e-4,
            msg=kind,
        )


@pytest.mark.parametrize(
    ("kind", "convention"),
    [("bridge", "included"), ("bridge", "folded"), ("bridge_compat", "folded")],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_bridge_split_sums_to_saelens_pre_activation(arch, kind, convention, tokenizer) -> None:
    bridge = model_of(kind, arch, tokenizer)
    saes = saes_for(bridge, convention)
    feature = firing_feature(bridge, saes[1])
    result = rdfa(bridge, saes, tokens(), LAYER, feature, POSITION, expand=3)
    z = independent_z(build_hf(arch), tokens(), LAYER, convention=convention)  # no backend
    _, cache = saes[1].run_with_cache(z)
    assert_sums(result, float(cache["hook_sae_acts_pre"][0, POSITION, feature]))
    assert result.activation > 0


# --- dashboards and what cannot be split ------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_a_bridge_dashboard_carries_the_rdfa_panel(arch, tokenizer, tmp_path: Path) -> None:
    bridge = boot(arch, tokenizer)
    saes = saes_for(bridge, "included")
    prompts = batch(3, 12, seed=5)
    feature = strongest_feature(bridge, saes[1], prompts, slice(None))
    board = build_dashboard(
        bridge, saes[1], prompts, tmp_path / "d", features=[feature], engine="own",
        n_contexts=2, progress=False, upstream_saes=[saes[0]],
    )  # fmt: skip
    text = board.pages[feature].read_text()
    assert 'id="rdfa-panel"' in text and "L0 feature" in text and "<details>" in text
    assert "No recursive DFA" not in text


class NoResidualBackend(AttnBackend):
    """A third-party backend that captures and splices z but does not read the residual stream."""

    name = "no-residual"

    def __init__(self, inner: AttnBackend) -> None:
        self.inner, self.model = inner, inner.model

    @property
    def n_layers(self) -> int:
        return self.inner.n_layers

    def site(self, layer: int) -> AttnSite:
        return self.inner.site(layer)

    def value_bias(self, site: AttnSite) -> torch.Tensor:
        return self.inner.value_bias(site)

    def intervening(self, plan: Any) -> Any:
        return self.inner.intervening(plan)

    def out_proj_weight(self, layer: int) -> torch.Tensor:
        return self.inner.out_proj_weight(layer)

    def unembed(self) -> torch.Tensor:
        return self.inner.unembed()

    def forward(self, tokens: Any, **kwargs: Any) -> Any:
        return self.inner.forward(tokens, **kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tok: build_hf("gemma2"), r"backend 'nnsight'\): its attention output passes"),
        (lambda tok: boot("gemma2", tok), r"backend 'bridge'\): its attention output passes"),
        (lambda tok: boot("gemma", tok), r"backend 'bridge'\): layer 0's values are not"),
        (
            lambda tok: NoResidualBackend(backend_for(build_hf("gpt2"))),
            r"backend 'no-residual' \(NoResidualBackend\) does not read the residual stream",
        ),
    ],
)
def test_what_cannot_be_split_raises_one_error_that_the_panel_shows(
    make, message, tokenizer
) -> None:
    model = make(tokenizer)
    saes = saes_for(model, "included")
    with pytest.raises(UnsupportedModelError, match=message) as caught:
        rdfa(model, saes, tokens(), LAYER, 0, POSITION)
    assert isinstance(caught.value, ValueError)  # callers that catch bad input keep working
    assert "transformer_lens" in str(caught.value) or "Recursive DFA splits" in str(caught.value)
    feature = firing_feature(model, saes[1])
    (data,) = collect(model, saes[1], tokens(), [feature], tokenizer=tokenizer, n_contexts=1)
    peak = peak_rdfa(model, saes[1], [saes[0]], tokens(), data)
    assert peak.result is None and peak.note.startswith("No recursive DFA for this model")
    assert re.search(message, peak.note)  # the same error (its numbers are of another prompt)


def test_bad_input_is_not_shown_as_an_unsupported_model(tokenizer) -> None:
    bridge = boot("gpt2", tokenizer)
    saes = saes_for(bridge, "included")
    feature = firing_feature(bridge, saes[1])
    (data,) = collect(bridge, saes[1], tokens(), [feature], n_contexts=1)
    with pytest.raises(ValueError, match="two SAEs read layer 0"):
        peak_rdfa(bridge, saes[1], [saes[0], saes[0]], tokens(), data)
