"""Tiny Hugging Face causal LMs and their TransformerLens twins, built offline from configs.

Every model here is float32, two layers deep, in eval mode, and has all of its parameters drawn from
a seeded generator (never the global RNG), so two calls with the same arguments give identical
weights. Attention value biases are non-zero wherever the architecture has them (GPT-2 ``c_attn``,
NeoX ``query_key_value``, Qwen2 ``v_proj``), so conventions that include or fold ``b_V`` into ``z``
differ measurably.

Example:
    >>> hf_model = build_hf("llama")
    >>> twin = build_twin(hf_model, fold_value_biases=False)
    >>> tokens = torch.randint(0, VOCAB_SIZE, (2, 8))
    >>> torch.testing.assert_close(twin(tokens), hf_model(tokens).logits)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gpt2_weights,
    convert_llama_weights,
    convert_neox_weights,
)

ARCHITECTURES_WITH_TWINS = ("gpt2", "llama", "neox")
ALL_ARCHITECTURES = ("gpt2", "llama", "neox", "mistral", "gemma", "gemma2", "qwen2")

VOCAB_SIZE = 64
"""Vocabulary size of every model here (and of ``make_tokenizer(VOCAB_SIZE)``)."""
N_CTX = 32
"""``n_positions`` / ``max_position_embeddings`` of every model here."""
BOS_ID, PAD_ID = 0, 1
"""Ids of ``"<bos>"`` (also eos and unk) and ``"<pad>"`` in ``make_tokenizer``'s vocabulary."""

_SPECIAL_TOKEN_IDS: dict[str, Any] = {
    "bos_token_id": BOS_ID,
    "eos_token_id": BOS_ID,
    "pad_token_id": PAD_ID,
}
_BIAS_STD = 0.2
_WEIGHT_STD = 0.15
_NORM_STD = 0.1


def _rope(**legacy: Any) -> dict[str, Any]:
    """Rotary keywords as transformers 4.57 names them (``rope_theta``, ``rotary_pct``, ...).

    transformers 5 still accepts them and moves them into ``config.rope_parameters``, but its
    typed configs no longer declare them; ``_rope_setting`` reads them back on either version.
    """
    return legacy


def _gpt2_config() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=N_CTX,
        n_embd=32,
        n_layer=2,
        n_head=4,  # d_head 8
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_SPECIAL_TOKEN_IDS,
    )


def _llama_config() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 8
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=N_CTX,
        rms_norm_eps=1e-6,  # differs from TransformerLens's default 1e-5 on purpose
        **_rope(rope_theta=10_000.0),
        tie_word_embeddings=False,
        **_SPECIAL_TOKEN_IDS,
    )


def _neox_config() -> transformers.PretrainedConfig:
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        # d_model != d_vocab: TransformerLens 3's fold_ln folds ln_final into a square W_U along
        # the wrong axis.
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 24
        **_rope(rotary_pct=0.25, rotary_emb_base=10_000),  # rotary_dim 6 of 24
        max_position_embeddings=N_CTX,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        hidden_act="gelu",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **_SPECIAL_TOKEN_IDS,
    )


def _mistral_config() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=N_CTX,
        sliding_window=N_CTX,
        **_SPECIAL_TOKEN_IDS,
    )


def _gemma_config() -> transformers.PretrainedConfig:
    return transformers.GemmaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # multi-query attention, as in Gemma 2B
        head_dim=16,
        max_position_embeddings=N_CTX,
        hidden_act="gelu_pytorch_tanh",
        **_SPECIAL_TOKEN_IDS,
    )


def _gemma2_config() -> transformers.PretrainedConfig:
    return transformers.Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=N_CTX,
        sliding_window=8,  # layer 0 is sliding, layer 1 global; 8 < N_CTX so it matters
        hidden_activation="gelu_pytorch_tanh",
        **_SPECIAL_TOKEN_IDS,
    )


def _qwen2_config() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 8; q/k/v projections have biases
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        tie_word_embeddings=False,
        **_SPECIAL_TOKEN_IDS,
    )


def _gemma2_softcap_config() -> transformers.PretrainedConfig:
    # Gemma-2 with a tight attn_logit_softcapping, so that the softcap (applied by eager attention
    # only in transformers 4.57) changes the patterns a lot: logits reach well past 1.
    config = _gemma2_config()
    config.attn_logit_softcapping = 1.0
    config.query_pre_attn_scalar = 1  # scaling 1 (transformers 5 requires an int here)
    return config


def _gpt_oss_config() -> transformers.PretrainedConfig:
    return transformers.GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,  # attention sinks: one learned logit per head
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=N_CTX,
        **_rope(rope_scaling={"rope_type": "default"}),  # plain RoPE (5.x takes None as yarn)
        attention_bias=True,
        initializer_range=0.0,  # sinks start from HF's init (the global RNG): make it zero
        tie_word_embeddings=False,
        **_SPECIAL_TOKEN_IDS,
    )


def _opt_config(*, pre_norm: bool = True) -> transformers.PretrainedConfig:
    return transformers.OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 8
        max_position_embeddings=N_CTX,
        word_embed_proj_dim=32,
        do_layer_norm_before=pre_norm,
        dropout=0.0,
        enable_bias=True,
        **_SPECIAL_TOKEN_IDS,
    )


def _opt_post_ln_config() -> transformers.PretrainedConfig:
    return _opt_config(pre_norm=False)  # as OPT-350m: the norm comes after attention


def _stablelm_config() -> transformers.PretrainedConfig:
    return transformers.StableLmConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 8, rotary on a quarter of it
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        use_qkv_bias=True,
        **_SPECIAL_TOKEN_IDS,
    )


def _qwen2_moe_config() -> transformers.PretrainedConfig:
    return transformers.Qwen2MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        **_SPECIAL_TOKEN_IDS,
    )


def _bloom_config() -> transformers.PretrainedConfig:
    return transformers.BloomConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        n_layer=2,
        n_head=4,  # d_head 8; ALiBi, no position embeddings
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **_SPECIAL_TOKEN_IDS,
    )


def _deepseek_v3_config() -> transformers.PretrainedConfig:
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=6,  # d_head of z (6) differs from the query/key head width (12)
        max_position_embeddings=N_CTX,
        **_SPECIAL_TOKEN_IDS,
    )


def _deepseek_v2_config() -> transformers.PretrainedConfig:
    config = transformers.DeepseekV2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=6,
        max_position_embeddings=N_CTX,
        **_SPECIAL_TOKEN_IDS,
    )
    cast(Any, config).q_lora_rank = None  # a plain q_proj as in DeepSeek-V2-Lite (typed int)
    return config


_HF_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": _gpt2_config,
    "llama": _llama_config,
    "neox": _neox_config,
    "mistral": _mistral_config,
    "gemma": _gemma_config,
    "gemma2": _gemma2_config,
    "qwen2": _qwen2_config,
    "gemma2_softcap": _gemma2_softcap_config,
    "gpt_oss": _gpt_oss_config,
    "opt": _opt_config,
    "opt_post_ln": _opt_post_ln_config,
    "stablelm": _stablelm_config,
    "qwen2_moe": _qwen2_moe_config,
    "bloom": _bloom_config,
    "deepseek_v3": _deepseek_v3_config,
    "deepseek_v2": _deepseek_v2_config,
}


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a seeded generator, so the global RNG plays no part.

    Matrices ~ N(0, 0.15²) (attention clearly non-uniform, float32 parity error about 2e-6),
    biases ~ N(0, 0.2²), norm gains = HF's constant init (1, or 0 where the norm scales by 1 + w)
    + N(0, 0.1²).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters appear once
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if name.endswith("bias"):
                param.copy_(_BIAS_STD * noise)
            elif param.ndim == 1:  # norm gains: perturb HF's constant init (1, or 0 for 1 + w)
                param.add_(_NORM_STD * noise)
            else:
                param.copy_(_WEIGHT_STD * noise)


def build_hf(
    arch: str, *, attn_implementation: str = "eager", seed: int = 0
) -> transformers.PreTrainedModel:
    """Build a tiny randomly initialised Hugging Face causal LM, offline.

    Args:
        arch: one of ``ALL_ARCHITECTURES``.
        attn_implementation: ``"eager"`` or ``"sdpa"`` (passed to ``from_config``).
        seed: seed for the parameter draw; the global RNG is left untouched.

    Returns:
        A float32 model in eval mode whose value biases (where it has them) are non-zero.

    Example:
        >>> build_hf("qwen2").model.layers[0].self_attn.v_proj.bias.abs().sum() > 0
        tensor(True)
    """
    if arch not in _HF_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ALL_ARCHITECTURES}")
    model: Any = transformers.AutoModelForCausalLM.from_config(
        _HF_CONFIGS[arch](), attn_implementation=attn_implementation, dtype=torch.float32
    )
    _randomize_(model, seed)
    return model.eval()


def _rope_setting(hf: Any, key: str) -> Any:
    """A rotary setting of an HF config: ``rope_parameters[key]`` in transformers 5, else ``key``.

    transformers 5 moved ``rope_theta`` and ``partial_rotary_factor`` (NeoX's ``rotary_pct``) into
    ``config.rope_parameters``; transformers 4.57 keeps them as attributes.
    """
    parameters = getattr(hf, "rope_parameters", None)
    if isinstance(parameters, dict) and key in parameters:
        return parameters[key]
    return getattr(hf, key)


def supports_sdpa(arch: str) -> bool:
    """Whether the installed transformers builds ``arch`` with ``attn_implementation="sdpa"``.

    transformers 4.57 refuses SDPA for GPT-OSS and BLOOM; transformers 5 also for Gemma-2 (whose
    SDPA path in 4.57 drops ``attn_logit_softcapping``). ``build_hf`` raises ``ValueError`` there.
    """
    if arch not in _HF_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {tuple(_HF_CONFIGS)}")
    model_class: Any = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(_HF_CONFIGS[arch]())]
    return bool(model_class._supports_sdpa)


def _gpt2_twin_config(hf: Any) -> dict[str, Any]:
    # Mirrors transformer_lens.loading_from_pretrained.convert_hf_model_config("GPT2LMHeadModel").
    return {
        "d_model": hf.n_embd,
        "d_head": hf.n_embd // hf.n_head,
        "n_heads": hf.n_head,
        "d_mlp": hf.n_inner or 4 * hf.n_embd,
        "n_layers": hf.n_layer,
        "n_ctx": hf.n_positions,
        "eps": hf.layer_norm_epsilon,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.activation_function,  # "gelu_new": the tanh approximation
        "use_attn_scale": hf.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    }


def _llama_twin_config(hf: Any) -> dict[str, Any]:
    # Mirrors convert_hf_model_config("LlamaForCausalLM"), plus rotary_base from rope_theta.
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": (
            hf.num_key_value_heads if hf.num_key_value_heads != hf.num_attention_heads else None
        ),
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_act,
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": _rope_setting(hf, "rope_theta"),
        "rotary_adjacent_pairs": False,  # HF's rotate_half pairs dim i with i + d/2
    }


def _neox_twin_config(hf: Any) -> dict[str, Any]:
    # Mirrors convert_hf_model_config("GPTNeoXForCausalLM"). HF computes the rotary width as
    # int(d_head * partial_rotary_factor) and TransformerLens as round(...): use int, as HF runs it.
    d_head = hf.hidden_size // hf.num_attention_heads
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": hf.num_attention_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.layer_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_act,
        "normalization_type": "LN",
        "parallel_attn_mlp": hf.use_parallel_residual,
        "positional_embedding_type": "rotary",
        "rotary_dim": int(d_head * _rope_setting(hf, "partial_rotary_factor")),
        "rotary_base": _rope_setting(hf, "rope_theta"),
        "rotary_adjacent_pairs": False,
    }


class _Twin(NamedTuple):
    config: Callable[[Any], dict[str, Any]]
    """HookedTransformerConfig fields from the HF config."""
    convert: Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]
    """TransformerLens's own weight converter for the architecture."""


_TWINS: dict[str, _Twin] = {
    "GPT2LMHeadModel": _Twin(_gpt2_twin_config, convert_gpt2_weights),
    "LlamaForCausalLM": _Twin(_llama_twin_config, convert_llama_weights),
    "GPTNeoXForCausalLM": _Twin(_neox_twin_config, convert_neox_weights),
}


def build_twin(
    hf_model: transformers.PreTrainedModel,
    *,
    fold_value_biases: bool = False,
    full_processing: bool = False,
) -> HookedTransformer:
    """Build a TransformerLens ``HookedTransformer`` with the same weights as ``hf_model``.

    By default no weight processing happens (no layer-norm folding, centering or attention
    refactoring); ``fold_value_biases=True`` folds ``b_V`` alone into ``b_O``, and
    ``full_processing=True`` applies ``HookedTransformer.from_pretrained``'s default processing
    (fold_ln, center_writing_weights, center_unembed, fold_value_biases), the model that Kissane et
    al.'s SAEs were trained on.

    Args:
        hf_model: a model from ``build_hf(arch)`` with ``arch`` in ``ARCHITECTURES_WITH_TWINS``.
        fold_value_biases: ``False`` keeps ``b_V`` in ``z`` (``hook_z`` equals the input of HF's
            attention output projection); ``True`` moves it into ``b_O`` (``hook_z`` excludes it,
            but still carries the LayerNorm bias term ``β·W_V``).
        full_processing: ``from_pretrained``'s processing; ``hook_z`` then excludes
            ``b_V + β·W_V`` (the folded convention) and logits are centred per position.

    Returns:
        A float32 twin in eval mode on ``hf_model``'s device, with ``make_tokenizer``'s tokenizer.
    """
    class_name = type(hf_model).__name__
    if class_name not in _TWINS:
        raise ValueError(
            f"no TransformerLens twin for {class_name}; expected one of {tuple(_TWINS)}"
        )
    twin = _TWINS[class_name]
    hf_config: Any = hf_model.config
    param = next(hf_model.parameters())
    cfg = HookedTransformerConfig(
        **twin.config(hf_config),
        original_architecture=class_name,
        dtype=param.dtype,
        device=str(param.device),
        default_prepend_bos=True,
        init_weights=False,
    )
    with torch.no_grad():
        converted = twin.convert(hf_model, cfg)
        state_dict = {name: tensor.detach().clone() for name, tensor in converted.items()}
    model = HookedTransformer(cfg, tokenizer=make_tokenizer(cfg.d_vocab))
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=full_processing,
        center_writing_weights=full_processing,
        center_unembed=full_processing,
        fold_value_biases=fold_value_biases or full_processing,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def make_tokenizer(
    vocab_size: int, *, prepend_bos: bool = True
) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``"<bos>", "<pad>", "w2", ..., f"w{vocab_size - 1}"``.

    ``"<bos>"`` (id 0) is also the eos and unk token and ``"<pad>"`` (id 1) the pad token. With
    ``prepend_bos`` (the default) every encoding starts with ``"<bos>"``, as Llama's tokenizer does,
    so ``tokenizer(text)`` and TransformerLens's ``to_tokens(text)`` agree. Only such a tokenizer can
    be given to ``HookedTransformer`` offline: without ``add_bos_token`` its ``set_tokenizer`` reloads
    the tokenizer from the hub by name.

    Example:
        >>> make_tokenizer(8)("w2 w7 w9").input_ids
        [0, 2, 7, 0]
    """
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size must be at least 3 (two specials and one word), got {vocab_size}"
        )
    vocab = {"<bos>": BOS_ID, "<pad>": PAD_ID} | {f"w{i}": i for i in range(2, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<bos>",
        unk_token="<bos>",
        pad_token="<pad>",
        # TransformerLens's set_tokenizer re-loads the tokenizer from name_or_path (the hub) unless
        # add_bos_token is set, and needs name_or_path in init_kwargs either way.
        add_bos_token=prepend_bos,
        name_or_path=f"hf-twins-word-level-{vocab_size}",
        model_max_length=N_CTX,
    )
