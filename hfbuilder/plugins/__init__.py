"""hfbuilder's built-in plugins. Each is registered through the same hooks a third party uses."""

from .checkpoint import CheckpointStage
from .config import ConfigStage
from .dropout import DropoutStage
from .fp32_loss import Fp32LossStage
from .freeze import FreezeStage
from .head import HeadStage
from .load import LoadStage
from .lora import LoraStage
from .materialize import MaterializeStage
from .resize import ResizeStage
from .reward import RewardHead
from .reward_layout import RewardLayoutStage
from .token_align import TokenAlignStage
from .zero import ZeroStage

__all__ = [
    "CheckpointStage",
    "ConfigStage",
    "DropoutStage",
    "Fp32LossStage",
    "FreezeStage",
    "HeadStage",
    "LoadStage",
    "LoraStage",
    "MaterializeStage",
    "ResizeStage",
    "RewardHead",
    "RewardLayoutStage",
    "TokenAlignStage",
    "ZeroStage",
]
