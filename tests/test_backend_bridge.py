"""TransformerBridge backend: parity with nnsight, the o_proj input and HookedTransformer twins; the
value-bias conventions with and without compatibility mode; the store, DFA, evaluation, training
configs and SAELens's runner on a bridge; SAELens's SAETransformerBridge and our workaround."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "transformer_lens.model_bridge",
    reason="TransformerBridge exists only in TransformerLens >= 3 (the new stack)",
)

import subprocess
import sys
from typing import Any, cast

import torch
import transformers
from datasets import Dataset
from sae_lens import SAE, SAETransformerBridge
from sae_lens.training.activations_store import ActivationsStore

import sae_lens_attn as sla
from sae_lens_attn import AttnActivationStore, AttnSite, TokenBatches, backend_for
from sae_lens_attn.backends.bridge import BridgeBackend, HookZSAETransformerBridge, sae_bridge

from .factories import (
    boot,
    hook_counts,
    near_identity_sae,
    out_proj_inputs,
    random_sae,
    run_saelens_runner,
)
from .hf_twins import PAD_ID, VOCAB_SIZE, build_hf, build_twin, make_tokenizer

ARCHS = ("gpt2", "llama", "neox")
ATOL = 1e-5  # float32; rtol=0 so small values get no slack
CTX = 16  # run_saelens_runner's context size


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``make_tokenizer``'s tokenizer loaded back from disk, as ``boot_transformers`` needs."""
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(VOCAB_SIZE).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def folded(arch: str, tokenizer: Any) -> Any:
    """A bridge in compatibility mode with HookedTransformer's default processing."""
    return boot(arch, tokenizer, fold_ln=True)


@pytest.fixture(scope="module", params=ARCHS)
def models(request: pytest.FixtureRequest, tokenizer: Any) -> tuple[str, Any, Any]:
    """(arch, bridge, HF model with the same weights)."""
    return request.param, boot(request.param, tokenizer), build_hf(request.param)


def tokens_for(batch: int = 3, pos: int = 12, seed: int = 0) -> torch.Tensor:
    rows = torch.randint(2, VOCAB_SIZE, (batch, pos), generator=torch.Generator().manual_seed(seed))
    rows[:, 0] = 0
    return rows


def sites_of(model: Any) -> list[AttnSite]:
    return [AttnSite.from_model(model, layer) for layer in range(2)]


def assert_close(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert a is not None and b is not None
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0.0)


# --- the backend --------------------------------------------------------------------------


def test_backend_for_a_bridge_is_the_bridge_backend(models) -> None:
    _, bridge, hf_model = models
    backend = backend_for(bridge)
    assert isinstance(backend, BridgeBackend) and backend.name == "bridge"
    assert backend_for(bridge) is backend
    assert backend.n_layers == 2
    assert sites_of(bridge) == sites_of(hf_model)
    assert backend.hf_architecture_name == type(hf_model).__name__
    assert backend.tokenizer is bridge.tokenizer
    with pytest.raises(ValueError, match="out of range"):
        backend.site(2)


@pytest.mark.slow
def test_the_bridge_module_is_imported_only_for_bridges() -> None:
    code = (
        "import sys, sae_lens_attn; "
        "assert 'sae_lens_attn.backends.bridge' not in sys.modules, 'imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_other_models_are_refused_with_the_supported_types() -> None:
    with pytest.raises(TypeError, match="TransformerBridge"):
        backend_for(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="needs a transformer_lens.model_bridge"):
        BridgeBackend(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("convention", ["included", "folded"])
def test_z_patterns_values_equal_nnsight_and_the_out_proj_input(models, convention) -> None:
    _, bridge, hf_model = models
    tokens = tokens_for()
    sites = sites_of(bridge)
    ours = backend_for(bridge).capture(
        tokens, sites, pattern=True, values=True, convention=convention
    )
    theirs = backend_for(hf_model).capture(
        tokens, sites, pattern=True, values=True, convention=convention
    )
    for site in sites:
        for field in ("z", "pattern", "values"):
            assert_close(getattr(ours[site.layer], field), getattr(theirs[site.layer], field))
    if convention == "included":
        reference = out_proj_inputs(hf_model, tokens)
        for site in sites:
            assert_close(ours[site.layer].z_flat, reference[site.layer])


def test_z_is_pattern_times_expanded_values(models) -> None:
    _, bridge, _ = models
    site = AttnSite.from_model(bridge, 1)
    cap = backend_for(bridge).capture(
        tokens_for(), [site], pattern=True, values=True, convention="included"
    )[1]
    assert cap.values is not None and cap.values.shape[-2] == site.n_heads  # KV heads expanded
    assert_close(torch.einsum("bhqs,bshd->bqhd", cap.pattern, cap.values), cap.z)


def test_spliced_sae_logits_equal_nnsight(models) -> None:
    _, bridge, hf_model = models
    tokens = tokens_for()
    for convention in ("included", "folded"):
        saes = {site: random_sae(site, seed=site.layer) for site in sites_of(bridge)}
        with torch.no_grad():
            with backend_for(bridge).splicing(saes, convention=convention):
                ours = backend_for(bridge).forward(tokens)
            with backend_for(hf_model).splicing(saes, convention=convention):
                theirs = backend_for(hf_model).forward(tokens)
            clean = bridge(tokens)
        assert_close(ours, theirs)
        assert ours is not None and (ours - clean).abs().max() > 1e-3  # really spliced


@pytest.mark.parametrize("arch", ARCHS)
def test_z_patterns_and_spliced_logits_equal_a_hooked_transformer_twin(arch, tokenizer) -> None:
    twin = build_twin(build_hf(arch))
    bridge, tokens = boot(arch, tokenizer), tokens_for()
    sites = sites_of(bridge)
    ours = backend_for(bridge).capture(
        tokens, sites, pattern=True, values=True, convention="included"
    )
    theirs = backend_for(twin).capture(
        tokens, sites, pattern=True, values=True, convention="included"
    )
    for site in sites:
        for field in ("z", "pattern", "values"):
            assert_close(getattr(ours[site.layer], field), getattr(theirs[site.layer], field))
    saes = {site: random_sae(site, seed=site.layer) for site in sites}
    with torch.no_grad(), backend_for(bridge).splicing(saes, convention="included"):
        spliced = backend_for(bridge).forward(tokens)
    with torch.no_grad(), backend_for(twin).splicing(saes, convention="included"):
        twin_spliced = backend_for(twin).forward(tokens)
    assert_close(spliced, twin_spliced)


def test_each_hook_fires_once_and_identity_splices_keep_logits(models) -> None:
    _, bridge, _ = models
    backend, tokens = backend_for(bridge), tokens_for()
    calls: dict[int, int] = {}

    def identity(layer: int):
        def fn(z: torch.Tensor) -> torch.Tensor:
            calls[layer] = calls.get(layer, 0) + 1
            return z.clone()

        return fn

    with torch.no_grad():
        clean = backend.forward(tokens)
        with backend.splicing(
            {s: identity(s.layer) for s in sites_of(bridge)}, convention="included"
        ):
            spliced = backend.forward(tokens)
    assert calls == {0: 1, 1: 1}
    assert_close(spliced, clean)


def test_capture_stops_after_the_last_layer_needed(models) -> None:
    _, bridge, _ = models
    backend = backend_for(bridge)
    first, second = sites_of(bridge)

    def boom(z: torch.Tensor) -> torch.Tensor:
        raise AssertionError("layer 1 ran although only layer 0 was needed")

    with backend.splicing({second: boom}, convention="included"):
        caps = backend.capture(tokens_for(), [first], convention="included")
        assert backend.forward(tokens_for(), stop_at_layer=1) is None
    assert caps[0].z.shape == (3, 12, first.n_heads, first.d_head)


def test_hooks_are_removed_after_an_exception(models) -> None:
    _, bridge, _ = models
    backend, before = backend_for(bridge), hook_counts(bridge)

    def boom(z: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    sites = sites_of(bridge)
    with (
        pytest.raises(RuntimeError, match="boom"),
        backend.capturing(sites, pattern=True, values=True, convention="included"),
        backend.splicing({sites[1]: boom}, convention="included"),
    ):
        backend.forward(tokens_for())
    assert hook_counts(bridge) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_give_the_z_they_give_alone(arch, tokenizer) -> None:
    bridge, hf_model = boot(arch, tokenizer), build_hf(arch)
    tokens, mask = tokens_for(2, 10), torch.ones(2, 10, dtype=torch.long)
    tokens[0, :4], mask[0, :4] = PAD_ID, 0
    sites = sites_of(bridge)
    padded = backend_for(bridge).capture(tokens, sites, convention="included", attention_mask=mask)
    alone = backend_for(bridge).capture(tokens[:1, 4:], sites, convention="included")
    hf = backend_for(hf_model).capture(tokens, sites, convention="included", attention_mask=mask)
    for site in sites:
        assert_close(padded[site.layer].z[0, 4:], alone[site.layer].z[0])
        assert_close(padded[site.layer].z[:, 4:], hf[site.layer].z[:, 4:])


# --- value-bias conventions ---------------------------------------------------------------


def test_value_bias_of_a_booted_bridge_is_b_V_plus_beta_W_V(models) -> None:
    arch, bridge, hf_model = models
    backend, reference = backend_for(bridge), backend_for(hf_model)
    for site in sites_of(bridge):
        assert_close(backend.value_bias(site), reference.value_bias(site))
    # GPT-2 and NeoX have b_V and LayerNorm biases; this Llama has neither.
    assert backend.native_convention == ("folded" if arch == "llama" else "included")


@pytest.mark.parametrize("arch", ARCHS)
def test_compatibility_mode_shifts_z_by_exactly_the_value_bias(arch, tokenizer) -> None:
    """Measured: z of a booted bridge minus z of one in compatibility mode is ``b_V + β·W_V``."""
    raw, compat, tokens = boot(arch, tokenizer), folded(arch, tokenizer), tokens_for()
    sites = sites_of(raw)
    reference = backend_for(build_hf(arch))
    z_raw = backend_for(raw).capture(tokens, sites, convention="included")
    z_compat = backend_for(compat).capture(tokens, sites, convention="folded")
    for site in sites:
        b_v = reference.value_bias(site)  # b_V + β·W_V from the HF modules
        assert_close(
            z_raw[site.layer].z - z_compat[site.layer].z, b_v.expand_as(z_raw[site.layer].z)
        )
        assert_close(backend_for(compat).value_bias(site), torch.zeros_like(b_v))  # nothing left
        if arch != "llama":
            assert b_v.abs().max() > 1e-2  # not met trivially
    assert backend_for(compat).native_convention == "folded"
    # Both bridges deliver the same folded z: the conversion is exact on either.
    z_raw_folded = backend_for(raw).capture(tokens, sites, convention="folded")
    for site in sites:
        assert_close(z_raw_folded[site.layer].z, z_compat[site.layer].z)


def test_compatibility_mode_without_folding_value_biases_stays_included(tokenizer) -> None:
    raw, compat = boot("gpt2", tokenizer), boot("gpt2", tokenizer, fold_value_biases=False)
    backend = backend_for(compat)
    assert backend.native_convention == "included"
    sites = sites_of(raw)
    for site in sites:
        assert_close(backend.value_bias(site), backend_for(raw).value_bias(site))
    a = backend_for(raw).capture(tokens_for(), sites, convention="included")
    b = backend.capture(tokens_for(), sites, convention="included")
    for site in sites:
        assert_close(a[site.layer].z, b[site.layer].z)


def test_an_included_sae_on_a_bridge_that_folded_its_value_biases_is_a_clear_error(
    tokenizer,
) -> None:
    compat = folded("gpt2", tokenizer)
    site = AttnSite.from_model(compat, 1)
    sae = random_sae(site, value_bias_convention="included")
    with pytest.raises(ValueError, match=r"'included'.*compatibility mode.*'folded'"):
        sla.analysis.dfa(compat, sae, tokens_for())
    with pytest.raises(ValueError, match="fold_value_biases=False"):
        sla.evaluate(compat, sae, tokens_for(4, CTX), progress=False)
    with (
        pytest.raises(ValueError, match="compatibility mode"),
        backend_for(compat).splicing({site: sae}, convention="included"),
    ):
        pass
    # A model without value biases (RMSNorm, no b_V) loses nothing: both conventions agree.
    llama = folded("llama", tokenizer)
    llama_site = AttnSite.from_model(llama, 1)
    caps = {
        c: backend_for(llama).capture(tokens_for(), [llama_site], convention=c)[1].z
        for c in ("included", "folded")
    }
    assert_close(caps["included"], caps["folded"])


# --- the store, DFA, evaluation and training configs on a bridge ---------------------------


def test_the_store_on_a_bridge_serves_what_it_serves_on_the_hf_model(models) -> None:
    _, bridge, hf_model = models
    tokens = tokens_for(4, CTX)
    for convention in ("included", "folded"):
        ours = AttnActivationStore(bridge, [0, 1], [tokens], convention=convention)
        theirs = AttnActivationStore(hf_model, [0, 1], [tokens], convention=convention)
        a, b = ours.activations(tokens), theirs.activations(tokens)
        assert list(a) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
        for name in a:
            assert_close(a[name], b[name])
    batch = next(
        AttnActivationStore(
            bridge, [1], TokenBatches(tokens, 2), train_batch_size_tokens=16, buffer_size_tokens=32
        )
    )
    assert batch["blocks.1.attn.hook_z"].shape == (16, AttnSite.from_model(bridge, 1).d_in)


@pytest.mark.parametrize("processing", ["booted", "compatibility mode"])
def test_dfa_on_a_bridge_sums_to_the_pre_activation(processing, tokenizer) -> None:
    bridge = boot("gpt2", tokenizer) if processing == "booted" else folded("gpt2", tokenizer)
    hf_model = build_hf("gpt2")
    site = AttnSite.from_model(bridge, 1)
    sae = random_sae(site, value_bias_convention="folded")
    tokens = tokens_for()
    result = sla.analysis.dfa(bridge, sae, tokens, features=[0, 3, 7])
    assert_close(result.by_src.sum(2) + result.bias, result.pre_act)
    assert_close(result.by_head.sum(2) + result.bias, result.pre_act)
    reference = sla.analysis.dfa(hf_model, sae, tokens, features=[0, 3, 7])
    assert_close(result.by_src, reference.by_src)
    assert_close(result.pre_act, reference.pre_act)


def test_evaluate_on_a_bridge_equals_evaluate_on_the_hf_model(models) -> None:
    _, bridge, hf_model = models
    site = AttnSite.from_model(bridge, 1)
    sae = near_identity_sae(site, value_bias_convention=backend_for(bridge).native_convention)
    tokens = tokens_for(8, CTX, seed=3)
    ours = sla.evaluate(bridge, sae, tokens, batch_size=4, exclude_tokens=[0], progress=False)
    theirs = sla.evaluate(hf_model, sae, tokens, batch_size=4, exclude_tokens=[0], progress=False)
    assert set(ours) == set(theirs)
    for key in ours:
        assert abs(ours[key] - theirs[key]) <= 1e-4, key


@pytest.mark.parametrize("processing", ["booted", "compatibility mode"])
def test_training_config_from_a_bridge_records_its_site_and_convention(
    processing, tokenizer
) -> None:
    bridge = boot("gpt2", tokenizer) if processing == "booted" else folded("gpt2", tokenizer)
    cfg = sla.attn_sae_training_config(bridge, 1, "topk", d_sae=64, k=4)
    meta = cfg.attention_metadata()  # what the saved SAE's metadata will hold
    assert cfg.d_in == 32
    assert {k: meta[k] for k in ("hook_name", "n_heads", "n_kv_heads", "d_head")} == {
        "hook_name": "blocks.1.attn.hook_z",
        "n_heads": 4,
        "n_kv_heads": 4,
        "d_head": 8,
    }
    assert (meta["hf_architecture"], meta["hf_module_path"]) == (
        "GPT2LMHeadModel",
        "transformer.h.1.attn.c_proj",
    )
    expected = "included" if processing == "booted" else "folded"
    assert meta["value_bias_convention"] == expected


# --- SAELens: the runner, SAETransformerBridge and the workaround --------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saelens_runner_trains_on_a_bridge_and_sae_bridge_splices_it_back(
    arch, tokenizer, tmp_path
) -> None:
    bridge = boot(arch, tokenizer)
    cfg = sla.attn_sae_training_config(bridge, 1, "topk", d_sae=64, k=4)
    dataset = Dataset.from_dict({"tokens": tokens_for(32, CTX, seed=1).tolist()})
    run_saelens_runner(bridge, cfg, "blocks.1.attn.hook_z", tmp_path, dataset)
    sae = SAE.load_from_disk(tmp_path)
    assert sae.cfg.reshape_activations == "hook_z"
    assert AttnSite.from_sae(sae, bridge) == AttnSite.from_model(bridge, 1)

    tokens = tokens_for()
    spliced_by_saelens = boot(arch, tokenizer, cls=HookZSAETransformerBridge)
    with torch.no_grad():
        theirs = spliced_by_saelens.run_with_saes(tokens, saes=[sae])
        site = AttnSite.from_sae(sae, bridge)
        convention = sae.cfg.metadata.value_bias_convention
        with backend_for(bridge).splicing({site: sae}, convention=convention):
            ours = backend_for(bridge).forward(tokens)
        hf_model = build_hf(arch)
        with backend_for(hf_model).splicing({site: sae}, convention=convention):
            via_nnsight = backend_for(hf_model).forward(tokens)
        clean = bridge(tokens)
    assert_close(theirs, ours)
    assert_close(ours, via_nnsight)
    assert ours is not None and (ours - clean).abs().max() > 1e-4


def test_saelens_bridge_drops_hook_z_and_leaves_it_flattened_after_reset(tokenizer) -> None:
    """Pins the SAELens 6.54 behaviour ``sae_bridge`` works around; when this fails, SAELens
    has fixed it: drop what it fixed from ``HookZSAETransformerBridge`` and docs/upstream.md."""
    bridge = boot("gpt2", tokenizer, cls=SAETransformerBridge)
    assert type(bridge) is SAETransformerBridge
    assert "blocks.1.attn.hook_z" not in bridge.hook_dict
    _, cache = bridge.run_with_cache(tokens_for(), names_filter=["blocks.1.attn.hook_z"])
    assert "blocks.1.attn.hook_z" not in cache  # silently nothing
    site = AttnSite.from_model(bridge, 1)
    shape = (3, 12, site.n_heads, site.d_head)
    name = "blocks.1.attn.o.hook_in"
    assert bridge.run_with_cache(tokens_for(), names_filter=[name])[1][name].shape == shape
    bridge.run_with_saes(tokens_for(), saes=[random_sae(site)])
    assert bridge.run_with_cache(tokens_for(), names_filter=[name])[1][name].shape == (3, 12, 32)
    assert bridge.hook_dict[name].name == "hook_in"  # renamed by the component it was set on
    seen: list[torch.Tensor] = []
    bridge.run_with_hooks(tokens_for(), fwd_hooks=[(name, lambda z, hook: seen.append(z))])
    assert seen == []  # so hooks on it by name are silently not added


def test_sae_bridge_keeps_hook_z_before_and_after_saes(tokenizer) -> None:
    bridge = sae_bridge("tiny-gpt2", hf_model=build_hf("gpt2"), tokenizer=tokenizer, device="cpu")
    assert isinstance(bridge, SAETransformerBridge)
    site = AttnSite.from_model(bridge, 1)
    shape = (3, 12, site.n_heads, site.d_head)

    def hook_z() -> torch.Tensor:
        _, cache = bridge.run_with_cache(tokens_for(), names_filter=[site.hook_name])
        return cache[site.hook_name]

    before = hook_z()
    assert before.shape == shape
    sae = random_sae(site)
    with torch.no_grad():
        spliced = cast(torch.Tensor, bridge.run_with_saes(tokens_for(), saes=[sae]))
    assert not torch.allclose(spliced, bridge(tokens_for()), atol=1e-4)
    assert_close(hook_z(), before)  # unflattened again, and the SAE is gone
    seen: list[tuple[int, ...]] = []
    bridge.run_with_hooks(
        tokens_for(), fwd_hooks=[(site.hook_name, lambda z, hook: seen.append(tuple(z.shape)))]
    )
    assert seen == [shape]
    # SAELens's own store finds hook_z and flattens it.
    store = ActivationsStore(
        cast(Any, bridge),  # typed HookedRootModule; SAELens duck-types the model
        Dataset.from_dict({"tokens": tokens_for(8, CTX).tolist()}),
        streaming=False,
        hook_name=site.hook_name,
        hook_head_index=None,
        context_size=CTX,
        d_in=site.d_in,
        n_batches_in_buffer=2,
        total_training_tokens=256,
        store_batch_size_prompts=4,
        train_batch_size_tokens=32,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    batch = store.get_batch_tokens()
    ours = AttnActivationStore(bridge, [1], [batch], convention="included").activations(batch)
    torch.testing.assert_close(
        store.get_activations(batch).reshape(-1, site.d_in), ours[site.hook_name]
    )


def test_the_backend_captures_on_an_saelens_bridge_with_or_without_the_workaround(
    tokenizer,
) -> None:
    reference = backend_for(build_hf("gpt2")).capture(
        tokens_for(), sites_of(build_hf("gpt2")), pattern=True, convention="included"
    )
    for cls in (SAETransformerBridge, HookZSAETransformerBridge):
        bridge = boot("gpt2", tokenizer, cls=cls)
        bridge.run_with_saes(tokens_for(), saes=[random_sae(AttnSite.from_model(bridge, 1))])
        caps = backend_for(bridge).capture(
            tokens_for(), sites_of(bridge), pattern=True, convention="included"
        )
        for layer in range(2):
            assert_close(caps[layer].z, reference[layer].z)
            assert_close(caps[layer].pattern, reference[layer].pattern)


def test_sae_bridge_restores_an_outer_sae_and_then_the_hook_point(tokenizer) -> None:
    bridge = sae_bridge("tiny-gpt2", hf_model=build_hf("gpt2"), tokenizer=tokenizer, device="cpu")
    site = AttnSite.from_model(bridge, 1)
    outer, inner = random_sae(site, seed=1), random_sae(site, seed=2)
    point = bridge.blocks[1].attn.o.hook_in
    with torch.no_grad():
        with_outer = cast(torch.Tensor, bridge.run_with_saes(tokens_for(), saes=[outer]))
        with bridge.saes(saes=[outer]):
            bridge.run_with_saes(tokens_for(), saes=[inner])  # puts `outer` back at the end
            assert_close(bridge(tokens_for()), with_outer)
    assert bridge.blocks[1].attn.o.hook_in is point and point.name == "blocks.1.attn.o.hook_in"
    assert bridge.hook_dict[site.hook_name] is point
    assert outer.hook_z_reshaping_mode and inner.hook_z_reshaping_mode
    z = torch.randn(2, 5, site.n_heads, site.d_head)
    assert outer(z).shape == z.shape  # still takes hook_z-shaped input


def test_saelens_bridge_leaves_an_outer_sae_unreshaped_after_nested_saes(tokenizer) -> None:
    """Pins the SAELens 6.54 behaviour that ``HookZSAETransformerBridge.add_sae`` works around."""
    bridge = boot("gpt2", tokenizer, cls=SAETransformerBridge)
    site = AttnSite.from_model(bridge, 1)
    outer, inner = random_sae(site, seed=1), random_sae(site, seed=2)
    with bridge.saes(saes=[outer]):
        bridge.run_with_saes(tokens_for(), saes=[inner])
    assert inner.hook_z_reshaping_mode and not outer.hook_z_reshaping_mode
