"""Train an attention SAE on every layer of a TransformerLens model, all from one activation stream.

Data: a directory of text files (default: the Python standard library's source, on every machine).
Hardware and time:
  * ``--smoke``: a 2-layer byte-level model built from a config, random weights; 2 CPU cores,
    under a minute. Checks the pipeline end to end; the SAEs it writes are not meaningful.
  * ``--model gpt2-small``: needs the model in the Hugging Face cache (or network) and a GPU for
    realistic token counts; the 12 layers cost one model pass per batch, not twelve.

Run:
    python recipes/train_attn_saes_all_layers.py --smoke --out out/recipe-smoke
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument(
    "--smoke", action="store_true", help="tiny byte-level model, a few thousand tokens"
)
parser.add_argument(
    "--model", default="gpt2-small", help="TransformerLens model name (ignored with --smoke)"
)
parser.add_argument("--texts", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
parser.add_argument("--out", type=Path, default=Path("out/attn-saes"))
parser.add_argument(
    "--architecture", default="topk", choices=["standard", "topk", "jumprelu", "batchtopk"]
)
parser.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_in")
parser.add_argument("--k", type=int, default=32, help="active features (topk / batchtopk)")
parser.add_argument("--training-tokens", type=int, default=2_000_000)
parser.add_argument("--context-size", type=int, default=128)
args = parser.parse_args()

texts = [p.read_text(errors="ignore") for p in sorted(args.texts.rglob("*.py"))]
if args.smoke:
    # Byte-level tokens: token id = byte value, so no tokenizer is needed.
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2,
            d_model=64,
            n_ctx=args.context_size,
            d_head=16,
            n_heads=4,
            d_vocab=256,
            act_fn="gelu",
            attn_only=True,
            seed=0,
        )
    )
    data = torch.tensor(list("".join(texts[:20]).encode()[: 64 * args.context_size]))
    batches = sla.TokenBatches(data.reshape(-1, args.context_size), batch_size=8)
    training_tokens, batch_tokens = 4096, 256
else:
    model = HookedTransformer.from_pretrained(args.model, fold_value_biases=True)
    batches = sla.TokenBatches.from_texts(
        model.tokenizer, texts, context_size=args.context_size, batch_size=32
    )
    training_tokens, batch_tokens = args.training_tokens, 4096
model.eval()

arch_kwargs = {"k": args.k} if args.architecture in ("topk", "batchtopk") else {}
d_in = sla.AttnSite.from_model(model, 0).d_in
saved = sla.train_attn_saes(
    model,
    layers=range(model.cfg.n_layers),
    token_batches=batches,
    training_tokens=training_tokens,
    out_dir=args.out,
    architecture=args.architecture,
    model_name="smoke-bytes-2l" if args.smoke else args.model,
    train_batch_size_tokens=batch_tokens,
    buffer_size_tokens=8 * batch_tokens,
    d_sae=args.expansion * d_in,
    overwrite=True,
    **arch_kwargs,
)

for layer, folder in saved.items():
    sae = SAE.load_from_disk(folder)
    print(f"layer {layer}: {sla.AttnSite.from_sae(sae, model)} -> {folder}")
