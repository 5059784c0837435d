"""Which files a checkpoint's weights live in, and the rules a shard index must follow.

An index (``model.safetensors.index.json``) is data from whoever made the checkpoint, so
it is read as untrusted input:

* every shard it names resolves inside the checkpoint directory: no absolute paths, no
  ``..``, no symlink that leads out (except into the ``blobs`` folder of a Hugging Face
  cache, whose snapshots are symlinks by design);
* it lists each tensor once, and each shard holds exactly the tensors the index lists
  in it: a tensor in two shards, a tensor the index does not list, and a listed tensor
  its shard lacks are all refused, because loaders disagree on which copy wins.

Every refusal is a :class:`~hfbuilder.CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import CheckpointError


def _no_duplicates(index: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"checkpoint index {index!r} lists {key!r} twice")
            seen[key] = value
        return seen

    return hook


def read_index(index: str) -> dict[str, str]:
    """An index's ``weight_map``: tensor name -> shard file name, as written. Malformed: CheckpointError."""
    try:
        with open(index, encoding="utf-8") as fh:
            data = json.load(fh, object_pairs_hook=_no_duplicates(index))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint index {index!r}: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"checkpoint index {index!r} has no \"weight_map\" object")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint index {index!r} maps tensor {bad!r} to {weight_map[bad]!r}, not a file name")
    return dict(weight_map)


def _allowed_roots(base: str) -> list[str]:
    """Where the shards of a checkpoint in ``base`` may really live."""
    roots = [os.path.realpath(base)]
    parent = os.path.dirname(os.path.abspath(base))
    if os.path.basename(parent) == "snapshots":  # <cache>/models--org--name/snapshots/<revision>
        roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), "blobs")))
    return roots


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_shard(index: str, key: str, name: str) -> str:
    """The path of shard ``name`` that the index lists for ``key``, or a CheckpointError if it leaves the directory."""
    base = os.path.dirname(os.path.abspath(index))
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts or name.startswith(("/", "\\")):
        raise CheckpointError(
            f"checkpoint index {index!r} names shard {name!r} for tensor {key!r}: shard paths must stay inside "
            f"the checkpoint directory {base!r}; refusing to read it"
        )
    path = os.path.join(base, name)
    real = os.path.realpath(path)
    if not any(_within(real, root) for root in _allowed_roots(base)):
        raise CheckpointError(
            f"checkpoint index {index!r} names shard {name!r} for tensor {key!r}, which is a link to {real!r} "
            f"outside the checkpoint directory {base!r}; refusing to read it"
        )
    return path


def shard_map(file: str) -> dict[str, list[str] | None]:
    """shard path -> the tensor names the index lists in it (None for a single weights file)."""
    if not file.endswith(".index.json"):
        return {file: None}
    shards: dict[str, list[str]] = {}
    resolved: dict[str, str] = {}  # a few shards serve thousands of keys: resolve each name once
    for key, name in read_index(file).items():
        path = resolved.get(name)
        if path is None:
            path = resolved[name] = resolve_shard(file, key, name)
        shards.setdefault(path, []).append(key)
    for shard, keys in shards.items():
        if not os.path.isfile(shard):
            raise CheckpointError(
                f"checkpoint index {file!r} names shard {os.path.basename(shard)!r}, which does not exist "
                f"(it should hold {keys[0]!r}" + (f" and {len(keys) - 1} more)" if len(keys) > 1 else ")")
            )
    return dict(sorted(shards.items()))


def check_shards(index: str, listed: dict[str, list[str]], found: dict[str, list[str]]) -> None:
    """Refuse shards whose tensors differ from the index: shard -> keys the index lists / the header holds."""
    where: dict[str, str] = {}
    for shard, keys in found.items():
        for key in keys:
            if key in where:
                raise CheckpointError(f"tensor {key!r} is in two shards of {index!r}: "
                                      f"{os.path.basename(where[key])!r} and {os.path.basename(shard)!r}")
            where[key] = shard
    for shard, keys in found.items():
        expected = set(listed[shard])
        stray = next((k for k in keys if k not in expected), None)
        if stray is not None:
            raise CheckpointError(f"shard {shard!r} holds tensor {stray!r}, which the index {index!r} does not "
                                  "list in it")
        absent = sorted(expected - set(keys))
        if absent:
            raise CheckpointError(
                f"checkpoint index {index!r} lists tensor {absent[0]!r} in shard {os.path.basename(shard)!r}, "
                "which does not hold it" + (f" (nor {len(absent) - 1} more)" if len(absent) > 1 else ""))


__all__ = ["check_shards", "read_index", "resolve_shard", "shard_map"]
