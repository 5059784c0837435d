"""One harness for everyone's tests: tiny real models, tokenizers, shapes and rank processes.

Nothing here downloads: the tokenizer is a ``tokenizers`` WordLevel model wrapped in
``PreTrainedTokenizerFast``, the models are real transformers classes with small
configs, saved to disk like real checkpoints. Plugin authors can use it in their tests,
as pytest's own plugins use ``pytester``. DeepSpeed-Chat's algorithm, the reference the
tests compare against, is the submodule :mod:`hfbuilder.testing.dschat` (it imports torch).
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
from .ranks import Launch, RanksFailed, end_rank, free_port, launch_ranks, rank_env, run_ranks, where_stuck
from .shapes import SHAPES, Shape, shape

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "FAMILIES",
    "LOOPED_MOE",
    "MODERN_FAMILIES",
    "MOE_FAMILIES",
    "PAD_ID",
    "SHAPES",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "Launch",
    "RanksFailed",
    "Shape",
    "end_rank",
    "looped_moe_classes",
    "free_port",
    "launch_ranks",
    "make_config",
    "make_model",
    "make_tokenizer",
    "rank_env",
    "run_ranks",
    "shape",
    "where_stuck",
]
