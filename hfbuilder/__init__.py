"""hfbuilder: build Hugging Face models for RLHF with DeepSpeed, as a chain of plugin stages.

``import hfbuilder`` is light: torch, transformers and deepspeed are imported only
when a build needs them.
"""

from .builder import ModelBuilder
from .context import BuildContext, BuildReport, StageRecord
from .errors import (
    BuilderInputError,
    CheckpointError,
    DistributedSetupError,
    HFBuilderError,
    InvariantError,
    InvariantWarning,
    PluginError,
    StageError,
    StageOrderError,
    UnknownHeadError,
)
from .explain import Explanation, StageExplanation
from .hookspecs import hookimpl, hookspec
from .layouts import convert
from .save import save_model
from .settings import Settings, setting
from .stage import Head, Phase, Stage

__version__ = "0.1.0"

__all__ = [
    "BuildContext",
    "BuildReport",
    "BuilderInputError",
    "CheckpointError",
    "DistributedSetupError",
    "Explanation",
    "HFBuilderError",
    "Head",
    "InvariantError",
    "InvariantWarning",
    "ModelBuilder",
    "Phase",
    "PluginError",
    "Settings",
    "Stage",
    "StageError",
    "StageExplanation",
    "StageOrderError",
    "StageRecord",
    "UnknownHeadError",
    "convert",
    "hookimpl",
    "hookspec",
    "setting",
    "save_model",
]
