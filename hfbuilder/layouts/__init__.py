"""Reward and critic checkpoints from any framework: detect, read, write and convert value heads.

A :class:`Layout` is one framework's way to store a transformer body with a scalar value
head (DeepSpeed-Chat, OpenRLHF, transformers' classifiers, TRL, LLaMA-Factory). The
``reward_layout`` stage reads any of them into hfbuilder's ``RewardModel``;
:func:`convert` (``hfbuilder convert``) writes one as another. Third parties add layouts
through the ``hfbuilder_reward_layouts`` hook.
"""

from .base import BODY, HEAD_BIAS, HEAD_WEIGHT, Export, Extras, KeyMap, Layout
from .convert import Converted, convert
from .detect import AUTO, Resolved, check_layout_name, checkpoint_config, resolve_layout
from .registry import BUILTIN_LAYOUTS, LayoutSpecs, available_layouts, reward_layouts
from .view import LayoutReader

__all__ = [
    "AUTO",
    "BODY",
    "BUILTIN_LAYOUTS",
    "HEAD_BIAS",
    "HEAD_WEIGHT",
    "Converted",
    "Export",
    "Extras",
    "KeyMap",
    "Layout",
    "LayoutReader",
    "LayoutSpecs",
    "Resolved",
    "available_layouts",
    "check_layout_name",
    "checkpoint_config",
    "convert",
    "resolve_layout",
    "reward_layouts",
]
