"""The builders the tests share: tiny and planted models, random SAEs, token batches, z taken
without this package, SAELens's runner offline and the embedded default's explorer session.

Tests import these from here (or use the fixtures in ``conftest.py``), never from another test
module. The Hugging Face models and their TransformerLens twins live in ``hf_twins``, Hub cache
layouts in ``hub_cache`` and the browser driver in ``browser``.

The independent references (``independent_z``, ``out_proj_inputs``, ``value_bias_from_weights``)
go through no part of ``sae_lens_attn``: module paths, value layouts and norms are stated here per
model class, TransformerLens z comes from its own ``hook_z``, and the value bias of the folded
convention is computed from the weights as ``DESIGN.md`` defines it, ``b_V + β·W_V`` per head.

Importing this module does not import ``sae_lens_attn`` (the builders that need it import it when
called): the vanilla-SAELens check builds its model with ``build_model`` in a process that must
never load the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .hf_twins import VOCAB_SIZE, build_hf

if TYPE_CHECKING:
    from datasets import Dataset

    from sae_lens_attn import AttnSite
    from sae_lens_attn.explorer import ExplorerSession

# --- tiny TransformerLens models ---------------------------------------------------------------

D_VOCAB = 64
"""Vocabulary of ``build_model``'s models (and of the ``tokens`` fixture)."""
N_CTX = 16
"""Context of ``build_model``'s models (and of ``run_saelens_runner``'s dataset)."""


def build_model(
    *,
    n_kv_heads: int | None = None,
    attn_only: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """A 2-layer model with random weights and a non-zero value bias, so conventions differ.

    ``n_kv_heads`` makes it a rotary grouped-query (Llama-like) model; ``dtype`` builds it in
    half precision for the tests of models that compute in float16 or bfloat16.
    """
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=N_CTX,
        d_head=8,
        n_heads=4,
        n_key_value_heads=n_kv_heads,
        d_vocab=D_VOCAB,
        d_mlp=None if attn_only else 64,
        act_fn="gelu",
        attn_only=attn_only,
        positional_embedding_type="rotary" if n_kv_heads else "standard",
        normalization_type="LN",
        original_architecture="LlamaForCausalLM" if n_kv_heads else "GPT2LMHeadModel",
        seed=seed,
        dtype=dtype,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            attn: Any = block.attn
            bias = attn._b_V if n_kv_heads else attn.b_V
            bias.normal_(0, 0.5)
            attn.b_O.normal_(0, 0.1)
    return model.eval()


# --- planted ground truth: a hand-set previous-token model with planted features ---------------

PLANTED_N_CTX, PLANTED_D_VOCAB, PLANTED_D_HEAD = 16, 32, 16
"""Context, vocabulary and head width of ``planted``'s model."""
POOL = [3, 5, 7, 9, 11, 13, 20, 22, 24, 26, 28, 30]
"""Tokens of the planted contexts; the first six are the planted features' tokens."""


class Planted(NamedTuple):
    model: HookedTransformer
    sae: SAE[Any]
    tokens: Tensor
    labels: dict[int, str]
    """What each planted feature is, by construction."""
    heads: dict[int, int]
    """The head whose z block each feature reads and writes."""


def planted() -> Planted:
    """An attention-only model whose two heads attend to the previous token through one-hot
    positional embeddings, and an SAE with features planted on them.

    Residual dims 0..15: position (one-hot); 16..30: token; 48..62: what the heads write. Each
    head's query at q is ``e_q`` and its key at k is ``e_{k+1}``, so it attends from q to q − 1
    (score 10 against 0); its values copy the token dims (value dim 15 stays 0), and W_O maps
    value dim j to residual dim 48 + j, except dim 15, which it drops. Feature i (i < 6) reads
    "the previous token is POOL[i]" from head ``i // 3``; its decoder writes nothing the
    unembedding sees (dim 15: local context), the unembedding of its token (copying, feature 1)
    or minus it (suppression, feature 2). Feature 6 never fires.
    """
    from sae_lens_attn.analysis.families import NEVER_FIRES

    n_ctx, d_vocab, d_head = PLANTED_N_CTX, PLANTED_D_VOCAB, PLANTED_D_HEAD
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=64, n_ctx=n_ctx, d_head=d_head, n_heads=2, d_vocab=d_vocab,
        attn_only=True, normalization_type=None, positional_embedding_type="standard",
        act_fn="relu", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.W_pos[:, :n_ctx] = torch.eye(n_ctx)
        others = torch.randn(d_vocab, 9, generator=g)
        model.W_E[:, 22:31] = others / others.norm(dim=-1, keepdim=True)  # token dims 6..14
        for i, token in enumerate(POOL[:6]):
            model.W_E[token] = 0
            model.W_E[token, 16 + i] = 1.0  # planted tokens: their own token dim
        attn: Any = model.blocks[0].attn
        for h in range(2):
            attn.W_Q[h, :n_ctx, :n_ctx] = 40 * torch.eye(n_ctx)
            attn.W_K[h, torch.arange(n_ctx - 1), torch.arange(1, n_ctx)] = 1.0
            attn.W_V[h, 16:31, :15] = torch.eye(15)
            attn.W_O[h, :15, 48:63] = torch.eye(15)
        model.W_U[48:63] = torch.randn(15, d_vocab, generator=g)
        model.W_U[48:63, POOL[1]] *= 3  # the copied and the suppressed token stand out
        model.W_U[48:63, POOL[2]] *= 3

    sae_cfg = StandardSAEConfig(
        d_in=2 * d_head, d_sae=7, apply_b_dec_to_input=False, reshape_activations="hook_z"
    )
    for key, value in {"hook_name": "blocks.0.attn.hook_z", "n_heads": 2, "n_kv_heads": 2}.items():
        sae_cfg.metadata[key] = value
    sae_cfg.metadata["d_head"] = d_head
    sae = StandardSAE(sae_cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
        for i in range(6):
            block = (i // 3) * d_head
            sae.W_enc[block + i, i] = 1.0
            sae.b_enc[i] = -0.5
            sae.W_dec[i, block + 15] = 1.0  # invisible to W_U
        sae.W_dec[1, :15] = model.W_U[48:63, POOL[1]]
        sae.W_dec[2, :15] = -model.W_U[48:63, POOL[2]]
        sae.W_dec[6, 15] = 1.0
        sae.b_enc[6] = -1e3
    rows = torch.tensor(POOL)[torch.randint(0, len(POOL), (64, n_ctx), generator=g)]
    rows[:, 0] = 0  # BOS, ignored as a query and as a source
    labels = {0: "local_context", 1: "copying", 2: "suppression"}
    labels |= {i: "local_context" for i in (3, 4, 5)} | {6: NEVER_FIRES}
    return Planted(model, sae, rows, labels, {i: i // 3 for i in range(6)})


# --- token batches -----------------------------------------------------------------------------


def batch(n: int = 3, pos: int = 12, seed: int = 0, *, vocab: int = VOCAB_SIZE) -> Tensor:
    """``[n, pos]`` seeded random tokens in ``2..vocab - 1`` (no BOS or pad id)."""
    return torch.randint(2, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


# --- random SAEs -------------------------------------------------------------------------------


def random_sae(
    site: AttnSite,
    architecture: str = "standard",
    folder: Path | None = None,
    *,
    d_sae: int = 96,
    seed: int = 0,
    std: float = 0.3,
    k: int = 5,
    normalize_activations: str = "none",
    apply_b_dec_to_input: bool = True,
    reshape_activations: str = "hook_z",
    **meta: Any,
) -> SAE[Any]:
    """A random SAE of ``architecture`` on ``site``: every parameter (biases included) drawn from
    N(0, std²) after ``torch.manual_seed(seed)``, thresholds made positive.

    ``architecture`` is one of SAELens's inference classes (``"standard"``, ``"topk"``,
    ``"topk_rescaled"``, ``"jumprelu"``, ``"gated"``), ``"batchtopk_training"``, or
    ``"batchtopk_saved"``: a BatchTopK SAE saved to ``folder`` and loaded back (as JumpReLU).

    The metadata names the site (``hook_name``, ``n_heads``, ``n_kv_heads``, ``d_head``); ``meta``
    adds to it or overrides it (``value_bias_convention="included"``, or ``n_heads=None``).
    ``k`` is the TopK / BatchTopK k.
    """
    kwargs: dict[str, Any] = {
        "d_in": site.d_in,
        "d_sae": d_sae,
        "normalize_activations": normalize_activations,
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "reshape_activations": reshape_activations,
    }
    builders: dict[str, Callable[[], tuple[type[Any], Any]]] = {
        "standard": lambda: (StandardSAE, StandardSAEConfig(**kwargs)),
        "topk": lambda: (TopKSAE, TopKSAEConfig(k=k, **kwargs)),
        "topk_rescaled": lambda: (
            TopKSAE,
            TopKSAEConfig(k=k, rescale_acts_by_decoder_norm=True, **kwargs),
        ),
        "jumprelu": lambda: (JumpReLUSAE, JumpReLUSAEConfig(**kwargs)),
        "gated": lambda: (GatedSAE, GatedSAEConfig(**kwargs)),
        "batchtopk_training": lambda: (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig(k=k, **kwargs),
        ),
        "batchtopk_saved": lambda: (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig(k=k, **kwargs),
        ),
    }
    if architecture not in builders:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {list(builders)}")
    if architecture == "batchtopk_saved" and folder is None:
        raise ValueError("architecture 'batchtopk_saved' needs a folder to save the SAE to")
    sae_cls, cfg = builders[architecture]()
    for key, value in {
        "hook_name": site.hook_name,
        "n_heads": site.n_heads,
        "n_kv_heads": site.n_kv_heads,
        "d_head": site.d_head,
        **meta,
    }.items():
        cfg.metadata[key] = value
    torch.manual_seed(seed)
    sae: Any = sae_cls(cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, std)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.2)
    if architecture == "batchtopk_saved":
        assert folder is not None
        sae.save_inference_model(folder / "batchtopk")
        sae = SAE.load_from_disk(folder / "batchtopk")
        assert type(sae) is JumpReLUSAE  # SAELens's inference architecture for BatchTopK
    return sae


def near_identity_sae(
    site: AttnSite, *, noise: float = 0.01, threshold: float = 0.1, seed: int = 0, **meta: Any
) -> SAE[Any]:
    """A standard SAE that reconstructs z roughly: features ±e_i with noise and a threshold.

    With ``noise=0, threshold=0`` it reconstructs z exactly (``relu(x) − relu(−x) = x``).
    """
    d_in = site.d_in
    cfg = StandardSAEConfig(d_in=d_in, d_sae=2 * d_in + 8, reshape_activations="hook_z")
    for key, value in {
        "hook_name": site.hook_name,
        "n_heads": site.n_heads,
        "n_kv_heads": site.n_kv_heads,
        "d_head": site.d_head,
        **meta,
    }.items():
        cfg.metadata[key] = value  # fmt: skip
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d_in)
    W = torch.cat([eye, -eye, torch.zeros(d_in, 8)], dim=1)
    with torch.no_grad():
        sae.W_enc.copy_(W + noise * torch.randn(W.shape, generator=g))
        sae.W_dec.copy_(W.T + noise * torch.randn(W.T.shape, generator=g))
        sae.b_enc.fill_(-threshold)
        sae.b_enc[-8:] = -1e3  # eight dead features
        sae.b_dec.zero_()
    return sae


def sae_lens_encode(sae: SAE[Any], z: Tensor) -> tuple[Tensor, Tensor]:
    """``(hook_sae_acts_pre, encode(z))`` as SAELens computes them, z ``[..., n_heads, d_head]``."""
    seen: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
        seen.append(out.detach())

    handle = sae.hook_sae_acts_pre.register_forward_hook(keep)
    try:
        with torch.no_grad():
            # SAELens flattens hook_z itself in this mode (off on training SAEs, whatever the cfg)
            acts = sae.encode(z if sae.hook_z_reshaping_mode else z.flatten(-2))
    finally:
        handle.remove()
    return seen[0], acts.detach()


# --- z without this package --------------------------------------------------------------------


class HFAttention(NamedTuple):
    """Where a Hugging Face class keeps its attention, stated here rather than read from the
    package's architecture table, so that the references check the table instead of repeating it.
    Paths after ``layers`` are relative to one decoder layer."""

    layers: str
    """The decoder layers."""
    out_proj: str
    """The output projection: its input is z, heads concatenated head-major."""
    values: str | None
    """The module whose output holds the values (``None``: no affine values, e.g. MLA)."""
    layout: Literal["v", "qkv", "head_qkv"]
    """Where the values sit in its output: all of it (``v``), the last of three blocks q | k | v
    (``qkv``), or the last of q, k, v within each head (``head_qkv``)."""
    norm: str | None
    """The norm that feeds the values; its bias β folds into the value bias (none: no β)."""


_LLAMA_LIKE = HFAttention(
    "model.layers", "self_attn.o_proj", "self_attn.v_proj", "v", "input_layernorm"
)
HF_ATTENTION: dict[str, HFAttention] = {
    "GPT2LMHeadModel": HFAttention("transformer.h", "attn.c_proj", "attn.c_attn", "qkv", "ln_1"),
    "GPTNeoXForCausalLM": HFAttention(
        "gpt_neox.layers", "attention.dense", "attention.query_key_value", "head_qkv",
        "input_layernorm",
    ),
    "BloomForCausalLM": HFAttention(
        "transformer.h", "self_attention.dense", "self_attention.query_key_value", "head_qkv",
        "input_layernorm",
    ),
    "OPTForCausalLM": HFAttention(
        "model.decoder.layers", "self_attn.out_proj", "self_attn.v_proj", "v",
        "self_attn_layer_norm",  # before attention only with do_layer_norm_before
    ),
    **dict.fromkeys(
        ("LlamaForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
         "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "StableLmForCausalLM", "GptOssForCausalLM"),
        _LLAMA_LIKE,
    ),
    **dict.fromkeys(
        ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
        HFAttention("model.layers", "self_attn.o_proj", None, "v", None),
    ),
}  # fmt: skip
"""Per Hugging Face class (the models of ``hf_twins``)."""


def _hf_attention(model: Any) -> HFAttention:
    name = type(model).__name__
    if name not in HF_ATTENTION:
        raise ValueError(
            f"no independent reference for {name}; expected one of {list(HF_ATTENTION)}"
        )
    return HF_ATTENTION[name]


def _hf_layer(model: Any, layer: int) -> nn.Module:
    return model.get_submodule(f"{_hf_attention(model).layers}.{layer}")


def out_proj(model: Any, layer: int) -> Any:
    """The Hugging Face output projection of ``layer`` (its input is z): an ``nn.Linear``, or
    GPT-2's ``Conv1D`` (weight ``[in, out]``)."""
    return _hf_layer(model, layer).get_submodule(_hf_attention(model).out_proj)


@contextmanager
def out_proj_hooks(model: Any, hook: Callable[[int, Tensor], Tensor | None]) -> Iterator[None]:
    """``hook(layer, z_flat)`` on every output projection's input, as a plain torch forward
    pre-hook; a returned tensor replaces z. The hooks are removed on exit."""

    def make(layer: int) -> Any:
        def pre_hook(_module: Any, args: tuple[Any, ...]) -> Any:
            new = hook(layer, args[0])
            return None if new is None else (new, *args[1:])

        return pre_hook

    n_layers = len(model.get_submodule(_hf_attention(model).layers))
    handles = [
        out_proj(model, layer).register_forward_pre_hook(make(layer)) for layer in range(n_layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def out_proj_inputs(model: Any, tokens: Tensor, **kwargs: Any) -> dict[int, Tensor]:
    """Every layer's z ``[batch, pos, n_heads * d_head]`` as a plain torch pre-hook on the output
    projection sees it (b_V included); ``kwargs`` go to the model's forward."""
    seen: dict[int, Tensor] = {}
    with (
        torch.no_grad(),
        out_proj_hooks(model, lambda layer, z: seen.__setitem__(layer, z.detach())),
    ):
        model(tokens, **kwargs)
    return seen


def z_width(model: Any, layer: int) -> int:
    """The width of z: the input width of the output projection."""
    proj = out_proj(model, layer)
    weight = proj.weight
    return weight.shape[0] if type(proj).__name__ == "Conv1D" else weight.shape[1]  # [in, out]


def _n_heads(model: Any) -> int:
    if isinstance(model, HookedTransformer):
        return model.cfg.n_heads
    return int(model.config.num_attention_heads)


def value_bias_from_weights(model: Any, layer: int) -> Tensor:
    """``b_V + β·W_V`` per query head ``[n_heads, d_head]``, from the weights: β is the bias of the
    norm feeding the values (none for RMSNorm, for a processed TransformerLens model's ``LNPre``,
    or for a post-LN model whose attention reads the raw residual); grouped KV heads expanded."""
    n_heads = _n_heads(model)
    if isinstance(model, HookedTransformer):
        block: Any = model.blocks[layer]
        attn = block.attn
        b_V = attn._b_V if hasattr(attn, "_b_V") else attn.b_V  # (KV heads, d_head)
        W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V  # (KV heads, d_model, d_head)
        beta = getattr(block.ln1, "b", None)
        bias = b_V.detach() + (0 if beta is None else torch.einsum("m,hmd->hd", beta, W_V.detach()))
        return bias.repeat_interleave(n_heads // bias.shape[0], dim=0)
    row = _hf_attention(model)
    if row.values is None:
        raise ValueError(f"{type(model).__name__} has no affine values: no folded value bias")
    d_head = z_width(model, layer) // n_heads
    values: Any = _hf_layer(model, layer).get_submodule(row.values)
    weight = values.weight.detach()
    w_out_in = weight.T if type(values).__name__ == "Conv1D" else weight  # Conv1D: [in, out]
    vec = torch.zeros(w_out_in.shape[0]) if values.bias is None else values.bias.detach().clone()
    feeds_values = getattr(model.config, "do_layer_norm_before", True)  # OPT's post-LN variant
    norm = _hf_layer(model, layer).get_submodule(row.norm) if row.norm and feeds_values else None
    beta = getattr(norm, "bias", None)
    if beta is not None:
        vec = vec + w_out_in @ beta.detach()
    if row.layout == "qkv":
        per_head = vec.view(3, -1)[2].view(-1, d_head)
    elif row.layout == "head_qkv":
        per_head = vec.view(n_heads, 3, d_head)[:, 2]
    else:
        per_head = vec.view(-1, d_head)  # (KV heads, d_head)
    return per_head.repeat_interleave(n_heads // per_head.shape[0], dim=0)


def independent_z(
    model: Any,
    tokens: Tensor,
    layer: int,
    *,
    convention: Literal["included", "folded"] = "included",
    **kwargs: Any,
) -> Tensor:
    """Layer ``layer``'s z ``[batch, pos, n_heads, d_head]`` taken without this package: a
    HookedTransformer's own ``blocks.L.attn.hook_z`` (``run_with_cache``), or a torch forward
    pre-hook on a Hugging Face model's output projection. ``"folded"`` subtracts
    ``value_bias_from_weights`` (``b_V + β·W_V`` per head, DESIGN.md's convention); ``kwargs``
    go to a Hugging Face model's forward."""
    if isinstance(model, HookedTransformer):
        name = f"blocks.{layer}.attn.hook_z"
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[name])
        z = cache[name]
    else:
        z = out_proj_inputs(model, tokens, **kwargs)[layer].unflatten(-1, (_n_heads(model), -1))
    if convention == "folded":
        z = z - value_bias_from_weights(model, layer).to(z.dtype)
    elif convention != "included":
        raise ValueError(f"unknown convention {convention!r}; valid: ['included', 'folded']")
    return z


# --- TransformerBridge (TransformerLens >= 3 only) --------------------------------------------


def boot(arch: str, tokenizer: Any, *, cls: Any = None, **compat: Any) -> Any:
    """A bridge (``cls``, by default ``TransformerBridge``) over a fresh ``build_hf(arch)`` (same
    weights every call; the bridge re-wraps the HF model's modules in place, so it gets a model
    of its own). ``compat`` keywords switch on ``enable_compatibility_mode(**compat)``."""
    if cls is None:
        from transformer_lens.model_bridge import (  # pyright: ignore[reportMissingImports]
            TransformerBridge,  # TransformerLens >= 3 only
        )

        cls = TransformerBridge
    bridge = cls.boot_transformers(
        f"tiny-{arch}", hf_model=build_hf(arch), tokenizer=tokenizer, device="cpu"
    )
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    return bridge


def hook_counts(module: nn.Module) -> int:
    """Forward hooks and pre-hooks on ``module`` and everything under it."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# --- SAELens workflows -------------------------------------------------------------------------

FROM_PRETRAINED_DEFAULTS = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}
"""HookedTransformer.from_pretrained's default processing (TransformerLens's signature)."""


def run_saelens_runner(
    model: Any, sae_cfg: Any, hook_name: str, out: Path, dataset: Dataset | None = None
) -> Any:
    """SAELens's own runner, offline: a pretokenized dataset (random tokens by default)."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    if dataset is None:
        tokens = torch.randint(1, D_VOCAB, (64, N_CTX), generator=torch.Generator().manual_seed(1))
        dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny-attn",
        hook_name=hook_name,
        dataset_path="",
        context_size=N_CTX,
        training_tokens=1024,
        train_batch_size_tokens=64,
        store_batch_size_prompts=4,
        n_batches_in_buffer=8,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(out),
        n_checkpoints=0,
        streaming=False,
        prepend_bos=False,
    )
    return LanguageModelSAETrainingRunner(
        runner_cfg, override_dataset=dataset, override_model=model
    ).run()


# --- the embedded default model's explorer -----------------------------------------------------

PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
PROMPTS = [
    PROMPT,
    "for i in range(10):\n    total += i\n",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n",
    "import os\npath = os.path.join(root, name)\n",
    "x = [n * n for n in numbers if n % 2]\n",
    "with open(path) as f:\n    text = f.read()\n",
]
"""Code prompts for the explorer."""


def label_contexts(tokenizer: Any, rows: int = 8, ctx: int = 64) -> Tensor:
    """BOS-led contexts of real code (this file's source) for family labels."""
    from sae_lens_attn.store import TokenBatches

    text = Path(__file__).read_text()
    return TokenBatches.from_texts(tokenizer, [text], context_size=ctx, batch_size=1).tokens[:rows]


def default_session(**kwargs: Any) -> ExplorerSession:
    """The embedded default model with its two shipped SAEs, as ``explore`` serves by default."""
    import sae_lens_attn as sla
    from sae_lens_attn.explorer import ExplorerSession

    model, tokenizer = sla.load_default_model()
    saes = [SAE.from_pretrained("stdlib-2l-attn-z", f"blocks.{layer}") for layer in (0, 1)]
    return ExplorerSession(
        model, saes, tokenizer=tokenizer, family_tokens=label_contexts(tokenizer), **kwargs
    )
