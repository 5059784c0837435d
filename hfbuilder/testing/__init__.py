"""One harness for everyone's tests: tiny real models, tokenizers and rank processes.

Nothing here downloads: the tokenizer is a ``tokenizers`` WordLevel model wrapped in
``PreTrainedTokenizerFast``, the models are real transformers classes with small
configs, saved to disk like real checkpoints. Plugin authors can use it in their tests,
as pytest's own plugins use ``pytester``.
"""

from .models import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    MODERN_FAMILIES,
    MOE_FAMILIES,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    make_config,
    make_model,
    make_tokenizer,
)
from .moe import LOOPED_MOE, looped_moe_classes
from .ranks import end_rank

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "FAMILIES",
    "LOOPED_MOE",
    "MODERN_FAMILIES",
    "MOE_FAMILIES",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "end_rank",
    "looped_moe_classes",
    "make_config",
    "make_model",
    "make_tokenizer",
]
