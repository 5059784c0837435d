"""Which files a checkpoint's weights live in: one file, or the shards an index names."""

from __future__ import annotations

import json
import os

from ..errors import CheckpointError


def read_index(index: str) -> dict[str, str]:
    """An index's ``weight_map``: tensor name -> shard file name, as written."""
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read checkpoint index {index!r}: {exc}") from exc
    return {str(k): str(v) for k, v in weight_map.items()}


def shard_map(file: str) -> dict[str, list[str] | None]:
    """shard path -> the tensor names the index lists in it (None for a single weights file)."""
    if not file.endswith(".index.json"):
        return {file: None}
    base = os.path.dirname(file)
    shards: dict[str, list[str] | None] = {}
    for key, name in read_index(file).items():
        listed = shards.setdefault(os.path.join(base, name), [])
        assert listed is not None
        listed.append(key)
    for shard in shards:
        if not os.path.isfile(shard):
            raise CheckpointError(f"checkpoint index {file!r} names shard {shard!r}, which does not exist")
    return dict(sorted(shards.items()))


__all__ = ["read_index", "shard_map"]
