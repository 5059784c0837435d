"""A checkpoint seen under the value model's names: the key map applied as a reader.

:class:`LayoutReader` renames without copying: every tensor is still read from its own
file, memory-mapped or row by row, so the checkpoint stage's strict key check, its
assignment onto the meta-device model and ZeRO-3's partition filling
(``keys``/``shape``/``get``/``get_slice``) all work unchanged on any layout. Files beside
the main checkpoint (LLaMA-Factory's ``value_head.safetensors``) are read through the
same view.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..errors import CheckpointError
from ..weights import CheckpointReader, TensorInfo, open_checkpoint
from .base import KeyMap


class LayoutReader:
    """The tensors of a checkpoint (and its side files) under ``RewardModel`` names.

    ``unused`` lists the source keys the value model does not use (an LM head); they are
    not among ``keys()``, and :meth:`get_unused` reads them for conversions.
    """

    def __init__(self, path: str | os.PathLike[str], key_map: KeyMap, main: CheckpointReader | None = None) -> None:
        self.key_map = key_map
        self._main = main if main is not None else open_checkpoint(path)
        self._readers = [self._main] + [CheckpointReader(f) for f in key_map.files]
        self.path, self.file, self.format = self._main.path, self._main.file, self._main.format
        self._where: dict[str, tuple[CheckpointReader, str]] = {}
        self._unused: dict[str, tuple[CheckpointReader, str]] = {}
        for reader in self._readers:
            for key in reader.keys():
                name = key_map.to_model(key)
                if name is None:
                    self._unused[key] = (reader, key)
                    continue
                if name in self._where:
                    other = self._where[name][1]
                    raise CheckpointError(f"checkpoint keys {other!r} and {key!r} both map to {name!r}")
                self._where[name] = (reader, key)

    # -- what the checkpoint stage and zero3 read ----------------------------------------

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def source_key(self, name: str) -> str:
        return self._at(name)[1]

    def info(self, name: str) -> TensorInfo:
        reader, key = self._at(name)
        return reader.info(key)

    def get(self, name: str, device: Any = None) -> Any:
        reader, key = self._at(name)
        return reader.get(key, device=device)

    def get_slice(self, name: str) -> Any:
        reader, key = self._at(name)
        return reader.get_slice(key)

    @property
    def files(self) -> list[str]:
        return sorted({f for reader in self._readers for f in reader.files})

    @property
    def unused(self) -> list[str]:
        return list(self._unused)

    def get_unused(self, key: str) -> Any:
        reader, source = self._unused[key]
        return reader.get(source)

    def metadata(self) -> dict[str, str]:
        return self._main.metadata()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> LayoutReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        extra = f" + {', '.join(os.path.basename(f) for f in self.key_map.files)}" if self.key_map.files else ""
        return f"<LayoutReader {self.format} {self.file!r}{extra}: {len(self)} tensors>"

    def _at(self, name: str) -> tuple[CheckpointReader, str]:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.file!r} has no tensor for {name!r}") from None


__all__ = ["LayoutReader"]
