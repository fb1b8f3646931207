"""TransformerLens backend: captures equal TransformerLens's own cache; splices and hooks behave."""

from __future__ import annotations

import pytest
import torch

from sae_lens_attn import AttnSite, backend_for
from sae_lens_attn.backends import expand_kv_heads


def all_sites(model) -> list[AttnSite]:
    return [AttnSite.from_model(model, layer) for layer in range(model.cfg.n_layers)]


def test_capture_matches_cache_in_both_conventions(any_model, tokens) -> None:
    backend = backend_for(any_model)
    sites = all_sites(any_model)
    _, cache = any_model.run_with_cache(tokens)
    included = backend.capture(tokens, sites, pattern=True, values=True, convention="included")
    folded = backend.capture(tokens, sites, pattern=True, values=True, convention="folded")
    for site in sites:
        z = cache[site.hook_name]
        b_V = any_model.blocks[site.layer].attn.b_V
        assert b_V.abs().max() > 0
        torch.testing.assert_close(included[site.layer].z, z)
        torch.testing.assert_close(folded[site.layer].z, z - b_V)
        torch.testing.assert_close(included[site.layer].pattern, cache[site.pattern_hook_name])
        expected_v = cache[site.values_hook_name].repeat_interleave(site.group_size, dim=2)
        torch.testing.assert_close(included[site.layer].values, expected_v)
        torch.testing.assert_close(folded[site.layer].values, expected_v - b_V)
        assert included[site.layer].z_flat.shape == (*tokens.shape, site.d_in)


@pytest.mark.parametrize("convention", ["folded", "included"])
def test_z_is_pattern_times_values(any_model, tokens, convention) -> None:
    """z_h[q] = Σ_s A_h[q,s] v_h[s] holds in either convention, KV heads expanded."""
    caps = backend_for(any_model).capture(
        tokens, all_sites(any_model), pattern=True, values=True, convention=convention
    )
    for cap in caps.values():
        assert cap.pattern is not None and cap.values is not None
        recomputed = torch.einsum("bhqs,bshd->bqhd", cap.pattern, cap.values)
        torch.testing.assert_close(recomputed, cap.z, atol=1e-5, rtol=1e-4)


def test_z_flat_is_head_major(model, tokens) -> None:
    cap = backend_for(model).capture(tokens, [AttnSite.from_model(model, 0)])[0]
    for head in range(4):
        torch.testing.assert_close(cap.z_flat[..., head * 8 : (head + 1) * 8], cap.z[..., head, :])


def test_expand_kv_heads_gives_each_query_head_its_group() -> None:
    site = AttnSite(0, n_heads=6, n_kv_heads=2, d_head=1)
    v = torch.tensor([10.0, 20.0]).reshape(1, 1, 2, 1)
    assert expand_kv_heads(v, site).flatten().tolist() == [10, 10, 10, 20, 20, 20]


def test_capture_stops_after_last_layer_needed(model, tokens) -> None:
    ran: list[int] = []
    handle = model.blocks[1].register_forward_hook(lambda *_: ran.append(1))
    try:
        backend_for(model).capture(tokens, [AttnSite.from_model(model, 0)])
        assert ran == []
        backend_for(model).capture(tokens, [AttnSite.from_model(model, 1)])
        assert ran == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize("convention", ["folded", "included"])
def test_identity_splice_leaves_logits_unchanged(any_model, tokens, convention) -> None:
    backend = backend_for(any_model)
    clean = any_model(tokens)
    with backend.splicing(
        {site: (lambda z: z) for site in all_sites(any_model)}, convention=convention
    ):
        spliced = any_model(tokens)
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)


def test_splice_changes_the_forward_and_respects_convention(model, tokens) -> None:
    backend = backend_for(model)
    site = AttnSite.from_model(model, 1)
    seen: dict[str, torch.Tensor] = {}

    def record_and_zero(name: str):
        def fn(z: torch.Tensor) -> torch.Tensor:
            seen[name] = z.clone()
            return torch.zeros_like(z)

        return fn

    _, cache = model.run_with_cache(tokens)
    with backend.splicing({site: record_and_zero("folded")}, convention="folded"):
        folded_logits = model(tokens)
    with backend.splicing({site: record_and_zero("included")}, convention="included"):
        included_logits = model(tokens)
    b_V = model.blocks[1].attn.b_V
    torch.testing.assert_close(seen["included"], cache[site.hook_name])
    torch.testing.assert_close(seen["folded"], cache[site.hook_name] - b_V)
    # Zeroing folded z leaves b_V in place; zeroing included z removes it too.
    assert not torch.allclose(folded_logits, included_logits)
    assert not torch.allclose(folded_logits, model(tokens))


def test_hooks_are_removed_after_an_exception(model, tokens) -> None:
    backend = backend_for(model)
    site = AttnSite.from_model(model, 0)
    hook_point = model.hook_dict[site.hook_name]
    before = (
        len(hook_point._forward_hooks),
        len(model.hook_dict[site.pattern_hook_name]._forward_hooks),
    )
    with (
        pytest.raises(RuntimeError, match="boom"),
        backend.capturing([site], pattern=True, values=True),
    ):
        assert len(hook_point._forward_hooks) == before[0] + 1
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), backend.splicing({site: lambda z: z}):
        raise RuntimeError("boom")
    after = (
        len(hook_point._forward_hooks),
        len(model.hook_dict[site.pattern_hook_name]._forward_hooks),
    )
    assert after == before
    clean = model(tokens)
    torch.testing.assert_close(model(tokens), clean)


def test_site_of_another_model_is_refused(model, gqa_model, tokens) -> None:
    with pytest.raises(ValueError, match="does not belong to this model"):
        backend_for(model).capture(tokens, [AttnSite.from_model(gqa_model, 0)])


def test_unknown_convention_lists_valid_ones(model, tokens) -> None:
    with pytest.raises(
        ValueError, match=r"unknown value-bias convention 'raw'; valid: \['folded', 'included'\]"
    ):
        backend_for(model).capture(tokens, [AttnSite.from_model(model, 0)], convention="raw")  # type: ignore[arg-type]


def test_reading_captures_outside_a_run_is_an_error(model) -> None:
    site = AttnSite.from_model(model, 0)
    with backend_for(model).capturing([site]) as caps:
        pass
    with pytest.raises(RuntimeError, match="no z was captured at blocks.0.attn.hook_z"):
        caps[0]
