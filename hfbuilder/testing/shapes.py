"""One table of model shapes for the tests and the benchmarks.

Published shapes are copied from the models' own ``config.json`` (vocabulary rows included:
OPT's is 50,272 rows for a 50,265-token tokenizer); the others say what they are scaled from
and why. The tokenizer of a shape is :func:`hfbuilder.testing.make_tokenizer`'s WordLevel one
with ``n_words`` words, so ``len(tokenizer) == n_words + 4`` and the special ids match the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """A model shape: its transformers ``model_type``, config fields and tokenizer size."""

    model_type: str
    fields: Mapping[str, Any]
    n_words: int
    about: str = ""

    @property
    def vocab_size(self) -> int:
        return int(self.fields["vocab_size"])

    @property
    def tokenizer_len(self) -> int:
        return self.n_words + 4

    def config(self, **overrides: Any) -> Any:
        """The transformers config, with :mod:`hfbuilder.testing`'s special ids and ``overrides``.

        Built in one call, so fields derived in ``__init__`` (Llama's ``head_dim``) follow the shape.
        """
        from transformers import AutoConfig

        from .models import BOS_ID, EOS_ID, PAD_ID

        ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        return AutoConfig.for_model(self.model_type, **{**self.fields, **ids, **overrides})


_OPT_TOKENIZER = 50261  # words: OPT's tokenizer has 50,265 tokens
_LLAMA3_TOKENIZER = 128252  # words: Llama 3's has 128,256

SHAPES: dict[str, Shape] = {
    "tiny": Shape("opt", dict(
        vocab_size=56, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=8,
        do_layer_norm_before=False, max_position_embeddings=64,
    ), n_words=46, about="OPT-350m's layout (project_in/out, post-layer-norm) in kilobytes, for smoke tests"),
    "opt-350m": Shape("opt", dict(
        vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
        word_embed_proj_dim=512, do_layer_norm_before=False, max_position_embeddings=2048,
    ), n_words=_OPT_TOKENIZER, about="facebook/opt-350m"),
    "opt-1.3b": Shape("opt", dict(
        vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
        word_embed_proj_dim=2048, do_layer_norm_before=True, max_position_embeddings=2048,
    ), n_words=_OPT_TOKENIZER, about="facebook/opt-1.3b"),
    "tiny-llama3": Shape("llama", dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=False,
    ), n_words=60, about="Llama 3's layout (GQA, untied head) in kilobytes, for smoke tests"),
    "llama3-8b": Shape("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ), n_words=_LLAMA3_TOKENIZER, about="meta-llama/Meta-Llama-3-8B"),
    "llama3-scaled": Shape("llama", dict(
        vocab_size=128256, hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ), n_words=_LLAMA3_TOKENIZER, about=(
        "Llama 3's 128,256-row vocabulary, untied head and 4:1 GQA at hidden 768 and 2 layers (428 MB in fp16): "
        "the vocabulary dominates, as in Llama-3.2-1B, and eight CPU ranks of DeepSpeed-Chat's algorithm, each "
        "holding the whole model, fit in 24 GiB"
    )),
}  # fmt: skip


def shape(name: str) -> Shape:
    """The shape called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None


__all__ = ["SHAPES", "Shape", "shape"]
