"""The hook_z store: head-major flattening, one pass for many layers, shuffling, BOS and padding."""

from __future__ import annotations

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer

import sae_lens_attn as sla
from sae_lens_attn import AttnActivationStore, AttnSite, TokenBatches
from sae_lens_attn.config import sae_configs as sae_config


def make_store(model, tokens, layers, **kwargs) -> AttnActivationStore:
    options = {"train_batch_size_tokens": 32, "buffer_size_tokens": 128, "seed": 7, **kwargs}
    return AttnActivationStore(model, layers, TokenBatches(tokens, 4), **options)


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(rows[:, 0] * 1e4 + rows[:, 1])
    return rows[order]


def test_store_activations_equal_hook_z_flattened_head_major(any_model, tokens) -> None:
    store = make_store(any_model, tokens, [0, 1], convention="included")
    acts = store.activations(tokens)
    _, cache = any_model.run_with_cache(tokens)
    for layer in (0, 1):
        site = AttnSite.from_model(any_model, layer)
        z = cache[site.hook_name]  # [batch, pos, n_heads, d_head]
        expected = torch.cat([z[:, :, h] for h in range(site.n_heads)], dim=-1).reshape(
            -1, site.d_in
        )
        torch.testing.assert_close(acts[site.hook_name], expected)


def test_store_serves_folded_z_by_default(model, tokens) -> None:
    acts = make_store(model, tokens, [1]).activations(tokens)
    _, cache = model.run_with_cache(tokens)
    folded = (cache["blocks.1.attn.hook_z"] - model.blocks[1].attn.b_V).flatten(-2).reshape(-1, 32)
    torch.testing.assert_close(acts["blocks.1.attn.hook_z"], folded)


def test_shuffled_stream_is_a_permutation_of_the_activations(model, tokens) -> None:
    store = make_store(model, tokens, [0], cycle=False, mix_fraction=0.0)
    served = torch.cat([b["blocks.0.attn.hook_z"] for b in store])
    everything = torch.cat(
        [store.activations(t)["blocks.0.attn.hook_z"] for t in TokenBatches(tokens, 4)]
    )
    assert served.shape == everything.shape  # 24 rows * 16 tokens = 384 = 12 batches of 32
    assert not torch.equal(served, everything)
    torch.testing.assert_close(sorted_rows(served), sorted_rows(everything))


def test_multi_layer_store_equals_per_layer_stores(any_model, tokens) -> None:
    multi = make_store(any_model, tokens, [0, 1])
    singles = {layer: make_store(any_model, tokens, [layer]) for layer in (0, 1)}
    for _ in range(10):
        batch = next(multi)
        assert list(batch) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
        for layer, single in singles.items():
            name = f"blocks.{layer}.attn.hook_z"
            torch.testing.assert_close(batch[name], next(single)[name])


def test_all_layers_cost_one_model_pass_per_token_batch(model, tokens) -> None:
    calls: list[int] = []
    handle = model.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        store = make_store(model, tokens, [0, 1], cycle=False)
        n_batches = sum(1 for _ in store)
    finally:
        handle.remove()
    assert n_batches == 12
    assert len(calls) == store.model_passes == 6  # 24 rows / 4 per pass, both layers each time


def test_bos_and_padding_never_reach_the_store(model, tokens) -> None:
    store = make_store(model, tokens, [0], exclude_special_tokens=[0])
    assert store.activations(tokens)["blocks.0.attn.hook_z"].shape[0] == 24 * 15
    mask = torch.ones_like(tokens)
    mask[:, -5:] = 0  # right padding
    acts = store.activations((tokens, mask))["blocks.0.attn.hook_z"]
    assert acts.shape[0] == 24 * 10
    full = store.activations(tokens)["blocks.0.attn.hook_z"].reshape(24, 15, 32)
    torch.testing.assert_close(acts.reshape(24, 10, 32), full[:, :10])


def test_store_cycles_over_epochs_with_a_warning(model, tokens) -> None:
    store = make_store(model, tokens[:8], [0])
    with pytest.warns(UserWarning, match="token source exhausted after 1 epoch"):
        for _ in range(12):
            next(store)
    assert store.epochs >= 1


def test_one_shot_iterator_source_fails_clearly_on_second_epoch(model, tokens) -> None:
    store = AttnActivationStore(
        model, [0], iter([tokens[:4]]), train_batch_size_tokens=16, buffer_size_tokens=32
    )
    with (
        pytest.raises(ValueError, match="yielded no batches on a new epoch"),
        pytest.warns(UserWarning),
    ):
        for _ in range(10):
            next(store)


def test_data_provider_trains_an_sae_with_saelens_trainer(model, tokens) -> None:
    store = make_store(model, tokens, [1])
    cfg = sla.attn_sae_training_config(model, 1, "topk", d_sae=64, k=4)
    sae = sae_config.ATTN_TRAINING_CLASSES["attn_topk"][0](cfg)
    trainer = SAETrainer(cfg=_trainer_cfg(256), sae=sae, data_provider=store.data_provider())
    before = sae.W_dec.detach().clone()
    trainer.fit()
    assert trainer.n_training_samples == 256
    assert not torch.equal(before, sae.W_dec)


def test_multi_sae_trainer_trains_every_layer_from_one_stream(model, tokens) -> None:
    store = make_store(model, tokens, [0, 1])
    saes = {}
    for layer in (0, 1):
        cfg = sla.attn_sae_training_config(model, layer, "standard", d_sae=48)
        saes[f"L{layer}"] = sae_config.ATTN_TRAINING_CLASSES["attn_standard"][0](cfg)
    hook_names = {f"L{layer}": f"blocks.{layer}.attn.hook_z" for layer in (0, 1)}
    MultiSAETrainer(_trainer_cfg(256), saes, hook_names, store).fit()
    assert store.model_passes <= 8


def test_data_provider_refuses_a_multi_site_store(model, tokens) -> None:
    with pytest.raises(ValueError, match="serves one site.*MultiHookDataProvider"):
        make_store(model, tokens, [0, 1]).data_provider()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"train_batch_size_tokens": 256, "buffer_size_tokens": 128},
            "train_batch_size_tokens <= buffer_size_tokens",
        ),
        ({"mix_fraction": 1.0}, r"mix_fraction must be in \[0, 1\)"),
        ({"convention": "raw"}, "unknown value-bias convention"),
    ],
)
def test_bad_store_options_are_refused(model, tokens, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_store(model, tokens, [0], **kwargs)


def test_bad_sites_are_refused(model, tokens) -> None:
    with pytest.raises(ValueError, match="out of range"):
        make_store(model, tokens, [5])
    with pytest.raises(ValueError, match="repeat a layer"):
        make_store(model, tokens, [0, 0])
    with pytest.raises(ValueError, match="at least one site"):
        make_store(model, tokens, [])


def test_token_batches_from_texts_put_bos_first_as_saelens_does() -> None:
    class CharTokenizer:
        bos_token_id = 1

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) % 50 + 2 for c in text]}

    batches = TokenBatches.from_texts(
        CharTokenizer(), ["hello world"] * 10, context_size=8, batch_size=3
    )
    assert batches.tokens.shape[1] == 8
    assert (batches.tokens[:, 0] == 1).all()
    with pytest.raises(ValueError, match="fewer than context_size=64 tokens"):
        TokenBatches.from_texts(CharTokenizer(), ["hi"], context_size=64, batch_size=1)


def _trainer_cfg(total: int) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3
    )
