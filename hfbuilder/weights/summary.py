"""What a checkpoint holds, without its weights: files, formats, tensor names, shapes and
dtypes, and whose layout they follow.

``explain()`` and ``hfbuilder inspect`` use it; neither reads a weight. Files are opened with
:class:`~hfbuilder.weights.reader.CheckpointReader` (safetensors headers; a ``.bin`` through
``torch.load(weights_only=True, mmap=True)``, which refuses code).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from .reader import CheckpointReader, TensorInfo, find_checkpoint

#: Bytes per element of each torch dtype name, for memory estimates.
DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip

FORMAT_SAFETENSORS = "safetensors"
FORMAT_PICKLE = "pytorch pickle (torch.load, weights_only=True)"
FORMAT_JSON = "json"
_FORMATS = {"safetensors": FORMAT_SAFETENSORS, "bin": FORMAT_PICKLE}


@dataclass(frozen=True)
class FileInfo:
    """One file a build or an inspection reads."""

    path: str
    format: str
    bytes: int | None = None

    @classmethod
    def of(cls, path: str, format: str) -> FileInfo:
        return cls(path, format, os.path.getsize(path) if os.path.isfile(path) else None)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "bytes": self.bytes}


@dataclass
class CheckpointSummary:
    """A checkpoint's format, files (index first) and tensors, read from headers only."""

    format: str
    files: list[FileInfo]
    tensors: dict[str, TensorInfo]

    def numel(self, name: str) -> int:
        return math.prod(self.tensors[name].shape)

    @property
    def values(self) -> int:
        return sum(self.numel(name) for name in self.tensors)


def _single_weights_file(path: str) -> str:
    """A directory without the standard names (a PEFT adapter, a renamed file) but one weights file."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
        if len(found) == 1:
            return os.path.join(path, found[0])
    return path


def summarize(path: str | os.PathLike[str], progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
              ) -> CheckpointSummary:
    """Format, files and every tensor's shape and dtype; ``progress`` wraps the keys (e.g. ``tqdm``)."""
    path = os.fspath(path)
    try:
        find_checkpoint(path)
    except CheckpointError:  # no standard name: a lone weights file is read, anything else refused as it was
        single = _single_weights_file(path)
        if single == path:
            raise
        path = single
    reader = CheckpointReader(path)
    with reader:
        fmt = _FORMATS[reader.format]
        index = [FileInfo.of(reader.file, FORMAT_JSON)] if reader.file.endswith(".json") else []
        keys: Iterable[str] = reader.keys()
        if progress is not None and len(reader.files) > 1:
            keys = progress(keys)
        tensors = {key: reader.info(key) for key in keys}
        return CheckpointSummary(fmt, index + [FileInfo.of(f, fmt) for f in reader.files], tensors)


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
    "FORMAT_JSON",
    "FORMAT_PICKLE",
    "FORMAT_SAFETENSORS",
    "CheckpointSummary",
    "FileInfo",
    "Layout",
    "guess_layout",
    "read_json",
    "summarize",
]
