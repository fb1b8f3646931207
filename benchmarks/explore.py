"""Latency of the prompt explorer's JSON API: a 64-token prompt, the embedded default model with
its two shipped SAEs (stdlib-2l-attn-z), through HTTP to uvicorn serving in this process.

Prints p50 and p95 of ``POST /api/run`` and ``POST /api/feature`` over repeated requests (one
kept-alive connection, after warm-up: the feature's logits and its layer's family labels are
computed once, on the first request, and reported apart), then where the time goes: the same
steps timed one by one (tokenizing, the model's forward pass with captures, SAE encoding, top-k
and the response model, JSON serialization, DFA) and what is left for HTTP and the framework.
On a machine shared with other jobs the steps' medians are noisy; their sum can exceed a route's
p50, and then "the rest" is negative.

Target: p50 < 0.5 s on 2 CPU cores.

Run:
    python benchmarks/explore.py                 # 50 requests per route
    python benchmarks/explore.py --repeats 10 --family-contexts 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from sae_lens import SAE

import sae_lens_attn as sla
from sae_lens_attn.cli.explore import held_out_contexts
from sae_lens_attn.explorer import ExplorerSession, create_app, serving
from sae_lens_attn.sae_adapter import encode_z, sae_convention
from sae_lens_attn.site import ValueBiasConvention

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--repeats", type=int, default=50, help="timed requests per route")
parser.add_argument("--tokens", type=int, default=64, help="prompt length, BOS included")
parser.add_argument("--family-contexts", type=int, default=32, help="label contexts (0: none)")
parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

torch.manual_seed(0)
model, tokenizer = sla.load_default_model()
saes = [SAE.from_pretrained("stdlib-2l-attn-z", f"blocks.{layer}") for layer in (0, 1)]
labels = held_out_contexts(tokenizer, args.family_contexts, 128) if args.family_contexts else None
session = ExplorerSession(model, saes, tokenizer=tokenizer, family_tokens=labels)


def prompt_of_length(n_tokens: int) -> str:
    """Held-out standard-library text that tokenizes to exactly ``n_tokens`` (BOS included)."""
    text = held_out_contexts(tokenizer, 1, 128)
    ids = text[0, 1:].tolist()
    for take in range(n_tokens - 1, len(ids)):
        prompt = str(tokenizer.decode(ids[:take]))
        if session.tokenize(prompt).shape[1] == n_tokens:
            return prompt
    raise SystemExit(f"no prefix of the held-out text tokenizes to {n_tokens} tokens")


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


prompt = prompt_of_length(args.tokens)
tokens = session.tokenize(prompt)
last = tokens.shape[1] - 1
run_body = {"prompt": prompt}
feature = session.run(prompt).layers["1"][last][0].feature
feature_body = {"prompt": prompt, "layer": 1, "feature": feature, "position": last}

print(
    f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
    f"torch {torch.__version__}"
)
print(
    f"prompt: {tokens.shape[1]} tokens; SAEs: layers {list(session.saes)} "
    f"(d_sae {[int(s.cfg.d_sae) for s in saes]}); label contexts: "
    f"{0 if labels is None else labels.shape[0]}"
)

backend = session.backend
convention: ValueBiasConvention = sae_convention(saes[0], backend.native_convention)
sites = [session.sites[layer] for layer in session.saes]
captures = backend.capture(tokens, sites, convention=convention)
run_answer = session.run(prompt)
start = time.perf_counter()
detail = session.feature(prompt, 1, feature, last)  # the first: logits, layer 1's families
cold_feature = time.perf_counter() - start
STEPS: dict[str, Callable[[], Any]] = {
    "tokenize": lambda: session.tokenize(prompt),
    "forward + captures (both layers)": lambda: backend.capture(
        tokens, sites, convention=convention
    ),
    "SAE encode (both SAEs)": lambda: [
        encode_z(session.saes[s.layer], captures[s.layer].z) for s in sites
    ],
    "run: session.run (the above, top-k, validation)": lambda: session.run(prompt),
    "run: JSON serialization (62 KB)": run_answer.model_dump_json,
    "DFA of one feature (its own forward)": lambda: sla.analysis.dfa(
        backend, saes[1], tokens, features=[feature]
    ),
    "feature logits (cached after the first)": lambda: sla.analysis.feature_logits(
        backend, saes[1], [feature], k=10
    ),
    "feature: session.feature (DFA, cached rest)": lambda: session.feature(
        prompt, 1, feature, last
    ),
    "feature: JSON serialization": detail.model_dump_json,
}
"""Each step the routes take, timed alone in the same rounds as the requests (so the machine's
load weighs on both alike)."""

with serving(create_app(session)) as url:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)

    def request(route: str, body: dict[str, Any]) -> tuple[float, int]:
        data = json.dumps(body)
        start = time.perf_counter()
        connection.request("POST", route, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise SystemExit(f"{route} answered {response.status}: {answer[:300]!r}")
        return elapsed, len(answer)

    for _ in range(5):
        request("/api/run", run_body)
        request("/api/feature", feature_body)
    http_times: dict[str, list[float]] = {"/api/run": [], "/api/feature": []}
    sizes: dict[str, int] = {}
    step_times: dict[str, list[float]] = {name: [] for name in STEPS}
    for _ in range(args.repeats):
        for route, body in (("/api/run", run_body), ("/api/feature", feature_body)):
            elapsed, sizes[route] = request(route, body)
            http_times[route].append(elapsed)
        for name, step in STEPS.items():
            start = time.perf_counter()
            step()
            step_times[name].append(time.perf_counter() - start)
    connection.close()

results = {}
for route, times in http_times.items():
    p50, p95 = percentiles(times)
    results[route] = p50
    print(f"{route:<13} p50 {1000 * p50:7.1f} ms   p95 {1000 * p95:7.1f} ms   "
          f"({args.repeats} requests, {sizes[route]} bytes)")  # fmt: skip
print(f"first feature of a layer (its logits, the layer's family labels): {cold_feature:.2f} s")
parts = {name: statistics.median(times) for name, times in step_times.items()}
print("\nwhere the time goes (median of each step alone, same rounds):")
for name, seconds in parts.items():
    print(f"  {name:<44} {1000 * seconds:7.2f} ms")
for route, whole in (("/api/run", "run"), ("/api/feature", "feature")):
    inside = sum(v for k, v in parts.items() if k.startswith(f"{whole}: "))
    print(f"  {route + ': HTTP, framework, lock (the rest)':<44} "
          f"{1000 * (results[route] - inside):7.2f} ms")  # fmt: skip
target = max(results.values()) < 0.5
print(f"\ntarget p50 < 0.5 s: {'met' if target else 'NOT met'}")
