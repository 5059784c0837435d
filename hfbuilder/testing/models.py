"""Tiny real models and tokenizers, made locally.

Nothing here downloads: the tokenizer is a ``tokenizers`` WordLevel model wrapped in
``PreTrainedTokenizerFast``, the models are real transformers classes with small
configs, saved to disk like real checkpoints. Plugin authors can use it in their tests.
"""

from __future__ import annotations

import os
from typing import Any

from .moe import LOOPED_MOE

FAMILIES: tuple[str, ...] = ("opt", "llama", "gpt2", "gpt_neox", "qwen2")
#: Today's families, by ``model_type``: tied Qwen3, two MoE families (experts fused into 3-D
#: weights in transformers 5), Gemma-2/3 with sliding and full attention layers, Phi-3's fused
#: projections, Mistral's sliding window. Kept apart from :data:`FAMILIES` so that tests
#: parametrized over those stay as fast as they were.
MODERN_FAMILIES: tuple[str, ...] = ("qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text", "phi3", "mistral")
#: The mixture-of-experts families among them.
MOE_FAMILIES: tuple[str, ...] = ("qwen3_moe", "mixtral")

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def make_tokenizer(n_words: int = 41, path: str | os.PathLike[str] | None = None) -> Any:
    """A WordLevel tokenizer with ``len == n_words + 4`` (pad, unk, bos, eos first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if path is not None:
        tok.save_pretrained(os.fspath(path))
    return tok


def make_config(family: str, vocab_size: int = 45, **overrides: Any) -> Any:
    """A small config of ``family`` whose special ids match :func:`make_tokenizer`."""
    import transformers as tf

    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                           num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64,
                           dropout=0.1, attention_dropout=0.05, activation_dropout=0.02, **ids)
    elif family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             tie_word_embeddings=False, **ids)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, **ids)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=64, hidden_dropout=0.1,
                               attention_dropout=0.1, **ids)
    elif family == "qwen2":
        # Qwen-style padded vocabulary: larger than the tokenizer.
        cfg = tf.Qwen2Config(vocab_size=max(vocab_size, 64), hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=64, tie_word_embeddings=True, **ids)
    elif family in MODERN_FAMILIES or family == LOOPED_MOE:
        cfg = _modern_config(family, vocab_size, ids)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES + MODERN_FAMILIES + (LOOPED_MOE,)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _modern_config(family: str, vocab_size: int, ids: dict[str, int]) -> Any:
    import transformers as tf

    # Two heads of 8 and one KV head (grouped-query attention) everywhere. Families whose
    # head_dim defaults to a real model's (128, 256) set it, or the attention would be wider
    # than the model; Gemma's query scale follows it.
    small = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **ids)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, tie_word_embeddings=True, **small)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=8, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                 norm_topk_prob=True, **small)
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **{**small, "intermediate_size": 16})
    if family in ("gemma2", "gemma3_text"):
        cls = tf.Gemma2Config if family == "gemma2" else tf.Gemma3TextConfig
        # A window shorter than the test sequences, so the sliding layer really masks.
        return cls(head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"], **small)
    if family == "phi3":
        return tf.Phi3Config(original_max_position_embeddings=64, resid_pdrop=0.1, embd_pdrop=0.1,
                             attention_dropout=0.1, **small)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=4, **small)
    from .moe import looped_moe_classes

    return looped_moe_classes()["config"](vocab_size=vocab_size, **ids)


def make_model(family: str, path: str | os.PathLike[str], *, vocab_size: int = 45, n_words: int = 41,
               seed: int = 0, dtype: Any = None, **overrides: Any) -> str:
    """Save a random tiny causal LM of ``family`` and its tokenizer to ``path``; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = os.fspath(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, vocab_size, **overrides))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    make_tokenizer(n_words, path)
    return path


__all__ = ["FAMILIES", "MODERN_FAMILIES", "MOE_FAMILIES", "make_config", "make_model", "make_tokenizer"]
