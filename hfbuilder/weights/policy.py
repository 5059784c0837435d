"""The checks every path runs on a checkpoint directory before reading a weight.

Opening a :class:`~hfbuilder.weights.reader.CheckpointReader` already enforces the shard
rules (:mod:`.shards`) and refuses headers that disagree with their data; this module
adds what needs the model, for the one path that does not match keys itself: a plain
``from_pretrained`` of a local directory, whose errors would otherwise surface from deep
inside transformers once loading is under way.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import CheckpointError
from .binfile import load_bin
from .match import check_plan, match_keys
from .reader import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, open_checkpoint

#: A directory holding this instead of weights is a PEFT adapter; transformers resolves its base model.
ADAPTER_CONFIG = "adapter_config.json"


def check_pretrained(path: str, model: Any = None) -> None:
    """Refuse a local ``from_pretrained`` directory whose weights cannot load into ``model`` cleanly.

    Reads headers only: a missing or malformed index, a shard outside the directory or
    disagreeing with the index, a header that disagrees with its data, a directory with a
    config and no weights; and, given ``model`` (the architecture, e.g. on the meta device),
    a tensor whose shape or dtype kind differs from the parameter transformers would load it
    into. Missing and unexpected keys are left to transformers, which initializes or ignores
    them and says so. Raises :class:`CheckpointError` naming the file and the key.
    """
    if not any(os.path.isfile(os.path.join(path, n)) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                                                WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            return
    with open_checkpoint(path) as reader:
        if model is None:
            return
        plan = match_keys(model, reader, prefixes=True)
        plan.missing, plan.unexpected = [], []  # from_pretrained's business: it initializes / ignores them
        check_plan(plan, strict=True, source=reader.file, model_name=type(model).__name__)


def _signature(tensors: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


def format_conflict(path: str) -> str | None:
    """A warning when ``path`` holds both safetensors and ``.bin`` weights that disagree, else None.

    Loaders pick safetensors, so the ``.bin`` is never used: a user who updated only one of
    them should hear which one is read. The ``.bin`` is compared through its pickle only
    (memory-mapped, no tensor data); a ``.bin`` that hfbuilder refuses to read is reported
    as not compared.
    """
    if not os.path.isdir(path):
        return None
    safe = next((n for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if os.path.isfile(os.path.join(path, n))), None)
    binary = next((n for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) if os.path.isfile(os.path.join(path, n))), None)
    if safe is None or binary is None:
        return None
    used = f"{path} holds both {safe} and {binary}; {safe} is used and {binary} ignored"
    try:
        with open_checkpoint(os.path.join(path, safe)) as reader:
            ours = {k: (tuple(reader.info(k).shape), reader.info(k).dtype) for k in reader.keys()}
        if binary == WEIGHTS_NAME:
            theirs = {k: (s, d.removeprefix("torch.")) for k, (s, d) in _signature(load_bin(os.path.join(path, binary))).items()}
        else:
            with open_checkpoint(os.path.join(path, binary)) as other:
                theirs = {k: (tuple(other.info(k).shape), other.info(k).dtype) for k in other.keys()}
    except CheckpointError as exc:
        return f"{used} (not compared: {exc})"
    if ours == theirs:
        return None
    only = sorted(set(ours) ^ set(theirs))
    differ = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    what = []
    if only:
        what.append(f"{len(only)} tensor(s) in only one of them, e.g. {only[0]!r}")
    if differ:
        what.append(f"{len(differ)} with another shape or dtype, e.g. {differ[0]!r}")
    return f"{used}; they disagree: {'; '.join(what)}"


__all__ = ["check_pretrained", "format_conflict"]
