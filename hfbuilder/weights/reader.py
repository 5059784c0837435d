"""Read model checkpoints without executing pickled code.

One reader protocol for every place that needs weights from disk: the checkpoint
stage, ZeRO-3 partition loading (each rank reads only its rows), ``explain`` and
``hfbuilder inspect``. :class:`CheckpointReader` knows the four layouts
``save_pretrained`` and DeepSpeed-Chat write, and prefers safetensors:

1. ``model.safetensors``
2. ``model.safetensors.index.json`` (sharded)
3. ``pytorch_model.bin`` (DeepSpeed-Chat's ``save_hf_format``)
4. ``pytorch_model.bin.index.json`` (sharded)

safetensors files are memory-mapped: ``get`` returns a tensor backed by the file's
pages (copy-on-write), so nothing is read until it is used. ``.bin`` files go through
:func:`~hfbuilder.weights.binfile.load_bin`, which refuses anything but tensors.

torch and safetensors are imported only when a file is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import CheckpointError

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
SAFE_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor, read without reading the tensor."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "float16", "bfloat16", ...
    file: str = ""


@runtime_checkable
class Reader(Protocol):
    """What every consumer of checkpoint weights asks of a checkpoint.

    ``get_slice(key)[a:b]`` returns rows ``a:b`` of ``key`` (dim 0) reading only those
    rows, which is what lets each ZeRO-3 rank read just its own partition.
    """

    def keys(self) -> list[str]:
        """The checkpoint's tensor names."""
        ...

    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of ``key``, without reading its data."""
        ...

    def get(self, key: str, device: Any = None) -> Any:
        """The whole tensor ``key``, on ``device`` (None: where it lives, memory-mapped on the CPU)."""
        ...

    def get_slice(self, key: str) -> Any:
        """A lazy view of ``key`` that ``[a:b]`` slices along dim 0."""
        ...


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
    """A tensor in memory behind the same small interface as safetensors' ``PySafeSlice``."""

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self._tensor.shape)

    def get_dtype(self) -> str:
        return str(self._tensor.dtype).removeprefix("torch.")

    def __getitem__(self, index: Any) -> Any:
        return self._tensor[index]


class _FileSlice:
    """A safetensors slice that maps the file for each read and unmaps it after.

    The pages a ZeRO-3 rank reads for its partition then do not stay resident: its RSS
    grows by its partition, not by the file.
    """

    def __init__(self, file: str, key: str, info: TensorInfo) -> None:
        self.file, self.key, self.info = file, key, info

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def get_dtype(self) -> str:
        return self.info.dtype

    def __getitem__(self, index: Any) -> Any:
        with _open_safetensors(self.file) as fh:
            return fh.get_slice(self.key)[index]


class CheckpointReader:
    """A checkpoint directory, weights file or shard index, behind the :class:`Reader` protocol.

    Use as a context manager, or call :meth:`close`. Tensors already returned stay
    valid after closing (they hold their own reference to the mapped file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .shards import check_shards, shard_map

        self.path = os.fspath(path)
        self.format, self.file = find_checkpoint(self.path)
        self._handles: dict[tuple[str, str], Any] = {}  # (shard, device) -> safe_open handle or .bin dict
        self._info: dict[str, TensorInfo] = {}
        self._weight_map: dict[str, str] = {}
        # Every header is read and checked now, before any tensor: an index that names a file
        # outside the directory, a shard that disagrees with the index or a header that
        # disagrees with its data is refused before a caller acts on half of it.
        shards = shard_map(self.file)
        found = {shard: self._read_headers(shard) for shard in shards}
        if self.file.endswith(".index.json"):
            check_shards(self.file, {s: keys or [] for s, keys in shards.items()}, {s: list(h) for s, h in found.items()})
        for shard, headers in found.items():
            for key, info in headers.items():
                self._weight_map[key] = shard
                self._info[key] = info

    def _read_headers(self, file: str) -> dict[str, TensorInfo]:
        if self.format == "safetensors":
            fh = self._open(file)
            out = {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                code = sl.get_dtype()
                out[key] = TensorInfo(tuple(sl.get_shape()), SAFE_DTYPES.get(code, code.lower()), file)
            return out
        return {k: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), file)
                for k, t in self._open(file).items()}

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
        self._file_of(key)
        return self._info[key]

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (``{"format": "pt"}``...); empty for .bin files."""
        if self.format != "safetensors" or not self._weight_map:
            return {}
        return dict(self._open(self.files[0]).metadata() or {})

    def get(self, key: str, device: Any = None) -> Any:
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
            return _FileSlice(file, key, self._info[key])
        return _TensorSlice(self._open(file)[key])

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CheckpointReader {self.format} {self.file!r}: {len(self)} tensors in {len(self.files)} file(s)>"

    def _file_of(self, key: str) -> str:
        try:
            return self._weight_map[key]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.file!r} has no tensor {key!r}") from None

    def _open(self, file: str, device: str = "cpu") -> Any:
        from .binfile import load_bin

        handle = self._handles.get((file, device))
        if handle is None:
            handle = _open_safetensors(file, device) if self.format == "safetensors" else load_bin(file)
            self._handles[(file, device)] = handle
        return handle


def _open_safetensors(file: str, device: str = "cpu") -> Any:
    from safetensors import SafetensorError, safe_open

    from .safeheader import diagnose

    try:
        return safe_open(file, framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        detail = diagnose(file) if isinstance(exc, SafetensorError) else None
        raise CheckpointError(f"cannot read safetensors file {file!r}: {detail or exc}") from exc


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint directory or file for reading. Raises :class:`CheckpointError`."""
    return CheckpointReader(path)


__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointReader",
    "Reader",
    "TensorInfo",
    "find_checkpoint",
    "open_checkpoint",
]
