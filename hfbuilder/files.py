"""Checkpoint files without their weights: which files a path holds, their tensors' names,
shapes and dtypes (from safetensors headers and index files), and whose layout they follow.

``explain()`` and ``hfbuilder inspect`` use it; neither reads a weight. safetensors headers
are read with ``safe_open(..., framework="numpy")`` and ``get_slice``, which touch only the
header. A ``.bin`` file is a pickle: listing it needs ``torch.load(weights_only=True,
mmap=True)``, which refuses code and maps rather than reads the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

#: safetensors dtype names -> torch's, and the bytes per element of each.
DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}

FORMAT_SAFETENSORS = "safetensors"
FORMAT_PICKLE = "pytorch pickle (torch.load, weights_only=True)"
FORMAT_JSON = "json"


@dataclass(frozen=True)
class FileInfo:
    """One file a build or an inspection reads."""

    path: str
    format: str
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "bytes": self.bytes}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class WeightFiles:
    """The weight files of a checkpoint: format, files in load order, and the index if sharded."""

    format: str
    files: list[str]
    index: str | None = None

    def file_infos(self) -> list[FileInfo]:
        out = [FileInfo(self.index, FORMAT_JSON, _size(self.index))] if self.index else []
        return out + [FileInfo(f, self.format, _size(f)) for f in self.files]


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _format_of(path: str) -> str:
    if path.endswith(".safetensors"):
        return FORMAT_SAFETENSORS
    if path.endswith((".bin", ".pt", ".pth")):
        return FORMAT_PICKLE
    raise CheckpointError(f"{path!r} is not a checkpoint file (expected .safetensors, .bin, .pt, .pth or an index .json)")


def _from_index(index: str) -> WeightFiles:
    try:
        with open(index, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint index {index!r}: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"checkpoint index {index!r} has no weight_map")
    folder = os.path.dirname(index)
    files = [os.path.join(folder, f) for f in dict.fromkeys(weight_map.values())]
    return WeightFiles(_format_of(files[0]), files, index)


def find_weights(path: str | os.PathLike[str]) -> WeightFiles:
    """The weight files at ``path`` (a directory, a weights file or an index), in transformers' order of preference.

    safetensors first, sharded or not; then ``pytorch_model.bin``; then a PEFT adapter.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".json"):
            return _from_index(path)
        return WeightFiles(_format_of(path), [path])
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    for name in (SAFE_INDEX, SAFE_WEIGHTS, BIN_INDEX, BIN_WEIGHTS, ADAPTER_WEIGHTS, ADAPTER_BIN):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return find_weights(candidate)
    found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    if len(found) == 1:
        return find_weights(os.path.join(path, found[0]))
    hint = f"; it holds {found}" if found else ""
    raise CheckpointError(
        f"no weights in {path!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}{hint}"
    )


def _safetensors_tensors(path: str) -> list[TensorInfo]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as fh:
            out = []
            for key in fh.keys():
                piece = fh.get_slice(key)
                dtype = piece.get_dtype()
                out.append(TensorInfo(key, tuple(piece.get_shape()), DTYPE_NAMES.get(dtype, dtype.lower()), path))
            return out
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {path!r}: {exc}") from exc


def _pickle_tensors(path: str) -> list[TensorInfo]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path!r}: it is not a plain tensor file (torch.load weights_only=True: {exc})"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path!r} with torch.load: {exc}") from exc
    if isinstance(state, Mapping) and "module" in state and isinstance(state["module"], Mapping):
        state = state["module"]  # a DeepSpeed engine checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    out = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out.append(TensorInfo(str(key), tuple(value.shape), str(value.dtype).removeprefix("torch."), path))
    return out


def read_tensors(files: WeightFiles, progress: Any = None) -> list[TensorInfo]:
    """Name, shape, dtype and file of every tensor, from headers only (``.bin`` needs torch).

    ``progress`` wraps the file list (e.g. ``tqdm``) for sharded checkpoints.
    """
    paths: Iterable[str] = progress(files.files) if progress is not None else files.files
    out: list[TensorInfo] = []
    for path in paths:
        out.extend(_safetensors_tensors(path) if path.endswith(".safetensors") else _pickle_tensors(path))
    return out


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent; a malformed one is a :class:`CheckpointError`."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object")
    return data


def checkpoint_to_model_keys(model: Any, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """checkpoint key -> the key of ``model`` it loads into, renamed as ``from_pretrained`` renames.

    transformers 5 renames legacy keys (GPT-NeoX's ``embed_out`` -> ``lm_head``) and adds or
    strips the base-model prefix. This asks its own rules (``model`` may be on the meta
    device), so a dry run predicts the same missing keys as the load.
    """
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: only the base-model prefix rule
        def rename(key: str) -> str:
            candidates = (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if prefix else (key,)
            return next((c for c in candidates if c in state), key)
    else:
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]

        def rename(key: str) -> str:
            new, _ = rename_source_key(key, renamings, converters, prefix, state)
            if new not in state and key in state:  # as transformers does: keep a key that already fits
                new, _ = rename_source_key(key, [], [], prefix, state)
            return new

    return {key: rename(key) for key in checkpoint_keys}


@dataclass(frozen=True)
class Layout:
    """Whose checkpoint layout a set of keys follows, and why hfbuilder thinks so."""

    name: str
    evidence: str


def guess_layout(keys: Iterable[str], config: Mapping[str, Any] | None = None) -> Layout:
    """DeepSpeed-Chat, OpenRLHF, TRL, PEFT or plain Hugging Face, from key names (and config.json)."""
    keys = list(keys)
    keyset = set(keys)
    config = config or {}
    if any(k.startswith("rwtransformer.") for k in keys):
        head = "with v_head.weight" if "v_head.weight" in keyset else "WITHOUT v_head.weight (a head left random?)"
        return Layout("DeepSpeed-Chat reward/critic model", f"keys under rwtransformer. {head}")
    if any(k.startswith("v_head.summary.") for k in keys):
        return Layout("TRL model with value head", "v_head.summary.* keys (AutoModelForCausalLMWithValueHead)")
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return Layout("PEFT LoRA adapter", "lora_A/lora_B keys")
    prefix = config.get("value_head_prefix")
    if prefix and any(k.startswith(f"{prefix}.") for k in keys):
        return Layout("OpenRLHF reward/critic model", f"config value_head_prefix={prefix!r} and {prefix}.* keys")
    if "value_head.weight" in keyset:
        return Layout("OpenRLHF critic model", "value_head.weight (OpenRLHF's critic head)")
    if "score.weight" in keyset:
        archs = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return Layout("Hugging Face sequence classification", f"score.weight; architectures {archs}")
        return Layout("OpenRLHF reward model (or HF *ForSequenceClassification)", "score.weight head on a base model")
    if "v_head.weight" in keyset:
        return Layout("reward model with a v_head (DeepSpeed-Chat-style head, no rwtransformer prefix)", "v_head.weight")
    archs = config.get("architectures")
    if archs:
        return Layout("Hugging Face transformers", f"config.json architectures {archs}")
    if any(k.endswith((".weight", ".bias")) for k in keys):
        return Layout("Hugging Face transformers (probably)", "module-style keys, no config.json beside them")
    return Layout("unknown", "no key pattern hfbuilder knows")


__all__ = [
    "DTYPE_BYTES",
    "FileInfo",
    "Layout",
    "TensorInfo",
    "WeightFiles",
    "checkpoint_to_model_keys",
    "find_weights",
    "guess_layout",
    "read_json",
    "read_tensors",
]
