"""Train the embedded default model and its attention SAEs on the Python standard library.

Data: the Python standard library's source (``sysconfig.get_paths()["stdlib"]``, on every machine)
or any folder of text files (``--corpus``, ``--suffix``). About 5% of the files, chosen by a hash of
their path (``sla.default_model.split_corpus``), are held out and only used for the metrics.

Steps, top to bottom:
  1. a byte-level BPE tokenizer (``tokenizers``, 512 tokens) trained on the training files;
  2. a seeded attention-only 2-layer TransformerLens ``HookedTransformer`` (d_model 128, 4 heads
     of 32, context 128, shortformer positions, 14M tokens, AdamW lr 2e-3, cosine decay), with a
     loss log (``train_log.csv``, with the best layer-1 induction score). Curriculum: the first 800
     steps see only rows ``[BOS, r, r, r, ...]``, ``r`` uniformly random tokens repeated with a
     random period (4 to 63, so that no fixed-offset positional head can do the copying); induction
     heads form there (layer-1 score 0.78 at step 700). Afterwards 30% of the rows are such rows, a
     quarter repeat a span of their own text later in the row, and the rest are plain code.
     Without the curriculum (repeated spans plus 5% or 15% random rows of fixed length) no
     induction head had formed after 15-17M tokens (score <= 0.03): the copying circuit sits on a
     long plateau, and rare BPE tokens stay under-trained on code alone;
  3. a TopK attention SAE (d_sae 512, k 16) for each layer, from one activation stream
     (``sla.train_attn_saes``, ``AttnActivationStore``, SAELens's trainer), 6M tokens, saved in
     SAELens's native format;
  4. the metrics on held-out files (``metrics.json``): model vs unigram cross-entropy, induction
     scores (on random tokens, and on repeated held-out code), and each SAE's L0, CE loss
     recovered (zero ablation), dead features and explained variance; and ``checksums.json``.

Hardware and time, measured on this machine (2 CPU cores shared with other jobs, no GPU):
  * ``--smoke``: tiny sizes on a few files, 10 to 30 seconds. Checks the pipeline; its files are
    not the shipped ones.
  * full run: 20.1 minutes in all: model training 12.3 min (14M tokens), SAE training 5.9 min
    (6M tokens, both layers), tokenization and metrics the rest. One torch thread (``--threads``):
    on shared cores two threads ran up to 20 times slower whenever another job took a core.

Run (the second line ships the result inside the package):
    python recipes/train_default_model.py --smoke --out out/default-model-smoke
    python recipes/train_default_model.py --out sae_lens_attn/default_model/files
"""

from __future__ import annotations

import argparse
import math
import shutil
import sysconfig
import time
from pathlib import Path

import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla
from sae_lens_attn.default_model import (
    MODEL_NAME,
    RELEASE_NAME,
    corpus,
    read_metrics,
    save_default_model,
    write_checksums,
    write_metrics,
)
from sae_lens_attn.pretrained import measure

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few files, seconds")
parser.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
parser.add_argument("--suffix", action="append", help="file suffixes to read (default: .py)")
parser.add_argument("--out", type=Path, default=Path("out/default-model"))
parser.add_argument("--vocab-size", type=int, default=512)
parser.add_argument("--d-model", type=int, default=128)
parser.add_argument("--n-heads", type=int, default=4)
parser.add_argument("--context-size", type=int, default=128)
parser.add_argument("--batch-size", type=int, default=32, help="rows per optimizer step")
parser.add_argument("--training-tokens", type=int, default=14_000_000)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--repeat-fraction", type=float, default=0.25, help="rows repeating a span")
parser.add_argument(
    "--random-repeat-fraction",
    type=float,
    default=0.3,
    help="rows [BOS, r, r, r, ...], r uniformly random tokens of random length",
)
parser.add_argument(
    "--induction-warmup-steps",
    type=int,
    default=800,
    help="first steps on random-repeat rows only: induction heads form there in ~500 steps",
)
parser.add_argument("--sae-expansion", type=int, default=4, help="d_sae = expansion * d_in")
parser.add_argument("--sae-k", type=int, default=16, help="active features per token (TopK)")
parser.add_argument("--sae-training-tokens", type=int, default=6_000_000)
parser.add_argument("--sae-lr", type=float, default=1e-3)
parser.add_argument("--eval-rows", type=int, default=512, help="held-out rows for the metrics")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument(
    "--threads",
    type=int,
    default=1,
    help="torch CPU threads; on shared cores one thread is steadier than two",
)
parser.add_argument(
    "--reuse-model", type=Path, help="a folder written by this recipe: train only the SAEs"
)
args = parser.parse_args()
if args.smoke:
    args.vocab_size, args.d_model, args.n_heads, args.context_size = 300, 32, 2, 32
    args.batch_size, args.training_tokens, args.sae_training_tokens = 8, 20_000, 16_384
    args.eval_rows = 16
    args.induction_warmup_steps = 10
induction_seq_len = min(40, (args.context_size - 1) // 2)  # [BOS, r, r] fits a context
started = time.perf_counter()
torch.manual_seed(args.seed)
torch.set_num_threads(args.threads)
args.out.mkdir(parents=True, exist_ok=True)

# 1. Corpus and tokenizer ----------------------------------------------------------------------
split = corpus.split_corpus(args.corpus, suffixes=tuple(args.suffix or [".py"]))
train_files, held_out_files = split.train, split.held_out
if args.smoke:
    train_files, held_out_files = train_files[:40], held_out_files[:8]
train_texts, held_out_texts = corpus.read_texts(train_files), corpus.read_texts(held_out_files)
print(f"corpus {split.root}: {len(train_texts)} training files, {len(held_out_texts)} held out")
reused = None if args.reuse_model is None else sla.load_default_model(args.reuse_model)
if reused is None:
    tokenizer = corpus.train_tokenizer(train_texts, args.vocab_size, max_bytes=12_000_000)
else:
    tokenizer = reused[1]
    args.vocab_size = reused[0].cfg.d_vocab
bos = tokenizer.convert_tokens_to_ids(corpus.BOS_TOKEN)
assert isinstance(bos, int)
train_rows = sla.TokenBatches.from_texts(
    tokenizer, train_texts, context_size=args.context_size, batch_size=args.batch_size
).tokens  # (rows, ctx), each starting with BOS
held_out_rows = sla.TokenBatches.from_texts(
    tokenizer, held_out_texts, context_size=args.context_size, batch_size=args.batch_size
).tokens
print(f"{train_rows.numel():,} training tokens, {held_out_rows.numel():,} held-out tokens")

# 2. The model -----------------------------------------------------------------------------------
if reused is None:
    cfg = HookedTransformerConfig(
        model_name=MODEL_NAME,
        n_layers=2,
        d_model=args.d_model,
        n_heads=args.n_heads,
        d_head=args.d_model // args.n_heads,
        n_ctx=args.context_size,
        d_vocab=args.vocab_size,
        act_fn="gelu",  # unused: attention only
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="shortformer",
        default_prepend_bos=True,
        seed=args.seed,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = torch.tensor([i for i in range(args.vocab_size) if i != bos])

    def augment(rows: torch.Tensor, random_repeat_fraction: float) -> torch.Tensor:
        """Copy a span of some rows later into the row; replace others by [BOS, r, r, ...]."""
        rows = rows.clone()
        n, ctx = rows.shape
        draw = torch.rand(n, generator=generator)
        for i in torch.nonzero(draw < args.repeat_fraction).flatten().tolist():
            length = int(torch.randint(4, ctx // 3, (1,), generator=generator))
            src = int(torch.randint(1, ctx - 2 * length, (1,), generator=generator))
            dst = int(torch.randint(src + length, ctx - length + 1, (1,), generator=generator))
            rows[i, dst : dst + length] = rows[i, src : src + length]
        for i in torch.nonzero(draw >= 1 - random_repeat_fraction).flatten().tolist():
            # a random period, so that no fixed-offset positional head can do the copying
            period = int(torch.randint(4, (ctx - 1) // 2 + 1, (1,), generator=generator))
            r = vocab[torch.randint(0, vocab.numel(), (period,), generator=generator)]
            rows[i, 1:] = r.repeat(ctx // period + 1)[: ctx - 1]
        return rows

    steps = max(1, args.training_tokens // (args.batch_size * args.context_size))
    warmup = min(200, steps // 10 + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        ),
    )
    log_path = args.out / "train_log.csv"
    log = log_path.open("w", encoding="utf-8")
    log.write("step,tokens,loss,induction_l1,elapsed_s\n")
    model_started = time.perf_counter()
    model.train()
    order = torch.randperm(train_rows.shape[0], generator=generator)
    progress = tqdm(range(steps), desc="model", unit="step")
    for step in progress:
        start = (step * args.batch_size) % max(1, train_rows.shape[0] - args.batch_size)
        if start < args.batch_size and step > 0:
            order = torch.randperm(train_rows.shape[0], generator=generator)  # a new epoch
        fraction = 1.0 if step < args.induction_warmup_steps else args.random_repeat_fraction
        batch = augment(train_rows[order[start : start + args.batch_size]], fraction)
        loss = model(batch, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % 100 == 0 or step == steps - 1:
            model.eval()
            scores = sla.analysis.induction_scores(
                model, seq_len=induction_seq_len, n_samples=16, seed=1
            )
            model.train()
            elapsed = time.perf_counter() - model_started
            tokens_seen = (step + 1) * batch.numel()
            log.write(
                f"{step},{tokens_seen},{loss.item():.4f},{scores[1].max():.3f},{elapsed:.0f}\n"
            )
            log.flush()
            progress.write(
                f"step {step}: loss {loss.item():.3f}, layer-1 induction {scores[1].max():.3f}"
            )
    log.close()
    model.eval()
    model_minutes = (time.perf_counter() - model_started) / 60
    model_tokens = steps * args.batch_size * args.context_size
    save_default_model(model, tokenizer, args.out)
    print(f"model trained in {model_minutes:.1f} min, saved to {args.out}")
else:
    assert args.reuse_model is not None
    model = reused[0]
    cfg = model.cfg
    trained = read_metrics(args.reuse_model)["training"]  # how the reused model was trained
    model_minutes, model_tokens = trained["model_minutes"], trained["model_tokens"]
    save_default_model(model, tokenizer, args.out)
    if args.reuse_model.resolve() != args.out.resolve():
        shutil.copy(args.reuse_model / "train_log.csv", args.out / "train_log.csv")

# 3. Attention SAEs for both layers, from one activation stream ---------------------------------
sae_started = time.perf_counter()
d_in = sla.AttnSite.from_model(model, 0).d_in
saved = sla.train_attn_saes(
    model,
    layers=range(cfg.n_layers),
    token_batches=sla.TokenBatches(train_rows, batch_size=64),
    training_tokens=args.sae_training_tokens,
    out_dir=args.out / "saes",
    architecture="topk",
    model_name=MODEL_NAME,
    train_batch_size_tokens=4096 if not args.smoke else 512,
    buffer_size_tokens=65536 if not args.smoke else 2048,
    lr=args.sae_lr,
    exclude_special_tokens=[bos],
    seed=args.seed,
    overwrite=True,
    d_sae=args.sae_expansion * d_in,
    k=args.sae_k,
)
sae_minutes = (time.perf_counter() - sae_started) / 60
print(f"SAEs trained in {sae_minutes:.1f} min: {[str(p) for p in saved.values()]}")

# 4. Metrics on held-out files ------------------------------------------------------------------
eval_rows = held_out_rows[: args.eval_rows]
counts = torch.bincount(train_rows[:, 1:].flatten(), minlength=args.vocab_size).double() + 1.0
unigram_log_probs = (counts / counts.sum()).log()
with torch.no_grad():
    model_ce = sum(
        model(eval_rows[i : i + 32], return_type="loss", loss_per_token=True).sum().item()
        for i in range(0, eval_rows.shape[0], 32)
    ) / (eval_rows.shape[0] * (eval_rows.shape[1] - 1))
unigram_ce = -unigram_log_probs[eval_rows[:, 1:]].mean().item()
induction = sla.analysis.induction_scores(model, seq_len=induction_seq_len, n_samples=128, seed=0)
# the same score on held-out code: [BOS, c, c] with c a segment of a held-out row
code_induction = sla.analysis.induction_scores(
    model, sequences=eval_rows[:128, 1 : 1 + induction_seq_len]
)
sae_metrics = {}
for layer, folder in saved.items():
    sae = SAE.load_from_disk(folder)
    sae_metrics[f"blocks.{layer}"] = measure(model, sae, eval_rows, exclude_tokens=[bos]).metrics
total_minutes = (time.perf_counter() - started) / 60
write_metrics(
    args.out / "metrics.json",
    {
        "model": MODEL_NAME,
        "release": RELEASE_NAME,
        "corpus": "smoke" if args.smoke else str(args.corpus),
        "held_out_files": len(held_out_texts),
        "eval_tokens": int(eval_rows.numel()),
        "model_ce": model_ce,
        "unigram_ce": unigram_ce,
        "unigram_counts": counts.long().tolist(),  # training-token counts + 1 (add-one)
        "induction_scores": induction.tolist(),
        "induction_seq_len": induction_seq_len,
        "induction_scores_held_out_code": code_induction.tolist(),
        "saes": {sae_id: m.as_dict() for sae_id, m in sae_metrics.items()},
        "training": {
            "model_tokens": model_tokens,
            "sae_tokens": args.sae_training_tokens,
            "model_minutes": round(model_minutes, 2),
            "sae_minutes": round(sae_minutes, 2),
            "total_minutes": round(total_minutes, 2),
            "args": {k: str(v) for k, v in vars(args).items()},
        },
    },
)
write_checksums(args.out)
print(f"held-out CE: model {model_ce:.3f}, unigram {unigram_ce:.3f} nats/token")
print(f"layer-1 induction scores: {[round(s, 3) for s in induction[1].tolist()]}")
print(f"on held-out code: {[round(s, 3) for s in code_induction[1].tolist()]}")
for sae_id, m in sae_metrics.items():
    print(f"{sae_id}: {m.as_dict()}")
print(f"done in {total_minutes:.1f} min")
