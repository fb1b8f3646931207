"""Train an attention SAE on a Hugging Face Llama-family or Gemma model through nnsight, with
SAELens's own ``LanguageModelSAETrainingRunner``.

TransformerLens is not involved: ``sla.hooked(AutoModelForCausalLM.from_pretrained(...), tokenizer)``
wraps the model with nnsight and exposes ``blocks.L.attn.hook_z`` (the input of ``o_proj``, one
``d_head`` block per query head; grouped-query attention is handled), so SAELens's runner, store
and evals train on it unchanged. ``sla.attn_sae_training_config`` fills the head structure, the
value-bias convention (Hugging Face z carries b_V when the model has one) and the module path, and
the saved SAE carries ``reshape_activations="hook_z"``.

Data and hardware:
  * full run (default ``HuggingFaceTB/SmolLM2-135M``, a Llama model with 9 query and 3 KV heads;
    any ``LlamaForCausalLM``/``GemmaForCausalLM``/... name works): the model from the Hugging
    Face Hub, text streamed from ``--dataset`` by SAELens. A GPU; for a 135M model and the default
    50M tokens, of the order of an hour on one GPU (not timed here); nnsight adds per-pass
    overhead compared with TransformerLens.
  * ``--smoke``: a 2-layer ``LlamaForCausalLM`` (4 query heads, 2 KV heads) built from a
    ``LlamaConfig`` with random weights, a byte-level BPE tokenizer trained on the spot with
    ``tokenizers``, and a pretokenized ``datasets.Dataset`` of Python standard-library source. No
    network; on 2 busy CPU cores about 13 s wall (measured; most of it is importing the
    libraries). The SAE it writes is not meaningful.

Run:
    python recipes/train_attn_saes_hf_nnsight.py --smoke --out out/nnsight-smoke
    python recipes/train_attn_saes_hf_nnsight.py --model HuggingFaceTB/SmolLM2-135M --layer 15
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import sae_lens_attn as sla

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument(
    "--smoke",
    action="store_true",
    help="tiny LlamaForCausalLM from a config, stdlib text, no network (seconds)",
)
parser.add_argument(
    "--model",
    default="HuggingFaceTB/SmolLM2-135M",
    help="Hugging Face causal LM (Llama family, Gemma, ...; ignored with --smoke)",
)
parser.add_argument(
    "--attn-implementation",
    default="sdpa",
    choices=["eager", "sdpa"],
    help="attention kernel of the Hugging Face model (z does not need eager; patterns do)",
)
parser.add_argument(
    "--dataset",
    default="HuggingFaceFW/fineweb-edu",
    help="text dataset SAELens streams (ignored with --smoke)",
)
parser.add_argument("--layer", type=int, default=None, help="layer to train on (default: middle)")
parser.add_argument(
    "--architecture",
    default="topk",
    choices=["standard", "topk", "jumprelu", "batchtopk"],
    help="SAE architecture",
)
parser.add_argument(
    "--expansion", type=int, default=16, help="d_sae = expansion × d_in (--smoke: 4)"
)
parser.add_argument(
    "--k", type=int, default=32, help="active features (topk, batchtopk; --smoke: 8)"
)
parser.add_argument(
    "--l1-coefficient", type=float, default=5.0, help="L1 coefficient (standard architecture)"
)
parser.add_argument(
    "--training-tokens", type=int, default=50_000_000, help="tokens to train on (--smoke: 4096)"
)
parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step (--smoke: 128)")
parser.add_argument(
    "--context-size", type=int, default=128, help="tokens per context (--smoke: 64)"
)
parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
parser.add_argument(
    "--out", type=Path, default=Path("out/hf-nnsight-attn-sae"), help="output folder"
)
parser.add_argument(
    "--device",
    default="cuda" if torch.cuda.is_available() else "cpu",
    help="device of the model and SAE (default: cuda if available; --smoke: cpu)",
)
parser.add_argument("--seed", type=int, default=42, help="seed of SAELens's runner")
args = parser.parse_args()
if args.smoke:  # smoke-sized defaults; options given explicitly still win
    parser.set_defaults(
        training_tokens=4096, batch_size=128, context_size=64, expansion=4, k=8, device="cpu"
    )
    args = parser.parse_args()
started = time.perf_counter()
if args.smoke:
    torch.set_num_threads(1)  # tiny matrices gain nothing from threads on a busy machine

# --- model and tokenizer ------------------------------------------------------------------------
if args.smoke:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    texts = [path.read_text(errors="ignore") for path in sources]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer: Any = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    hf_model: Any = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention: 2 query heads per KV head
            max_position_embeddings=args.context_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        attn_implementation=args.attn_implementation,
    )
    model_name = "smoke-llama-2l"
    rows = sla.TokenBatches.from_texts(
        tokenizer, texts, context_size=args.context_size, batch_size=1
    ).tokens  # [n_rows, ctx], each row starting with BOS
    dataset: Any = Dataset.from_dict({"tokens": rows[:128].tolist()})
else:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    hf_model = AutoModelForCausalLM.from_pretrained(
        args.model, attn_implementation=args.attn_implementation, torch_dtype=torch.float32
    )
    hf_model.to(args.device)
    model_name = args.model
    dataset = None  # SAELens streams args.dataset itself
hf_model.eval()
model = sla.hooked(hf_model, tokenizer)
layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
site = sla.AttnSite.from_model(model, layer)
print(f"{model_name}: {site}")

# --- SAELens's own runner, with an attention SAE config -----------------------------------------
arch_kwargs: dict[str, Any] = (
    {"k": args.k}
    if args.architecture in ("topk", "batchtopk")
    else {"l1_coefficient": args.l1_coefficient}
    if args.architecture == "standard"
    else {}
)
sae_cfg = sla.attn_sae_training_config(
    model,
    layer,
    args.architecture,
    d_sae=args.expansion * site.d_in,
    device=args.device,
    **arch_kwargs,
)
runner_cfg = LanguageModelSAERunnerConfig(
    sae=sae_cfg,
    model_name=model_name,
    hook_name=site.hook_name,
    dataset_path="" if args.smoke else args.dataset,
    streaming=not args.smoke,
    is_dataset_tokenized=args.smoke,
    context_size=args.context_size,
    prepend_bos=True,
    training_tokens=args.training_tokens,
    train_batch_size_tokens=args.batch_size,
    store_batch_size_prompts=8,
    n_batches_in_buffer=8,
    lr=args.lr,
    device=args.device,
    seed=args.seed,
    logger=LoggingConfig(log_to_wandb=False),
    n_checkpoints=0,
    output_path=str(args.out),
)
LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model).run()

# --- load back with plain SAELens ----------------------------------------------------------------
sae = SAE.load_from_disk(args.out)
meta = sae.cfg.metadata
print(
    f"saved {sla.AttnSite.from_sae(sae)} reshape_activations={sae.cfg.reshape_activations} "
    f"module={meta.hf_module_path} convention={meta.value_bias_convention} -> {args.out}"
)
print(f"done in {time.perf_counter() - started:.1f} s")
