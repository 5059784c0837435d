"""Read model checkpoints without executing pickled code.

One small reader for every place that needs weights from disk: the checkpoint
stage, ZeRO-3 partition loading (each rank reads only its slices), and tools that
inspect a checkpoint. It knows the four layouts ``save_pretrained`` and
DeepSpeed-Chat write, and prefers safetensors:

1. ``model.safetensors``
2. ``model.safetensors.index.json`` (sharded)
3. ``pytorch_model.bin`` (DeepSpeed-Chat's ``save_hf_format``)
4. ``pytorch_model.bin.index.json`` (sharded)

safetensors files are memory-mapped: ``get_tensor`` returns a tensor backed by
the file's pages (copy-on-write), so nothing is read until it is used. ``.bin``
files go through ``torch.load(weights_only=True, mmap=True)``: a file that holds
anything but tensors and plain containers is refused before any of it runs.

torch and safetensors are imported only when a file is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

#: Looked for in this order in a checkpoint directory.
SEARCH_ORDER: tuple[tuple[str, str], ...] = (
    (SAFE_WEIGHTS_NAME, "safetensors"),
    (SAFE_WEIGHTS_INDEX_NAME, "safetensors"),
    (WEIGHTS_NAME, "bin"),
    (WEIGHTS_INDEX_NAME, "bin"),
)

#: safetensors dtype codes -> torch dtype names.
_SAFE_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor, read without reading the tensor."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "float16", "bfloat16", ...
    file: str


def find_checkpoint(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(format, file)`` for a checkpoint directory or file; ``format`` is "safetensors" or "bin".

    ``file`` is the weights file or the index of a sharded checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name, fmt in SEARCH_ORDER:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return fmt, candidate
        raise CheckpointError(
            f"no weights in checkpoint directory {path!r}: looked for {', '.join(n for n, _ in SEARCH_ORDER)}"
        )
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            return "safetensors", path
        if name.endswith((".bin", ".pt", ".pth")) or name.endswith(".bin.index.json"):
            return "bin", path
        raise CheckpointError(
            f"cannot tell the format of checkpoint file {path!r}: expected *.safetensors, *.bin, *.pt, *.pth "
            "or a *.safetensors.index.json / *.bin.index.json index"
        )
    raise CheckpointError(
        f"checkpoint path {path!r} is neither a file nor a directory (hfbuilder does not download checkpoints; "
        "fetch it first, e.g. with huggingface_hub.snapshot_download)"
    )


class _TensorSlice:
    """A ``.bin`` tensor behind the same small interface as safetensors' ``PySafeSlice``."""

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self._tensor.shape)

    def get_dtype(self) -> str:
        return str(self._tensor.dtype).removeprefix("torch.")

    def __getitem__(self, index: Any) -> Any:
        return self._tensor[index]


class CheckpointReader:
    """Keys, shapes and dtypes of a checkpoint, and its tensors one at a time.

    Use as a context manager, or call :meth:`close`. Tensors already returned stay
    valid after closing (they hold their own reference to the mapped file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.format, self.file = find_checkpoint(self.path)
        self._handles: dict[tuple[str, str], Any] = {}  # (shard, device) -> safe_open handle or .bin dict
        self._weight_map: dict[str, str] = self._read_weight_map()

    # -- discovery ------------------------------------------------------------------

    def _read_weight_map(self) -> dict[str, str]:
        if self.file.endswith(".index.json"):
            try:
                with open(self.file, encoding="utf-8") as fh:
                    index = json.load(fh)
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read checkpoint index {self.file!r}: {exc}") from exc
            base = os.path.dirname(self.file)
            out = {str(k): os.path.join(base, str(v)) for k, v in weight_map.items()}
            for shard in sorted(set(out.values())):
                if not os.path.isfile(shard):
                    raise CheckpointError(f"checkpoint index {self.file!r} names shard {shard!r}, which does not exist")
            return out
        if self.format == "safetensors":
            return {key: self.file for key in self._open(self.file).keys()}
        return {key: self.file for key in self._open(self.file)}

    @property
    def files(self) -> list[str]:
        """The weight files (shards) this checkpoint reads from."""
        return sorted(set(self._weight_map.values()))

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of ``key`` without reading its data."""
        file = self._file_of(key)
        if self.format == "safetensors":
            sl = self._open(file).get_slice(key)
            code = sl.get_dtype()
            return TensorInfo(tuple(sl.get_shape()), _SAFE_DTYPES.get(code, code.lower()), file)
        tensor = self._open(file)[key]
        return TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), file)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (``{"format": "pt"}``...); empty for .bin files."""
        if self.format != "safetensors" or not self._weight_map:
            return {}
        return dict(self._open(self.files[0]).metadata() or {})

    # -- reading --------------------------------------------------------------------

    def get_tensor(self, key: str, device: Any = None) -> Any:
        """The tensor ``key``, memory-mapped on the CPU, or read straight onto ``device``."""
        file = self._file_of(key)
        if self.format == "safetensors":
            if device is not None and str(device) != "cpu":
                return self._open(file, str(device)).get_tensor(key)  # read straight onto the device
            return self._open(file).get_tensor(key)
        tensor = self._open(file)[key]
        return tensor if device is None else tensor.to(device)

    def get_slice(self, key: str) -> Any:
        """A lazy view of ``key``: ``get_shape()``, ``get_dtype()`` and ``[...]`` read only the slice."""
        file = self._file_of(key)
        if self.format == "safetensors":
            return self._open(file).get_slice(key)
        return _TensorSlice(self._open(file)[key])

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CheckpointReader {self.format} {self.file!r}: {len(self)} tensors in {len(self.files)} file(s)>"

    # -- internals ------------------------------------------------------------------

    def _file_of(self, key: str) -> str:
        try:
            return self._weight_map[key]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.file!r} has no tensor {key!r}") from None

    def _open(self, file: str, device: str = "cpu") -> Any:
        handle = self._handles.get((file, device))
        if handle is None:
            handle = _open_safetensors(file, device) if self.format == "safetensors" else load_bin(file)
            self._handles[(file, device)] = handle
        return handle


def _open_safetensors(file: str, device: str = "cpu") -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read safetensors file {file!r}: {exc}") from exc


def load_bin(file: str) -> dict[str, Any]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``, memory-mapped when the file allows.

    Anything but tensors and plain containers is refused by torch's restricted
    unpickler before it runs; the error says so.
    """
    import pickle
    import re

    import torch

    try:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: (GLOBAL \S+)", text) or re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        reason = found.group(1) if found else type(exc).__name__
        raise CheckpointError(
            f"refused to load {file!r}: it holds pickled objects other than tensors, and hfbuilder never "
            f"executes pickled code (torch.load(weights_only=True) refused {reason}). Convert it with "
            "code you trust to safetensors."
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {file!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        kind = type(data).__name__
        sample = list(data)[:5] if isinstance(data, dict) else None
        raise CheckpointError(
            f"checkpoint {file!r} is not a flat state dict of tensors (got a {kind}"
            + (f" with keys {sample}" if sample is not None else "")
            + "); save model.state_dict() itself"
        )
    return data


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint directory or file for reading. Raises :class:`CheckpointError`."""
    return CheckpointReader(path)


__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointReader",
    "TensorInfo",
    "find_checkpoint",
    "load_bin",
    "open_checkpoint",
]
