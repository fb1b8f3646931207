"""Publish attention SAEs as a release (Hugging Face repository + SAELens YAML entry), then load
them back by release name in a fresh process, exactly as a user would.

What it does, top to bottom:
  * takes SAE folders (``--sae-dir``, SAELens-native, e.g. written by
    ``recipes/reproduce_kissane_gpt2_small.py``) or trains one SAE per layer with
    ``sla.train_attn_saes``;
  * measures them on held-out text through the model and writes the release with ``sla.publish``:
    one SAELens-native folder per SAE, the model card ``README.md``, the release's entry for
    SAELens's ``pretrained_saes.yaml`` and its loader test under ``upstream/``; ``--push`` uploads
    it to ``--repo-id`` on the Hugging Face Hub (one commit; needs ``huggingface-cli login``);
  * loads every SAE back with ``SAE.from_pretrained(<release>, <sae id>)`` in a new Python process
    that knows the release only through ``SAE_LENS_ATTN_RELEASES=upstream/pretrained_saes.yaml``.
    After ``--push`` that process downloads from the Hub. Without a push (and with ``--smoke``)
    the Hub is stood in for by a private, temporary Hugging Face cache holding the published files
    where ``hf_hub_download`` would have put them, read with ``HF_HUB_OFFLINE=1``.

Data and hardware:
  * full run: the ``--model`` TransformerLens model (GPT-2 Small by default) from the Hub and a
    folder of text (default: the Python standard library's source) to measure on, and to train on
    when no ``--sae-dir`` is given. Measuring is minutes on a CPU; training is as in
    ``recipes/train_attn_saes_all_layers.py`` (a GPU for realistic token counts); the upload is
    the size of the SAEs (~150 MB per GPT-2 Small SAE of 24576 features).
  * ``--smoke``: a 2-layer byte-level model built from a config (random weights), a few thousand
    tokens of standard-library source, a temporary output folder unless ``--out`` is given, no
    push, no network; on 2 busy CPU cores about 25 s wall (measured; it starts a second Python
    process to load the release back). The SAEs are not meaningful.

Run:
    python recipes/publish_release.py --smoke
    python recipes/publish_release.py --sae-dir out/kissane-gpt2-small/blocks.5.attn.hook_z \\
        --release my-gpt2-attn-z --repo-id me/my-gpt2-attn-z --push
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_attn as sla

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument(
    "--smoke", action="store_true", help="tiny byte-level model, temp folder, no push (seconds)"
)
parser.add_argument(
    "--sae-dir",
    type=Path,
    action="append",
    default=[],
    help="a saved SAE folder to publish (repeatable); its folder name is its SAE id. "
    "Default: train one SAE per layer of --model",
)
parser.add_argument(
    "--model",
    default="gpt2-small",
    help="TransformerLens model the SAEs read, to measure on (ignored with --smoke)",
)
parser.add_argument(
    "--texts",
    type=Path,
    default=Path(sysconfig.get_paths()["stdlib"]),
    help="folder of text files (*.py) to measure on and train on",
)
parser.add_argument("--release", default=None, help="release name (default: <model>-attn-z-mine)")
parser.add_argument(
    "--repo-id", default=None, help="Hugging Face repository owner/name (default: me/<release>)"
)
parser.add_argument(
    "--out",
    type=Path,
    default=None,
    help="published folder (default: out/<release>; --smoke: temp)",
)
parser.add_argument(
    "--push", action="store_true", help="upload to --repo-id on the Hugging Face Hub"
)
parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
parser.add_argument(
    "--training-tokens",
    type=int,
    default=2_000_000,
    help="tokens per SAE when training (--smoke: 4096)",
)
parser.add_argument(
    "--measure-contexts",
    type=int,
    default=64,
    help="held-out contexts the metrics are measured on (--smoke: 8)",
)
parser.add_argument("--context-size", type=int, default=128, help="tokens per context")
args = parser.parse_args()
if args.smoke and args.push:
    parser.error("--smoke never pushes; drop --push")
if args.smoke:  # smoke-sized defaults; options given explicitly still win
    parser.set_defaults(measure_contexts=8, training_tokens=4096)
    args = parser.parse_args()
started = time.perf_counter()
if args.smoke:
    torch.set_num_threads(1)  # tiny matrices gain nothing from threads on a busy machine
scratch = Path(tempfile.mkdtemp(prefix="publish-release-"))

# --- the model and its text ----------------------------------------------------------------------
files = sorted(args.texts.rglob("*.py"))
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
            original_architecture="GPT2LMHeadModel",
            seed=0,
        )
    )
    model_name = "smoke-bytes-2l"
    data = torch.tensor(list("".join(p.read_text(errors="ignore") for p in files[:20]).encode()))
    rows = data[: 48 * args.context_size].reshape(-1, args.context_size)
else:
    model = HookedTransformer.from_pretrained(args.model, fold_value_biases=True)
    model_name = args.model
    texts = (p.read_text(errors="ignore") for p in files)
    rows = sla.TokenBatches.from_texts(
        model.tokenizer, texts, context_size=args.context_size, batch_size=32
    ).tokens
model.eval()
held_out, train_rows = rows[: args.measure_contexts], rows[args.measure_contexts :]
release_name = args.release or f"{model_name}-attn-z-mine"
repo_id = args.repo_id or f"me/{release_name}"
out = args.out or (scratch / release_name if args.smoke else Path("out") / release_name)

# --- the SAEs: given folders, or trained here -----------------------------------------------------
if args.sae_dir:
    sae_dirs = {folder.name: folder for folder in args.sae_dir}
else:
    trained = sla.train_attn_saes(
        model,
        layers=range(model.cfg.n_layers),
        token_batches=sla.TokenBatches(train_rows, batch_size=8 if args.smoke else 32),
        training_tokens=args.training_tokens,
        out_dir=scratch / "trained",
        architecture="topk",
        model_name=model_name,
        train_batch_size_tokens=256 if args.smoke else 4096,
        buffer_size_tokens=2048 if args.smoke else 65536,
        d_sae=8 * sla.AttnSite.from_model(model, 0).d_in,
        k=16,
    )
    sae_dirs = {f"blocks.{layer}": folder for layer, folder in trained.items()}

# --- publish ---------------------------------------------------------------------------------------
result = sla.publish(
    sae_dirs,
    out,
    release=release_name,
    repo_id=repo_id,
    model=model,
    tokens=held_out,
    overwrite=True,
    push=args.push,
    private=args.private,
)
for sae_id, metrics in result.metrics.items():
    print(f"{sae_id}: {metrics}")
print(f"published {release_name} -> {result.out_dir}")
print(f"  model card:      {result.model_card}")
print(f"  SAELens YAML:    {result.yaml_entry}")
print(f"  loader test:     {result.loader_test}")
if result.commit:
    print(f"  pushed commit {result.commit} to https://huggingface.co/{repo_id}")

# --- load back by name, in a fresh process ----------------------------------------------------------
env = dict(os.environ, **{sla.RELEASES_ENV_VAR: str(result.yaml_entry)})
if not args.push:
    # Stand-in for the Hub: the published files in a private Hugging Face cache, laid out as
    # hf_hub_download leaves a download (blobs/<sha256>, snapshots/<commit>/<path>, refs/main).
    cache = scratch / "hf-cache"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    uploaded = [
        p
        for p in sorted(result.out_dir.rglob("*"))
        if p.is_file() and p.relative_to(result.out_dir).parts[0] != "upstream"
    ]
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in uploaded)).hexdigest()
    for path in uploaded:
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo_dir / "snapshots" / commit / path.relative_to(result.out_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
loader = f"""
import sae_lens_attn
from sae_lens import SAE
for sae_id in {result.release.ids!r}:
    sae = SAE.from_pretrained({release_name!r}, sae_id)
    print(f"loaded {release_name}/{{sae_id}}: {{sae_lens_attn.AttnSite.from_sae(sae)}}, "
          f"reshape_activations={{sae.cfg.reshape_activations}}")
"""
subprocess.run([sys.executable, "-c", loader], env=env, check=True)
if args.smoke and args.out is None:
    shutil.rmtree(scratch)
else:
    shutil.rmtree(scratch / "hf-cache", ignore_errors=True)
    shutil.rmtree(scratch / "trained", ignore_errors=True)
    scratch.rmdir()
print(f"done in {time.perf_counter() - started:.1f} s")
