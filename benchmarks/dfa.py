"""DFA at each prompt's max-activating position, side by side: our kernel, one matmul, SAEDashboard.

Same inputs for all three: the hook_v / hook_pattern / hook_z activations of a GPT-2-small-shaped
layer (12 heads x 64, random weights), a standard SAE with d_sae 24576, 32 prompts x 128 tokens,
and the max-activating position of each of F = 2048 features in each prompt.

- ours: ``sae_lens_attn.analysis.attribution.attribute``, the one DFA kernel behind ``dfa`` and
  ``dfa_at_peaks``, given the captured tensors and the activations the peaks were picked from
  (as ``dfa_at_peaks`` calls it after the forward pass and the SAE's ``encode``);
- the floor: the single ``[tokens x d_in] @ [d_in x F]`` matmul;
- SAEDashboard 0.7.2's ``DFACalculator.calculate``, where it is installed (the oldest stack's
  ``saedashboard`` extra; on the newest stack it is left out and said so).

The script checks that ours and SAEDashboard agree and that ours sums to the pre-activation, then
measures time (median of interleaved repeats, wall clock, after a warm-up) and peak memory (each
contender once in a fresh subprocess on the same inputs: the growth of the process's
resident-memory high-water mark, VmHWM, reset through /proc/self/clear_refs once the inputs are
built and glibc has returned freed memory), and prints the ratios. Linux only.

Threads: ``--threads`` (default 1) for every contender. The default keeps the comparison about
the algorithms on a machine whose cores other jobs share: there, idle OpenMP threads of a
2-thread run spin against the other jobs and slow every small operation.

Targets: ours within 3x the floor; at least 10x faster than SAEDashboard and at most 1/10 of its
peak memory.

Run:
    python benchmarks/dfa.py                 # the shapes above, one thread
    python benchmarks/dfa.py --threads 2
    python benchmarks/dfa.py --smoke         # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn.analysis.attribution import DFAResult, attribute
from sae_lens_attn.sae_adapter import feature_acts

DFACalculator: Any
try:
    from sae_dashboard.dfa_calculator import (  # pyright: ignore[reportMissingImports]
        DFACalculator,  # the saedashboard extra: installed on the oldest stack only
    )
except ImportError:  # the newest stack: SAEDashboard caps transformers below what it needs
    DFACalculator = None

ALL_CONTENDERS = ("ours", "floor", "SAEDashboard")
CONTENDERS = ALL_CONTENDERS if DFACalculator is not None else ALL_CONTENDERS[:2]

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--features", type=int, default=2048, help="F, features at their peaks")
parser.add_argument("--repeats", type=int, default=5, help="timed runs of each contender")
parser.add_argument("--threads", type=int, default=1, help="torch threads for every contender")
parser.add_argument("--smoke", action="store_true", help="tiny shapes")
parser.add_argument("--memory-of", choices=ALL_CONTENDERS, help=argparse.SUPPRESS)  # subprocess
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.set_grad_enabled(False)


@dataclass(frozen=True)
class Inputs:
    """What every contender reads."""

    model: HookedTransformer
    sae: StandardSAE
    site: sla.AttnSite
    activations: dict[str, torch.Tensor]
    """hook_v, hook_pattern and hook_z of the layer, as a cache holds them."""
    features: torch.Tensor
    peaks: torch.Tensor
    """``[prompts, F]``: each feature's max-activating position in each prompt."""
    acts: torch.Tensor
    """``[prompts, pos, F]``: the SAE's activations the peaks were picked from."""
    weight: torch.Tensor
    """``W_enc[:, features]``, gathered beforehand for the floor."""


def build_inputs() -> Inputs:
    torch.manual_seed(0)
    n_heads, d_head, d_sae, n_prompts, ctx = (
        (4, 16, 512, 4, 32) if args.smoke else (12, 64, 24576, 32, 128)
    )
    n_features = 128 if args.smoke else min(args.features, d_sae)
    d_model = n_heads * d_head
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1,
            d_model=d_model,
            n_heads=n_heads,
            d_head=d_head,
            d_mlp=4 * d_model,
            d_vocab=1000,
            n_ctx=ctx,
            act_fn="gelu_new",
            normalization_type="LN",
        )
    ).eval()
    site = sla.AttnSite.from_model(model, 0)
    sae_cfg = StandardSAEConfig(d_in=site.d_in, d_sae=d_sae, reshape_activations="hook_z")
    sae_cfg.metadata.hook_name = site.hook_name
    sae = StandardSAE(sae_cfg)
    for param in sae.parameters():
        param.normal_(0, 0.05)
    tokens = torch.randint(0, 1000, (n_prompts, ctx))
    names = [site.hook_name, site.pattern_hook_name, site.values_hook_name]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    activations = {name: cache[name] for name in names}
    features = torch.randperm(d_sae)[:n_features].sort().values
    acts = feature_acts(sae, activations[site.hook_name], features)  # (prompts, pos, F)
    z = activations[site.hook_name].flatten(-2)
    peaks = (z @ sae.W_enc[:, features] + sae.b_enc[features]).argmax(1)  # (prompts, F)
    weight = sae.W_enc[:, features].contiguous()
    return Inputs(model, sae, site, activations, features, peaks, acts, weight)


def ours(inputs: Inputs) -> DFAResult:
    site = inputs.site
    return attribute(
        inputs.activations[site.pattern_hook_name],
        inputs.activations[site.values_hook_name],
        inputs.activations[site.hook_name].flatten(-2),
        inputs.sae,
        site,
        inputs.features,
        inputs.peaks[:, None, :],
        acts=inputs.acts,
    )


def floor(inputs: Inputs) -> torch.Tensor:
    return inputs.activations[inputs.site.hook_name].flatten(0, 1).flatten(-2) @ inputs.weight


def saedashboard(inputs: Inputs) -> Any:
    calculator = DFACalculator(inputs.model, inputs.sae)
    return calculator.calculate(inputs.activations, 0, inputs.features.tolist(), inputs.peaks)


RUN: dict[str, Callable[[Inputs], Any]] = {
    "ours": ours,
    "floor": floor,
    "SAEDashboard": saedashboard,
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(name: str) -> int:
    """Bytes by which ``name``'s one run raises this process's resident-memory high-water mark."""
    inputs = build_inputs()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: growth counts every new page
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    base = _status_kib("VmRSS")
    result = RUN[name](inputs)
    grown = _status_kib("VmHWM") - base
    del result
    return grown * 1024


def peak_in_subprocess(name: str) -> int:
    command = [sys.executable, __file__, "--memory-of", name, "--threads", str(args.threads)]
    command += ["--features", str(args.features)] + (["--smoke"] if args.smoke else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def check_agreement(inputs: Inputs) -> tuple[float, float] | None:
    """Max |ours − SAEDashboard| over every (prompt, source, feature), and the largest value
    (``None`` without SAEDashboard); ours always sums to the pre-activation."""
    mine = ours(inputs)
    torch.testing.assert_close(mine.by_src.sum(2) + mine.bias, mine.pre_act, atol=1e-3, rtol=1e-4)
    if DFACalculator is None:
        return None
    reference = saedashboard(inputs)
    theirs_by_src = torch.stack(
        [torch.from_numpy(reference[f]["dfa_values"]) for f in inputs.features.tolist()], dim=-1
    )  # (prompts, s, F): SAEDashboard's per-source contributions at the peak
    error = (mine.by_src[:, 0] - theirs_by_src).abs().max().item()
    scale = theirs_by_src.abs().max().item()
    assert error <= 1e-4 * max(scale, 1.0), f"results differ: max |ours - theirs| = {error}"
    return error, scale


def interleaved_medians(inputs: Inputs, repeats: int) -> dict[str, float]:
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for name in CONTENDERS:  # warm-up
        RUN[name](inputs)
    for repeat in range(repeats):
        for name in CONTENDERS:
            if name == "SAEDashboard" and repeat >= max(1, repeats // 2):
                continue  # the slowest: half as many runs
            start = time.perf_counter()
            RUN[name](inputs)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    if args.memory_of:
        print(peak_growth(args.memory_of))
        return
    inputs = build_inputs()
    agreement = check_agreement(inputs)
    times = interleaved_medians(inputs, args.repeats)
    (n_prompts, n_pos), n_features = inputs.acts.shape[:2], inputs.features.numel()
    shape = (
        f"{inputs.site.n_heads} heads x {inputs.site.d_head}, d_sae {inputs.sae.cfg.d_sae}, "
        f"{n_prompts} prompts x {n_pos} tokens, {n_features} features at their peaks"
    )
    del inputs
    gc.collect()
    peaks = {name: peak_in_subprocess(name) for name in CONTENDERS}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); inputs: {shape}")
    if agreement is None:
        print("SAEDashboard is not installed: compared with the floor only")
    else:
        error, scale = agreement
        print(f"results agree: max |ours - SAEDashboard| = {error:.2e} (largest {scale:.2e})")
    labels = {
        "ours": "sae_lens_attn DFA kernel",
        "floor": "floor: z @ W_enc[:, F]",
        "SAEDashboard": "SAEDashboard DFACalculator",
    }
    for name in CONTENDERS:
        print(
            f"  {labels[name]:<28}{times[name] * 1e3:9.1f} ms   peak +{peaks[name] / 2**20:8.1f} MiB"
        )
    print(f"against the floor: ours takes {times['ours'] / times['floor']:.2f}x (target <= 3)")
    if DFACalculator is None:
        return
    print(
        f"speed: ours {times['SAEDashboard'] / times['ours']:.1f}x faster than SAEDashboard "
        "(target >= 10)"
    )
    print(
        f"memory: ours {peaks['ours'] / max(peaks['SAEDashboard'], 1):.4f} of SAEDashboard's peak "
        "(target <= 0.1)"
    )


if __name__ == "__main__":
    main()
