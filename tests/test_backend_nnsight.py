"""nnsight backend on tiny Hugging Face models of every architecture in the table."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from nnsight.modeling.transformers import TransformersModel

from sae_lens_attn import AttnActivationStore, AttnSite, NNsightBackend, backend_for
from sae_lens_attn.backends import architectures as arch_table

from .factories import batch, out_proj, out_proj_inputs
from .hf_twins import ALL_ARCHITECTURES, PAD_ID, VOCAB_SIZE, build_hf, make_tokenizer


@pytest.fixture(scope="module", params=ALL_ARCHITECTURES)
def hf(request) -> tuple[str, Any]:
    return request.param, build_hf(request.param)


def backend(model: Any) -> NNsightBackend:
    b = backend_for(model)
    assert isinstance(b, NNsightBackend)
    return b


def test_site_takes_d_in_from_the_output_projection(hf) -> None:
    arch, model = hf
    site = AttnSite.from_model(model, 1)
    proj = out_proj(model, 1)
    in_features = getattr(proj, "in_features", None) or proj.weight.shape[0]
    assert site.d_in == in_features
    assert site.n_kv_heads == getattr(model.config, "num_key_value_heads", None) or site.n_heads
    if arch == "gemma":
        assert site.d_in != model.config.hidden_size  # head_dim * n_heads differs from d_model here


def test_capture_matches_output_projection_input(hf) -> None:
    arch, model = hf
    b = backend(model)
    tokens = batch(pos=10)
    sites = [b.site(0), b.site(1)]
    reference = out_proj_inputs(model, tokens)
    included = b.capture(tokens, sites, convention="included")
    folded = b.capture(tokens, sites, convention="folded")
    for site in sites:
        z = reference[site.layer].unflatten(-1, (site.n_heads, site.d_head))
        torch.testing.assert_close(included[site.layer].z, z)
        torch.testing.assert_close(folded[site.layer].z, z - b.value_bias(site))
    if arch in ("gpt2", "neox", "qwen2"):
        assert b.value_bias(sites[0]).abs().max() > 0
    else:
        assert b.value_bias(sites[0]).abs().max() == 0


@pytest.mark.parametrize("convention", ["folded", "included"])
def test_z_is_pattern_times_expanded_values(hf, convention) -> None:
    _, model = hf
    b = backend(model)
    caps = b.capture(
        batch(pos=10), [b.site(0), b.site(1)], pattern=True, values=True, convention=convention
    )
    for cap in caps.values():
        assert cap.pattern is not None and cap.values is not None
        assert cap.values.shape == cap.z.shape
        torch.testing.assert_close(
            torch.einsum("bhqs,bshd->bqhd", cap.pattern, cap.values), cap.z, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(cap.pattern.sum(-1), torch.ones_like(cap.pattern.sum(-1)))


def test_identity_splice_keeps_logits_and_zero_splice_changes_them(hf) -> None:
    _, model = hf
    b = backend(model)
    tokens = batch(pos=10)
    with torch.no_grad():
        clean = model(tokens).logits
    for convention in ("folded", "included"):
        with (
            torch.no_grad(),
            b.splicing({b.site(0): lambda z: z, b.site(1): lambda z: z}, convention=convention),
        ):
            torch.testing.assert_close(b.forward(tokens), clean, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), b.splicing({b.site(1): torch.zeros_like}):
        zeroed = b.forward(tokens)
    assert zeroed is not None and not torch.allclose(zeroed, clean, atol=1e-4)


def test_patterns_are_recomputed_on_sdpa_models() -> None:
    eager, sdpa = (
        build_hf("llama", attn_implementation="eager"),
        build_hf("llama", attn_implementation="sdpa"),
    )
    tokens = batch(pos=10)
    want = backend(eager).capture(tokens, [backend(eager).site(1)], pattern=True)[1]
    got = backend(sdpa).capture(tokens, [backend(sdpa).site(1)], pattern=True)[1]
    assert got.pattern is not None
    torch.testing.assert_close(got.pattern, want.pattern)
    assert sdpa.config._attn_implementation == "sdpa"  # restored after the run


def test_patterns_without_recomputation_are_a_clear_error(monkeypatch) -> None:
    row = arch_table.HF_ARCHITECTURES["LlamaForCausalLM"]
    monkeypatch.setitem(
        arch_table.HF_ARCHITECTURES,
        "LlamaForCausalLM",
        arch_table.HFArchitecture(**{**row.__dict__, "eager_patterns": False}),
    )
    model = build_hf("llama", attn_implementation="sdpa")
    b = NNsightBackend(model, make_tokenizer(VOCAB_SIZE))
    with pytest.raises(
        ValueError, match="patterns were requested .* running 'sdpa' attention.*not supported"
    ):
        b.capture(batch(pos=10), [b.site(0)], pattern=True)
    b.capture(batch(pos=10), [b.site(0)])  # z alone needs no patterns


def test_architecture_missing_from_the_table_is_refused() -> None:
    config = transformers.XGLMConfig(
        vocab_size=VOCAB_SIZE,
        d_model=16,
        num_layers=1,
        ffn_dim=32,
        attention_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.XGLMForCausalLM(config)
    with pytest.raises(
        ValueError,
        match=r"unsupported Hugging Face architecture 'XGLMForCausalLM'; supported: .*GPT2LMHeadModel.*add a row",
    ):
        AttnSite.from_model(model, 0)


def test_grouped_query_model_needs_whole_groups() -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=24,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=6,
        num_key_value_heads=4,
        head_dim=4,
        max_position_embeddings=32,
    )
    with pytest.raises(ValueError, match="n_heads=6, not a multiple of n_kv_heads=4"):
        backend_for(transformers.LlamaForCausalLM(config))


def test_sites_of_another_model_are_refused() -> None:
    gpt2, llama = build_hf("gpt2"), build_hf("llama")
    with pytest.raises(ValueError, match="does not belong to this model"):
        backend(gpt2).capture(batch(pos=10), [backend(llama).site(0)])


def test_hooks_are_gone_after_an_exception(hf) -> None:
    _, model = hf
    b = backend(model)
    tokens = batch(pos=10)

    def boom(z: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), b.splicing({b.site(0): boom}):
        b.forward(tokens)
    assert b._active == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(b.forward(tokens), model(tokens).logits)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batches_give_the_same_z_at_real_tokens(padding_side) -> None:
    model = build_hf("llama")
    b = backend(model)
    lengths = [7, 4, 10]
    rows = [batch(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    tokens = torch.full((3, width), PAD_ID)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, span], mask[i, span] = row, 1
    site = b.site(1)
    batched = b.capture(tokens, [site], attention_mask=mask)[1].z
    for i, row in enumerate(rows):
        alone = b.capture(row[None], [site])[1].z[0]
        torch.testing.assert_close(batched[i][mask[i].bool()], alone, atol=1e-5, rtol=1e-5)
    store = AttnActivationStore(
        model, [1], [(tokens, mask)], train_batch_size_tokens=7, buffer_size_tokens=21
    )
    acts = store.activations((tokens, mask))[site.hook_name]
    assert acts.shape[0] == sum(lengths)
    torch.testing.assert_close(acts, batched.flatten(-2)[mask.bool()].reshape(-1, site.d_in))


def test_model_wrapped_by_nnsight_works_like_the_plain_model() -> None:
    model = build_hf("gpt2")
    wrapped = TransformersModel(model, tokenizer=make_tokenizer(VOCAB_SIZE))
    tokens = batch(pos=10)
    site = AttnSite.from_model(wrapped, 1)
    torch.testing.assert_close(
        backend_for(wrapped).capture(tokens, [site])[1].z,
        backend(model).capture(tokens, [site])[1].z,
    )


class RecordingModel(TransformersModel):
    """An nnsight model that records the trace options and runs locally: the network stays off."""

    remote_flags: list[bool]

    def trace(self, *inputs: Any, remote: bool = False, **kwargs: Any):  # type: ignore[override]
        self.remote_flags.append(remote)
        return super().trace(*inputs, **kwargs)


def test_remote_flag_reaches_every_nnsight_trace() -> None:
    model = build_hf("gpt2")
    wrapped = RecordingModel(model, tokenizer=make_tokenizer(VOCAB_SIZE))
    wrapped.remote_flags = []
    b = NNsightBackend(wrapped, remote=True)
    tokens = batch(pos=10)
    caps = b.capture(tokens, [b.site(0)])
    with b.splicing({b.site(1): lambda z: z}):
        b.forward(tokens)
    assert wrapped.remote_flags == [True, True]
    torch.testing.assert_close(
        caps[0].z, backend(build_hf("gpt2")).capture(tokens, [b.site(0)])[0].z
    )
