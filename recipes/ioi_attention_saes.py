"""Kissane et al.'s IOI study with attention SAEs (arXiv 2406.17759): the per-template table of
layer-5 features zero-ablated at S2 with the error term kept (their Figure 16a), and the noising
of the attention output of layers 5 and 6 at S2 under three corruptions (their Figure 5).

What it does, top to bottom:
  * loads GPT-2 Small in TransformerLens and the layer's attention SAE of ``gpt2-small-attn-z``
    (Kissane et al.'s published SAEs; the package reads z in the convention each SAE was trained
    on, so the model needs no special processing);
  * writes ``--n-prompts`` IOI prompts with ``sla.analysis.ioi_prompts`` (Wang et al.'s templates,
    ABBA and BABA alternating, names that are one GPT-2 token); the metric is
    logit(IO) − logit(S) at the last token;
  * Figure 16a: ``sla.analysis.feature_ablation`` zero-ablates every feature active at S2, one at
    a time, at each prompt's own S2 only, with the SAE spliced and its error term kept (so the
    unedited run is the model's own), and zeroes the error term at S2 for the error row; per
    template (and over all prompts) the ``--top`` features of largest mean effect, and the
    error term's row, go to ``figure16a.csv`` and the console;
  * Figure 5: for each corruption (" and" → " alongside"; positions shifted by fillers; the
    first clause's names swapped, with fillers), ``sla.analysis.activation_patching`` noises the
    clean run: the attention output of each ``--patch-layers`` layer at S2 takes the corrupt
    run's at its own S2 (positions aligned through the prompts' ``word_idx``). Beside it, the
    clean and corrupt runs and a zero ablation of the layer's z at S2 only (Kissane et al.'s
    code zeroed every position, and its per-feature ablation read every prompt's S2 for each
    prompt: two bugs not copied here). Written to ``figure5.csv`` and the console.

For the same tables with box and bar plots, run the analyzers on the command line::

    sae-lens-attn analyze --model tl:gpt2-small --sae gpt2-small-attn-z:blocks.5 \\
        --text any_file.txt --analyzers feature_ablation,activation_patching \\
        --option patch_layers=[5,6] --out out/ioi-analyze

Data and hardware:
  * full run: GPT-2 Small and the layer-5 SAE from the Hugging Face Hub (network); no dataset.
    A GPU is advised: the ablation runs one forward pass of the prompts per feature active at S2
    (of the order of a thousand at layer 5 for 100 prompts); ``--method attribution`` estimates
    every feature from one backward pass instead. Not measured here (these machines reach no
    Hub), so the printed figures are yours to compare with the paper's.
  * ``--smoke``: the same code on a 4-layer GPT-2-shaped TransformerLens model built from a
    config (random weights), a byte-level BPE tokenizer trained on the spot on IOI-like
    sentences so that the names are one token, and attention SAEs trained for a few hundred
    steps on the prompts themselves; layer 1 stands in for layer 5 and layers 1 and 2 for 5 and
    6. No network; about 25 s wall on two CPU cores (measured: 9 s after the libraries are
    imported, half of it training the SAEs). Its figures are not meaningful.

Run:
    python recipes/ioi_attention_saes.py --smoke --out out/ioi-smoke
    python recipes/ioi_attention_saes.py --out out/ioi-gpt2-small
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

import sae_lens_attn as sla

CORRUPTIONS = ("and_to_alongside", "shift_positions", "flip_names")
"""Figure 5's corruptions, as ``IOIPrompts.corrupt`` names them."""
SMOKE_NAMES = ("Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James")
"""Names the smoke tokenizer learns as words."""

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument(
    "--smoke",
    action="store_true",
    help="tiny model and tokenizer built here, SAEs trained for seconds, no network",
)
parser.add_argument(
    "--out", type=Path, default=Path("out/ioi-gpt2-small"), help="output folder for the tables"
)
parser.add_argument(
    "--model", default="gpt2-small", help="TransformerLens model name (ignored with --smoke)"
)
parser.add_argument(
    "--release",
    default="gpt2-small-attn-z",
    help="SAE release with a hook_z SAE per layer (ignored with --smoke)",
)
parser.add_argument(
    "--layer", type=int, default=5, help="layer whose SAE features are ablated (--smoke: 1)"
)
parser.add_argument(
    "--patch-layers",
    type=int,
    nargs="+",
    default=[5, 6],
    help="layers whose attention output is noised at S2 (--smoke: 1 2)",
)
parser.add_argument("--n-prompts", type=int, default=100, help="IOI prompts (--smoke: 24)")
parser.add_argument(
    "--method",
    choices=["patch", "attribution"],
    default="patch",
    help="feature ablation by forward passes (exact) or one backward pass (estimate)",
)
parser.add_argument("--top", type=int, default=10, help="features per template in Figure 16a")
parser.add_argument(
    "--batch-size", type=int, default=256, help="rows per forward pass of the ablations"
)
parser.add_argument(
    "--device",
    default="cuda" if torch.cuda.is_available() else "cpu",
    help="device of the model and SAE (default: cuda if available; --smoke: cpu)",
)
parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
args = parser.parse_args()
if args.smoke:  # smoke-sized defaults; options given explicitly still win
    parser.set_defaults(layer=1, patch_layers=[1, 2], n_prompts=24, device="cpu", batch_size=64)
    args = parser.parse_args()
started = time.perf_counter()
args.out.mkdir(parents=True, exist_ok=True)

# --- model, tokenizer and the layer's SAE ------------------------------------------------------
if args.smoke:
    torch.set_num_threads(1)  # tiny matrices gain nothing from threads on a busy machine
    torch.manual_seed(args.seed)
    frames = (
        "Then, {a} and {b} went to the store. {b} gave a drink to {a}.",
        "When {a} alongside {b} got a ring at the garden, {b} decided to give it to {a}.",
        "It was a nice day. After the lunch, {a} and {b} were working while the weather was nice.",
    )
    lines = [
        frame.format(a=a, b=b)
        for a, b in itertools.permutations(SMOKE_NAMES, 2)
        for frame in frames
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer: Any = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=4,
            d_model=64,
            n_ctx=64,
            d_head=16,
            n_heads=4,
            d_mlp=256,
            d_vocab=len(tokenizer),
            act_fn="gelu_new",
            normalization_type="LN",
            original_architecture="GPT2LMHeadModel",
            seed=args.seed,
        )
    ).eval()
    # SAEs for the smoke: trained on the IOI prompts themselves, for a few hundred steps
    training_text = sla.analysis.ioi_prompts(tokenizer, n=400, names=SMOKE_NAMES, seed=1).texts
    batches = sla.TokenBatches.from_texts(tokenizer, training_text, context_size=32, batch_size=16)
    saved = sla.train_attn_saes(
        model,
        sorted({args.layer, *args.patch_layers}),
        batches,
        training_tokens=40_000,
        out_dir=args.out / "smoke_saes",
        d_sae=256,
        train_batch_size_tokens=256,
        buffer_size_tokens=4096,
        lr=3e-3,
        progress=False,
        overwrite=True,
    )
    sae = SAE.load_from_disk(saved[args.layer])
    names: Any = SMOKE_NAMES
else:
    model = HookedTransformer.from_pretrained(args.model, device=args.device).eval()
    tokenizer = model.tokenizer
    sae = SAE.from_pretrained(args.release, f"blocks.{args.layer}").to(args.device)
    names = None  # the default names that are one token of the model's tokenizer
print(f"{sla.AttnSite.from_sae(sae, model)} with {sae.cfg.d_sae} features")

# --- the prompts --------------------------------------------------------------------------------
prompts = sla.analysis.ioi_prompts(tokenizer, n=args.n_prompts, names=names, seed=args.seed)
s2 = prompts.word_idx["S2"]
metric = prompts.logit_diff()  # logit(IO) - logit(S) at the last token
templates = sorted(set(prompts.template))
groups = {t: torch.tensor([p == t for p in prompts.template]) for t in templates}
groups["all"] = torch.ones(len(prompts), dtype=torch.bool)
print(f"{len(prompts)} IOI prompts, e.g. {prompts.texts[0]!r}")

# --- Figure 16a: zero-ablate each feature at S2, the error term kept -------------------------------
ablation = sla.analysis.feature_ablation(
    model,
    sae,
    prompts.tokens,
    metric,
    s2,
    method=args.method,
    attention_mask=prompts.attention_mask,
    batch_size=args.batch_size,
)
rows_16a = []
for group, keep in groups.items():
    clean = float(ablation.clean[keep].mean())
    means = ablation.delta[:, keep].double().mean(1)
    for rank, row in enumerate(means.abs().argsort(descending=True)[: args.top].tolist(), 1):
        rows_16a.append(
            {
                "template": group,
                "rank": rank,
                "feature": int(ablation.features[row]),
                "mean_delta": float(means[row]),
                "percent_of_clean": 100 * float(means[row]) / clean,
                "clean": clean,
            }
        )
    error = float(ablation.error_delta[keep].mean())
    rows_16a.append(
        {
            "template": group,
            "rank": "",
            "feature": "error term",
            "mean_delta": error,
            "percent_of_clean": 100 * error / clean,
            "clean": clean,
        }
    )
print(
    f"\nFigure 16a: zero-ablating each of the {ablation.features.numel()} layer-{args.layer} "
    f"features active at S2 ({args.method}), error term kept; logit difference"
)
for group in groups:
    print(f"\n{group}: clean {next(r['clean'] for r in rows_16a if r['template'] == group):.3f}")
    print("| rank | feature | mean change | % of clean |\n|---|---|---|---|")
    for r in (r for r in rows_16a if r["template"] == group):
        print(
            f"| {r['rank']} | {r['feature']} | {r['mean_delta']:+.4f} | "
            f"{r['percent_of_clean']:+.1f}% |"
        )

# --- Figure 5: noising the attention output at S2 -----------------------------------------------
rows_5 = []
for kind in CORRUPTIONS:
    corrupt = prompts.corrupt(kind)
    on_corrupt = sla.analysis.logit_diff(corrupt.word_idx["end"], prompts.io_ids, prompts.s_ids)
    patched = sla.analysis.activation_patching(
        model,
        prompts.tokens,
        corrupt.tokens,
        (metric, on_corrupt),  # the clean answer, read at each run's own last token
        args.patch_layers,
        target="attn_out",
        positions=s2,
        source_positions=corrupt.word_idx["S2"],
        direction="noising",
        clean_attention_mask=prompts.attention_mask,
        corrupt_attention_mask=corrupt.attention_mask,
        batch_size=args.batch_size,
    )
    for index, layer in enumerate(args.patch_layers):

        def zero_at_s2(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[torch.arange(z.shape[0]), s2.to(z.device)] = 0  # at S2 only
            return z

        with torch.no_grad():
            logits = model.run_with_hooks(
                prompts.tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_at_s2)]
            )
        zeroed = metric(logits).cpu()
        for group, keep in groups.items():
            rows_5.append(
                {
                    "corruption": kind,
                    "layer": layer,
                    "template": group,
                    "clean": float(patched.clean[keep].mean()),
                    "corrupt": float(patched.corrupt[keep].mean()),
                    "patched": float(patched.patched[index, keep].mean()),
                    "zero_ablated": float(zeroed[keep].mean()),
                }
            )
print("\nFigure 5: noising the attention output at S2; logit difference over all prompts")
print(
    "| corruption | layer | clean | corrupt | patched | zero-ablated |\n|---|---|---|---|---|---|"
)
for r in (r for r in rows_5 if r["template"] == "all"):
    print(
        f"| {r['corruption']} | {r['layer']} | {r['clean']:.3f} | {r['corrupt']:.3f} | "
        f"{r['patched']:.3f} | {r['zero_ablated']:.3f} |"
    )

for name, table in (("figure16a.csv", rows_16a), ("figure5.csv", rows_5)):
    with (args.out / name).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
print(
    f"\nwrote figure16a.csv and figure5.csv to {args.out} in {time.perf_counter() - started:.0f} s"
)
