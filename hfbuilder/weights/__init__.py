"""Checkpoint files: read them safely, map their keys onto a model, check them strictly.

The face of the package; each name is defined in the module named beside it.
Nothing here takes a build context: each function takes a model and plain values and
returns what it found or did, and the stage that calls it writes notes and provenance.
torch, transformers and safetensors are imported only when a function needs them.
"""

from .assign import Assigned, assign_from_checkpoint
from .binfile import load_bin
from .finite import FiniteSums, nonfinite
from .keys import KeyMap, map_keys
from .match import ALWAYS_IGNORED_UNEXPECTED, LoadPlan, check_plan, dtype_kind, listing, match_keys
from .policy import check_pretrained, format_conflict
from .reader import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointReader,
    Reader,
    TensorInfo,
    find_checkpoint,
    open_checkpoint,
)
from .summary import (
    DTYPE_BYTES,
    FORMAT_JSON,
    FORMAT_PICKLE,
    FORMAT_SAFETENSORS,
    CheckpointSummary,
    FileInfo,
    Layout,
    guess_layout,
    read_json,
    summarize,
)
from .tied import TensorGroup, set_tensor, tensor_groups, tied_groups

__all__ = [
    "ALWAYS_IGNORED_UNEXPECTED",
    "DTYPE_BYTES",
    "FORMAT_JSON",
    "FORMAT_PICKLE",
    "FORMAT_SAFETENSORS",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "Assigned",
    "CheckpointReader",
    "CheckpointSummary",
    "FileInfo",
    "FiniteSums",
    "KeyMap",
    "Layout",
    "LoadPlan",
    "Reader",
    "TensorGroup",
    "TensorInfo",
    "assign_from_checkpoint",
    "check_plan",
    "check_pretrained",
    "dtype_kind",
    "find_checkpoint",
    "format_conflict",
    "guess_layout",
    "listing",
    "load_bin",
    "map_keys",
    "match_keys",
    "nonfinite",
    "open_checkpoint",
    "read_json",
    "set_tensor",
    "summarize",
    "tensor_groups",
    "tied_groups",
]
