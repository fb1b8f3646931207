"""``analyze`` and ``dashboard`` against the floor of what they compute, on the embedded model.

What the two commands compute after loading (``sae_lens_attn.cli.analyze.write_analysis`` with
the default analyzers, head attribution and DFA; ``build_dashboard`` with ``--top 8`` and our own
pages), timed in one process on the same tokens, against the floor: one capture of the SAE's
layer with patterns and values, one encode of the SAE, and one DFA kernel call
(``attribution.attribute``) for the same 8 features at their peaks. Model and SAE loading,
imports and the first (warm-up) run are excluded; each contender then runs ``--repeats`` times in
an order rotated every round, and the ratios are medians of the per-round ratios (a shared
machine's load moves absolute figures, ratios much less).

Tokens: the embedded model's held-out corpus (standard-library files the model never trained
on, from this machine's Python), cut into 64 BOS-led contexts of 128 tokens, the defaults of
both commands.

Targets: analyze <= 1.3x the floor, dashboard <= 2x.

Run:
    python benchmarks/analysis_flow.py              # 64 x 128 tokens, 5 repeats
    python benchmarks/analysis_flow.py --smoke      # 8 x 64 tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn.analysis import Corpus, get
from sae_lens_attn.analysis.attribution import attribute
from sae_lens_attn.analysis.dfa_peaks import peak_positions
from sae_lens_attn.cli.analyze import write_analysis
from sae_lens_attn.default_model import RELEASE_NAME
from sae_lens_attn.default_model.corpus import read_texts, split_corpus
from sae_lens_attn.sae_adapter import encode_z, sae_convention
from sae_lens_attn.site import AttnSite
from sae_lens_attn.store import TokenBatches
from sae_lens_attn.viz.dashboard import build_dashboard

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--prompts", type=int, default=64)
parser.add_argument("--context", type=int, default=128)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--smoke", action="store_true", help="8 x 64 tokens, one repeat")
args = parser.parse_args()
if args.smoke:
    args.prompts, args.context, args.repeats = 8, 64, 1
torch.set_num_threads(args.threads)

model, tokenizer = sla.load_default_model()
sae = SAE.from_pretrained(RELEASE_NAME, "blocks.1.hook_z")
held_out = split_corpus(sysconfig.get_paths()["stdlib"]).held_out
text = "\n".join(read_texts(held_out[:40]))
tokens = TokenBatches.from_texts(tokenizer, [text], context_size=args.context, batch_size=1).tokens[
    : args.prompts
]
analyzers = [get("head_attribution"), get("dfa")]
options = {"top": 8, "bos_token_id": tokenizer.bos_token_id}
features = Corpus(model, tokens).top_features(sae, 8)  # the features both commands show
scratch = Path(tempfile.mkdtemp(prefix="analysis-flow-"))


@torch.no_grad()
def floor() -> None:
    site = AttnSite.from_sae(sae, model)
    convention = sae_convention(sae, "folded")
    backend = sla.backend_for(model)
    capture = backend.capture(tokens, [site], pattern=True, values=True, convention=convention)
    layer = capture[site.layer]
    assert layer.pattern is not None and layer.values is not None
    acts = encode_z(sae, layer.z)[..., features]  # one encode of the SAE
    real = torch.ones(tokens.shape, dtype=torch.bool)
    peaks = peak_positions(acts, real)
    attribute(
        layer.pattern, layer.values, layer.z_flat, sae, site, torch.tensor(features),
        peaks[:, None, :], acts=acts, real=real,
    )  # fmt: skip


def analyze() -> None:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    write_analysis(
        model, sae, tokens, analyzers, folder, tokenizer=tokenizer, options=options,
        progress=False,
    )  # fmt: skip


def dashboard() -> None:
    build_dashboard(
        model, sae, tokens, Path(tempfile.mkdtemp(dir=scratch)) / "board", top=8,
        tokenizer=tokenizer, engine="own", progress=False,
    )  # fmt: skip


contenders: dict[str, Callable[[], None]] = {
    "floor": floor,
    "analyze": analyze,
    "dashboard": dashboard,
}
for run in contenders.values():
    run()  # warm-up
times: dict[str, list[float]] = {name: [] for name in contenders}
names = list(contenders)
for round_ in range(args.repeats):
    for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
        start = time.perf_counter()
        contenders[name]()
        times[name].append(time.perf_counter() - start)

print(
    f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    f"{args.threads} thread(s); load average {os.getloadavg()[0]:.1f}"
)
print(f"tokens: {tuple(tokens.shape)}; features: {features}")
for name, values in times.items():
    print(f"{name:<10} median {statistics.median(values):.3f} s over {len(values)} runs")
for name, target in (("analyze", 1.3), ("dashboard", 2.0)):
    ratios = [t / f for t, f in zip(times[name], times["floor"], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio <= target else "misses"
    print(f"{name} / floor: {ratio:.2f}x ({verdict} the target <= {target}x)")
