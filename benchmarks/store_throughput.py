"""Activation-store throughput on a GPT-2-small-shaped model (random weights), side by side.

Measures tokens per second of flattened hook_z from:
  * a plain Hugging Face forward pass that captures z with torch pre-hooks and stops after the
    last layer needed (the practical limit),
  * this package's store on the nnsight backend (the same Hugging Face model),
  * this package's store on the TransformerLens backend (a HookedTransformer of the same shape),
and all 12 layers from one pass against 12 single-layer passes. Runs are interleaved, repeated,
and the median kept, so the printed ratios come from one run on one machine.

Targets: nnsight store >= 0.85x the plain forward; 12 layers in one pass >= 6x faster than 12
single-layer passes.

Run:
    python benchmarks/store_throughput.py            # batch 8 x 128 tokens, 5 repeats
    python benchmarks/store_throughput.py --smoke    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import GPT2Config, GPT2LMHeadModel

import sae_lens_attn as sla

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--ctx", type=int, default=128)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument(
    "--smoke", action="store_true", help="tiny model, for a quick check of the script"
)
args = parser.parse_args()

torch.manual_seed(0)
torch.set_grad_enabled(False)
shape = (
    {"n_layer": 12, "n_embd": 64, "n_head": 4, "vocab_size": 512}
    if args.smoke
    else {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
)
hf: Any = GPT2LMHeadModel(
    GPT2Config(
        n_positions=max(args.ctx, 128),
        n_layer=shape["n_layer"],
        n_embd=shape["n_embd"],
        n_head=shape["n_head"],
        vocab_size=shape["vocab_size"],
    )
).eval()
tl = HookedTransformer(
    HookedTransformerConfig(
        n_layers=shape["n_layer"],
        d_model=shape["n_embd"],
        n_heads=shape["n_head"],
        d_head=shape["n_embd"] // shape["n_head"],
        d_mlp=4 * shape["n_embd"],
        d_vocab=shape["vocab_size"],
        n_ctx=max(args.ctx, 128),
        act_fn="gelu_new",
        normalization_type="LN",
    )
).eval()
tokens = torch.randint(0, shape["vocab_size"], (args.batch, args.ctx))
n_tokens = tokens.numel()
all_layers = list(range(shape["n_layer"]))


class _Stop(Exception):
    pass


def plain_forward(layers: list[int]) -> None:
    """z of ``layers`` from torch pre-hooks on c_proj; stops inside the last layer needed."""
    seen: dict[int, torch.Tensor] = {}
    last = max(layers)

    def grab(layer: int):
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen[layer] = inputs[0].reshape(-1, inputs[0].shape[-1]).clone()
            if layer == last:
                raise _Stop

        return hook

    handles = [
        hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(grab(layer))
        for layer in layers
    ]
    try:
        hf(tokens)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def store_pass(model: object, layers: list[int]) -> Callable[[], None]:
    store = sla.AttnActivationStore(model, layers, [tokens], convention="included")

    def run() -> None:
        store.activations(tokens)

    return run


def per_layer_passes(model: object) -> Callable[[], None]:
    stores = [
        sla.AttnActivationStore(model, [layer], [tokens], convention="included")
        for layer in all_layers
    ]

    def run() -> None:
        for store in stores:
            store.activations(tokens)

    return run


contenders: dict[str, Callable[[], None]] = {
    "plain HF forward, 12 layers": lambda: plain_forward(all_layers),
    "nnsight store, 12 layers": store_pass(hf, all_layers),
    "TransformerLens store, 12 layers": store_pass(tl, all_layers),
    "plain HF forward, layer 5": lambda: plain_forward([5]),
    "nnsight store, layer 5": store_pass(hf, [5]),
    "nnsight store, 12 single-layer passes": per_layer_passes(hf),
    "TransformerLens store, 12 single-layer passes": per_layer_passes(tl),
}
times: dict[str, list[float]] = {name: [] for name in contenders}
for fn in contenders.values():  # warm-up
    fn()
for _ in range(args.repeats):
    for name, fn in contenders.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
median = {name: statistics.median(ts) for name, ts in times.items()}

print(
    f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
)
print(
    f"model: GPT-2 shape {shape}, batch {args.batch} x {args.ctx} tokens, median of {args.repeats}"
)
for name, seconds in median.items():
    print(f"  {name:<48} {n_tokens / seconds:>10.0f} tokens/s   ({seconds * 1e3:.0f} ms)")


def ratio(slow: str, fast: str) -> float:
    return median[slow] / median[fast]


print("ratios (>1 means the second is faster):")
print(
    f"  nnsight store / plain forward, 12 layers:        {ratio('plain HF forward, 12 layers', 'nnsight store, 12 layers'):.2f}x  (target >= 0.85)"
)
print(
    f"  nnsight store / plain forward, layer 5:          {ratio('plain HF forward, layer 5', 'nnsight store, layer 5'):.2f}x"
)
print(
    f"  TransformerLens store / plain forward, 12 layers: {ratio('plain HF forward, 12 layers', 'TransformerLens store, 12 layers'):.2f}x"
)
print(
    f"  nnsight: one pass vs 12 single-layer passes:      {ratio('nnsight store, 12 single-layer passes', 'nnsight store, 12 layers'):.2f}x  (target >= 6)"
)
print(
    f"  TransformerLens: one pass vs 12 single-layer:     {ratio('TransformerLens store, 12 single-layer passes', 'TransformerLens store, 12 layers'):.2f}x  (target >= 6)"
)
