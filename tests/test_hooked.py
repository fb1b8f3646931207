"""sla.hooked: SAELens's own store, runner and evals on a Hugging Face model, through hook_z."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import (
    SAE,
)
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids

import sae_lens_attn as sla
from sae_lens_attn import AttnActivationStore, AttnSite, TokenBatches, backend_for

from .factories import run_saelens_runner
from .hf_twins import VOCAB_SIZE, build_hf, make_tokenizer

CTX = 16


@pytest.fixture(scope="module")
def hooked_llama() -> sla.HookedHFModel:
    return sla.hooked(build_hf("llama"), make_tokenizer(VOCAB_SIZE))


def tokens_for(n: int = 4, seed: int = 0) -> torch.Tensor:
    rows = torch.randint(2, VOCAB_SIZE, (n, CTX), generator=torch.Generator().manual_seed(seed))
    rows[:, 0] = 0
    return rows


def test_hook_points_match_the_backend(hooked_llama) -> None:
    tokens = tokens_for()
    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_v", "blocks.1.attn.hook_pattern"]
    logits, cache = hooked_llama.run_with_cache(tokens, names_filter=names)
    site = AttnSite.from_model(hooked_llama, 1)
    cap = backend_for(hooked_llama).capture(
        tokens, [site], pattern=True, values=True, convention="included"
    )[1]
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], cap.z)
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"], cap.pattern)
    assert cache["blocks.1.attn.hook_v"].shape == (4, CTX, site.n_kv_heads, site.d_head)
    with torch.no_grad():
        torch.testing.assert_close(logits, hooked_llama.model(tokens).logits)


def test_hooks_on_z_replace_it(hooked_llama) -> None:
    tokens = tokens_for()
    clean = hooked_llama(tokens)
    zeroed = hooked_llama.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z * 0)]
    )
    assert not torch.allclose(clean, zeroed, atol=1e-4)
    torch.testing.assert_close(hooked_llama(tokens), clean)  # hooks removed afterwards


def test_stop_at_layer_and_return_types(hooked_llama) -> None:
    tokens = tokens_for()
    _, cache = hooked_llama.run_with_cache(
        tokens, names_filter=["blocks.0.attn.hook_z"], stop_at_layer=1
    )
    assert cache["blocks.0.attn.hook_z"].shape[:2] == (4, CTX)
    _logits, loss = hooked_llama(tokens, return_type="both")
    assert loss.ndim == 0 and loss > 0
    torch.testing.assert_close(hooked_llama(tokens, return_type="loss"), loss)
    text_tokens = hooked_llama.to_tokens("w5 w6 w7")
    assert text_tokens.tolist() == [[0, 5, 6, 7]]


def test_hooked_returns_transformer_lens_models_unchanged(model) -> None:
    assert sla.hooked(model) is model


def test_saelens_activations_store_flattens_hook_z(hooked_llama) -> None:
    dataset = Dataset.from_dict({"tokens": tokens_for(8).tolist()})
    store = ActivationsStore(
        hooked_llama,
        dataset,
        streaming=False,
        hook_name="blocks.1.attn.hook_z",
        hook_head_index=None,
        context_size=CTX,
        d_in=32,
        n_batches_in_buffer=2,
        total_training_tokens=256,
        store_batch_size_prompts=4,
        train_batch_size_tokens=32,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    tokens = store.get_batch_tokens()
    ours = AttnActivationStore(hooked_llama, [1], [tokens], convention="included").activations(
        tokens
    )
    torch.testing.assert_close(
        store.get_activations(tokens).reshape(-1, 32), ours["blocks.1.attn.hook_z"]
    )


def test_saelens_runner_and_evals_on_a_hugging_face_model(hooked_llama, tmp_path) -> None:
    cfg = sla.attn_sae_training_config(hooked_llama, 1, "topk", d_sae=64, k=4)
    dataset = Dataset.from_dict({"tokens": tokens_for(32, seed=1).tolist()})
    run_saelens_runner(hooked_llama, cfg, "blocks.1.attn.hook_z", tmp_path, dataset)
    sae = SAE.load_from_disk(tmp_path)
    assert sae.cfg.reshape_activations == "hook_z"
    meta = sae.cfg.metadata
    assert (meta.hf_architecture, meta.hf_module_path) == (
        "LlamaForCausalLM",
        "model.layers.1.self_attn.o_proj",
    )
    assert (meta.n_heads, meta.n_kv_heads, meta.d_head) == (4, 2, 8)
    assert AttnSite.from_sae(sae, hooked_llama.model) == AttnSite(1, 4, 2, 8)

    store = ActivationsStore.from_sae(
        hooked_llama,
        sae,
        dataset,
        streaming=False,
        store_batch_size_prompts=4,
        train_batch_size_tokens=64,
        n_batches_in_buffer=8,
    )
    seen: list[torch.Tensor] = []  # the token batches SAELens's evals read, in order
    read_batch = store.get_batch_tokens

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(read_batch(*args, **kwargs))
        return seen[-1]

    store.get_batch_tokens = recording  # type: ignore[method-assign]
    metrics, _ = run_evals(
        sae,
        store,
        hooked_llama,
        ActivationScaler(),
        EvalConfig(
            batch_size_prompts=4,
            n_eval_reconstruction_batches=2,
            n_eval_sparsity_variance_batches=2,
            compute_ce_loss=True,
            compute_variance_metrics=True,
            compute_sparsity_metrics=True,
        ),
    )
    ce = metrics["model_performance_preservation"]
    assert all(torch.isfinite(torch.tensor(v)) for v in ce.values())
    # a random model: ablation need not hurt, but the splice must have changed the loss
    assert ce["ce_loss_with_ablation"] != ce["ce_loss_without_sae"]
    assert ce["ce_loss_with_sae"] != ce["ce_loss_without_sae"]
    # L0 recomputed without the facade: z from a pre-hook on the HF o_proj, SAELens's encode, on
    # the sparsity batches (run_evals reads the reconstruction batches first), special tokens out
    assert len(seen) == 4
    tokens = torch.cat(seen[2:])
    captured: list[torch.Tensor] = []
    o_proj = hooked_llama.model.get_submodule("model.layers.1.self_attn.o_proj")
    handle = o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            hooked_llama.model(tokens)
    finally:
        handle.remove()
    counted = ~torch.isin(tokens, torch.tensor(get_special_token_ids(hooked_llama.tokenizer)))
    with torch.no_grad():
        acts = sae.encode(captured[0][counted].unflatten(-1, (4, 8)))  # SAELens flattens hook_z
    l0 = (acts != 0).sum(-1).double().mean().item()
    assert metrics["sparsity"]["l0"] == pytest.approx(l0, rel=1e-5)


def test_multi_layer_store_through_the_facade_equals_the_plain_model(hooked_llama) -> None:
    batches = TokenBatches(tokens_for(8), 4)
    via_facade = AttnActivationStore(
        hooked_llama, [0, 1], batches, train_batch_size_tokens=32, buffer_size_tokens=64
    )
    via_model = AttnActivationStore(
        hooked_llama.model, [0, 1], batches, train_batch_size_tokens=32, buffer_size_tokens=64
    )
    for _ in range(3):
        a, b = next(via_facade), next(via_model)
        for name in a:
            torch.testing.assert_close(a[name], b[name])
