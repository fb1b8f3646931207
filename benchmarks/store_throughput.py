"""Activation-store throughput per backend, against that backend's own plain forward pass.

Three backends over GPT-2-small-shaped models with random weights: TransformerLens's
``HookedTransformer``, nnsight over a Hugging Face ``GPT2LMHeadModel``, and TransformerLens 3's
``TransformerBridge`` over a copy of that model (the bridge re-wraps the modules it is given).
For each, tokens per second of flattened hook_z ``[tokens, n_heads * d_head]`` from:
  * its plain forward, stopped after the last layer needed, with the cheapest hooks it offers:
    HookedTransformer and bridge: a hook on each ``blocks.L.attn.hook_z`` (resolved once, added
    with ``HookPoint.add_hook``) and ``model(tokens, return_type=None, stop_at_layer=last + 1)``;
    Hugging Face: torch pre-hooks on ``c_proj``, the last one raising to stop the pass, and
    ``use_cache=False`` (no KV cache is built: the store's nnsight backend builds none either);
  * this package's store, ``sla.AttnActivationStore(...).activations(tokens)``, on that model;
for all 12 layers and for layer 5 alone; and the store's one pass for 12 layers against 12
single-layer passes.

Targets: store >= 0.95x its backend's plain forward (12 layers); one pass for 12 layers >= 6x
faster than 12 single-layer passes (each of which already stops early, so the ideal is
78 layer-passes / 12 = 6.5x).

Timing: each contender runs once to warm up, then ``--repeats`` rounds. In a round the backends
come in a rotated order and each backend's contenders run back to back (reversed every other
round), so a store and its plain forward see the same background load; ratios are medians of the
per-round ratios, tokens/s medians of the rounds. The load average is printed before and after:
on a shared machine other processes skew absolute figures, ratios much less. Each contender is
timed on two clocks: wall time (the targets' throughput) and this process's CPU time, which
other processes' load barely moves; with ``--threads 1`` it is the compute spent, with more
threads it also counts their spinning.

On TransformerLens 2 (no ``transformer_lens.model_bridge``) the bridge row is skipped, saying why.

Run:
    python benchmarks/store_throughput.py            # batch 8 x 128 tokens, 5 repeats
    python benchmarks/store_throughput.py --smoke    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import GPT2Config, GPT2LMHeadModel

import sae_lens_attn as sla

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--batch", type=int, help="rows per pass (default 8; 2 with --smoke)")
parser.add_argument("--ctx", type=int, help="tokens per row (default 128; 16 with --smoke)")
parser.add_argument("--repeats", type=int, help="timed rounds (default 5; 2 with --smoke)")
parser.add_argument(
    "--threads", type=int, help="torch threads (default: torch's choice; 1 with --smoke)"
)
parser.add_argument(
    "--smoke", action="store_true", help="tiny model and batch, for a quick check of the script"
)
args = parser.parse_args()
defaults = {"batch": (8, 2), "ctx": (128, 16), "repeats": (5, 2), "threads": (None, 1)}
for option, (full, smoke) in defaults.items():
    if getattr(args, option) is None:
        setattr(args, option, smoke if args.smoke else full)
if args.threads is not None:
    torch.set_num_threads(args.threads)

torch.manual_seed(0)
torch.set_grad_enabled(False)
shape = (
    {"n_layer": 12, "n_embd": 64, "n_head": 4, "vocab_size": 512}
    if args.smoke
    else {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
)
D_IN = shape["n_embd"]
SINGLE = 5  # the layer of the single-layer rows
BRIDGE_OWN_STOP = "plain, 12 layers, bridge's own stop"
all_layers = list(range(shape["n_layer"]))
hf_config = GPT2Config(
    n_positions=max(args.ctx, 128),
    n_layer=shape["n_layer"],
    n_embd=shape["n_embd"],
    n_head=shape["n_head"],
    vocab_size=shape["vocab_size"],
    bos_token_id=shape["vocab_size"] - 1,  # GPT-2's 50256 on the full-size vocabulary
    eos_token_id=shape["vocab_size"] - 1,
)
hf: Any = GPT2LMHeadModel(hf_config).eval()
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


def boot_bridge() -> tuple[Any, str]:
    """A ``TransformerBridge`` over a copy of ``hf`` (the bridge re-wraps the modules of the
    model it is given) and ``""``, or ``None`` and why not. ``boot_transformers`` re-loads the
    tokenizer from its ``name_or_path``, so a word-level tokenizer is written to disk and read
    back; with ``hf_model`` and a tokenizer given it needs nothing from the Hub."""
    if importlib.util.find_spec("transformer_lens.model_bridge") is None:
        return None, (
            f"TransformerLens {version('transformer-lens')} has no transformer_lens.model_bridge "
            "(TransformerBridge needs TransformerLens >= 3)"
        )
    from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
        TransformerBridge,  # TransformerLens >= 3 only: checked above
    )

    copy: Any = GPT2LMHeadModel(hf_config).eval()
    copy.load_state_dict(hf.state_dict())
    vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
        bos_token="w0",
        eos_token="w0",
        unk_token="w0",
        pad_token="w0",
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(
            "benchmark-gpt2",
            hf_model=copy,
            tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
            device="cpu",
        )
    return bridge, ""


bridge, bridge_skipped = boot_bridge()


class _Stop(Exception):
    pass


def plain_hf(layers: list[int]) -> Callable[[], None]:
    """z of ``layers`` from torch pre-hooks on ``c_proj``; stops inside the last layer needed."""
    last = max(layers)
    modules = [hf.transformer.h[layer].attn.c_proj for layer in layers]

    def run() -> dict[int, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}

        def grab(layer: int):
            def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                seen[layer] = inputs[0].reshape(-1, D_IN)  # (B*T, H*D)
                if layer == last:
                    raise _Stop

            return hook

        handles = [
            module.register_forward_pre_hook(grab(layer))
            for layer, module in zip(layers, modules, strict=True)
        ]
        try:
            hf(tokens, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return seen

    return lambda: _check(run(), layers)


def plain_hook_z(model: Any, layers: list[int], *, stop_after_block: bool) -> Callable[[], None]:
    """z of ``layers`` from hooks on ``blocks.L.attn.hook_z`` (HookedTransformer or bridge),
    with the model's own ``stop_at_layer``. The hook points are looked up once, here.

    ``stop_after_block`` also raises once block ``max(layers)`` has run: the bridge stops only
    at the start of block ``stop_at_layer``, so with the last layer needed being the model's
    last it runs ``ln_final`` and the unembedding too (the store's bridge backend stops there).
    HookedTransformer's ``stop_at_layer`` returns after the last block itself."""
    points = [model.hook_dict[f"blocks.{layer}.attn.hook_z"] for layer in layers]
    last_block = model.blocks[max(layers)] if stop_after_block else None

    def run() -> dict[int, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}

        def grab(layer: int):
            def hook(z: torch.Tensor, hook: Any) -> None:
                seen[layer] = z.reshape(-1, D_IN)  # (B, T, H, D) -> (B*T, H*D)

            return hook

        for layer, point in zip(layers, points, strict=True):
            point.add_hook(grab(layer))
        stop = None if last_block is None else last_block.register_forward_hook(_raise_stop)
        try:
            model(tokens, return_type=None, stop_at_layer=max(layers) + 1)
        except _Stop:
            pass
        finally:
            for point in points:
                point.remove_hooks()
            if stop is not None:
                stop.remove()
        return seen

    return lambda: _check(run(), layers)


def _raise_stop(*_: Any) -> None:
    raise _Stop


def _check(seen: dict[int, torch.Tensor], layers: list[int]) -> None:
    if sorted(seen) != sorted(layers) or seen[layers[0]].shape != (n_tokens, D_IN):
        raise RuntimeError(f"plain capture saw layers {sorted(seen)}, wanted {layers}")


def store_pass(model: Any, layers: list[int]) -> Callable[[], None]:
    store = sla.AttnActivationStore(model, layers, [tokens], convention="included")

    def run() -> None:
        store.activations(tokens)

    return run


def per_layer_passes(model: Any) -> Callable[[], None]:
    stores = [
        sla.AttnActivationStore(model, [layer], [tokens], convention="included")
        for layer in all_layers
    ]

    def run() -> None:
        for store in stores:
            store.activations(tokens)

    return run


def contenders(
    model: Any, plain: Callable[[list[int]], Callable[[], None]]
) -> dict[str, Callable[[], None]]:
    print(
        f"  {type(model).__name__}: the store runs on the {sla.backend_for(model).name!r} backend"
    )
    return {
        "plain, 12 layers": plain(all_layers),
        "store, 12 layers": store_pass(model, all_layers),
        f"plain, layer {SINGLE}": plain([SINGLE]),
        f"store, layer {SINGLE}": store_pass(model, [SINGLE]),
        "store, 12 single-layer passes": per_layer_passes(model),
    }


print("contenders:")
backends: dict[str, dict[str, Callable[[], None]]] = {
    "HookedTransformer": contenders(
        tl, lambda layers: plain_hook_z(tl, layers, stop_after_block=False)
    ),
}
if bridge is not None:
    backends["TransformerBridge"] = contenders(
        bridge, lambda layers: plain_hook_z(bridge, layers, stop_after_block=True)
    )
    # What the bridge's own stop_at_layer=12 costs: it runs ln_final and the unembedding.
    backends["TransformerBridge"][BRIDGE_OWN_STOP] = plain_hook_z(
        bridge, all_layers, stop_after_block=False
    )
backends["nnsight (HF GPT2LMHeadModel)"] = contenders(hf, plain_hf)

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "CPU": time.process_time}
load_before = os.getloadavg()
times: dict[str, dict[str, dict[str, list[float]]]] = {
    clock: {b: {c: [] for c in cs} for b, cs in backends.items()} for clock in CLOCKS
}
for fns in backends.values():  # warm-up
    for fn in fns.values():
        fn()
print("warm-up done", file=sys.stderr, flush=True)
names = list(backends)
for round_ in range(args.repeats):
    for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
        items = list(backends[name].items())
        for contender, fn in items if round_ % 2 == 0 else items[::-1]:
            starts = {clock: read() for clock, read in CLOCKS.items()}
            fn()
            for clock, read in CLOCKS.items():
                times[clock][name][contender].append(read() - starts[clock])
    print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
load_after = os.getloadavg()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def installed(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "absent"


def round_ratios(name: str, slow: str, fast: str, clock: str = "wall") -> list[float]:
    """time(slow) / time(fast) in each round: > 1 means ``fast`` is faster."""
    return [s / f for s, f in zip(times[clock][name][slow], times[clock][name][fast], strict=True)]


def per_round_ratio(name: str, slow: str, fast: str, clock: str = "wall") -> float:
    """Median over rounds of time(slow) / time(fast)."""
    return statistics.median(round_ratios(name, slow, fast, clock))


def tokens_per_s(name: str, contender: str) -> float:
    return n_tokens / statistics.median(times["wall"][name][contender])


print(
    f"\n{datetime.date.today()}; machine: {os.cpu_count()} CPUs ({cpu_model()}, "
    f"{platform.machine()}), {torch.get_num_threads()} torch threads"
)
print(
    "stack: "
    + ", ".join(
        f"{p} {installed(p)}"
        for p in ("torch", "transformer-lens", "transformers", "nnsight", "sae-lens")
    )
)
print(
    f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after: other "
    "processes may be running; figures are comparable within this run only"
)
print(
    f"model: GPT-2 shape {shape}, batch {args.batch} x {args.ctx} = {n_tokens} tokens, "
    f"median of {args.repeats} interleaved rounds\n"
)
print("tokens/s of flattened hook_z (median wall time; median CPU time):")
for name, contender_times in times["wall"].items():
    print(f"  {name}")
    for contender, seconds in contender_times.items():
        cpu = statistics.median(times["CPU"][name][contender])
        print(
            f"    {contender:<36} {tokens_per_s(name, contender):>10.0f} tokens/s"
            f"   ({statistics.median(seconds) * 1e3:.0f} ms; CPU {cpu * 1e3:.0f} ms)"
        )

RATIOS = {  # column: (slower, faster, target)
    "store / plain, 12 layers": ("plain, 12 layers", "store, 12 layers", 0.95),
    f"store / plain, layer {SINGLE}": (f"plain, layer {SINGLE}", f"store, layer {SINGLE}", None),
    "one pass vs 12 single-layer passes": (
        "store, 12 single-layer passes",
        "store, 12 layers",
        6.0,
    ),
}
print(
    "\n| backend | plain, 12 layers (tok/s) | store, 12 layers (tok/s) | "
    + " | ".join(
        f"{column}{'' if target is None else f' (≥ {target:g})'}, wall | CPU"
        for column, (_, _, target) in RATIOS.items()
    )
    + " |"
)
print("|---|---|---|" + "---|---|" * len(RATIOS))
for name in backends:
    cells = []
    for slow, fast, target in RATIOS.values():
        for clock in CLOCKS:
            ratio = per_round_ratio(name, slow, fast, clock)
            mark = "" if target is None else " ✓" if ratio >= target else " ✗"
            cells.append(f"{ratio:.2f}×{mark}")
    print(
        f"| {name} | {tokens_per_s(name, 'plain, 12 layers'):.0f} "
        f"| {tokens_per_s(name, 'store, 12 layers'):.0f} | " + " | ".join(cells) + " |"
    )
if bridge is None:
    print(f"| TransformerBridge | skipped: {bridge_skipped} |" + " |" * (1 + 2 * len(RATIOS)))
print("\nper-round store / plain, 12 layers (wall; CPU):")
for name in backends:
    for clock in CLOCKS:
        ratios = round_ratios(name, "plain, 12 layers", "store, 12 layers", clock)
        print(f"  {name:<30} {clock:<4} " + " ".join(f"{r:.2f}" for r in ratios))
if bridge is not None:
    own_stop = per_round_ratio("TransformerBridge", BRIDGE_OWN_STOP, "plain, 12 layers")
    print(
        f"TransformerBridge's own stop_at_layer=12 (runs ln_final and the unembedding too): "
        f"{tokens_per_s('TransformerBridge', BRIDGE_OWN_STOP):.0f} tokens/s, {own_stop:.2f}× "
        "the time of the plain forward stopped after block 11"
    )
print(f"nnsight's HF model runs {hf.config._attn_implementation!r} attention")
if args.smoke:
    print("smoke shapes: fixed per-pass overheads dominate; the targets apply at full size")
