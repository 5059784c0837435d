"""Save a built model and its tokenizer so that OUT is always a whole model or absent.

Everything is written into a temporary sibling directory, flushed to disk, and renamed into
place; an existing model directory is renamed aside first and deleted after the swap. A
save that fails or is killed therefore leaves either the old directory untouched or (killed
between the two renames) no directory, with the old one kept aside as ``.OUT.old-*``; never
new files beside old ones, which transformers would load as a hybrid.

:func:`check_out` answers, before the build, whether the save can succeed, so an hour-long
build does not end on a read-only or occupied OUT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .errors import BuilderInputError

#: Files whose presence makes a directory a saved model (which only ``overwrite`` replaces).
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer_config.json",
)


@dataclass
class Saved:
    """What :func:`save_model` wrote: the directory, its files, and whether a model was replaced."""

    path: str
    files: list[str] = field(default_factory=list)
    replaced: bool = False


def _is_model_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in MODEL_FILES) or any(
        name.endswith((".safetensors", ".bin")) for name in os.listdir(path)
    )


def check_out(out: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Raise :class:`BuilderInputError` unless a model can be saved to ``out``; return its absolute path.

    Refused: ``out`` is a file; its directory cannot be written; it holds a model and
    ``overwrite`` is False; it holds files that are not a model (never deleted, even with
    ``overwrite``). Cheap and side-effect free but for a probe directory made and removed.
    """
    path = os.path.realpath(os.fspath(out))  # through a symlink: the model lands where OUT points
    if os.path.lexists(path) and not os.path.isdir(path):
        raise BuilderInputError(f"save directory {out!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not _is_model_dir(path):
            raise BuilderInputError(
                f"save directory {out!r} holds files that are not a saved model; refusing to replace them "
                "(even with --overwrite): choose an empty or new directory"
            )
        if not overwrite:
            raise BuilderInputError(
                f"save directory {out!r} already holds a model; pass --overwrite (overwrite=True) to replace it "
                "whole, or choose another directory"
            )
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):  # the nearest existing ancestor is where directories get made
        if os.path.lexists(parent):
            raise BuilderInputError(f"save directory {out!r} cannot be made: {parent!r} is not a directory")
        parent = os.path.dirname(parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hfbuilder-probe-", dir=parent))
    except OSError as exc:
        # Writing, not os.access: root passes os.access on a read-only file system.
        raise BuilderInputError(f"save directory {out!r} cannot be written: {exc.strerror or exc} in {parent!r}") from exc
    return path


def save_model(model: Any, tokenizer: Any, out: str | os.PathLike[str], *, overwrite: bool = False,
               zero3: bool = False) -> Saved | None:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``out`` atomically; rank 0 writes.

    ``save_pretrained`` when the model has it, else safetensors' ``save_model`` plus the config
    (a wrapped model such as a reward model). Under ZeRO-3 every rank must call this: the
    partitions are gathered on all ranks and rank 0 writes; other ranks return None.
    """
    rank = 0
    gather: Any = contextlib.nullcontext()
    if zero3:
        import deepspeed
        import torch.distributed as dist

        rank = dist.get_rank()
        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        if rank != 0:
            return None
        path = check_out(out, overwrite=overwrite)  # again: the directory may have changed during the build
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            _write(model, tokenizer, tmp)
            files = sorted(os.listdir(tmp))
            replaced = _swap(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Saved(path, files, replaced)


def _write(model: Any, tokenizer: Any, folder: str) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        from safetensors.torch import save_model as save_safetensors

        save_safetensors(model, os.path.join(folder, "model.safetensors"))
        config = getattr(model, "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Flushed before the rename: after a crash the new name must never point at unwritten pages.
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _swap(tmp: str, path: str) -> bool:
    """Rename ``tmp`` to ``path``; a non-empty ``path`` is renamed aside first, then deleted. True if replaced."""
    old = None
    if os.path.isdir(path) and os.listdir(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.rename(path, old)  # onto the empty directory just made, so the name is ours alone
    try:
        os.replace(tmp, path)  # a directory onto an absent or empty one
    except OSError:
        if old is not None and not os.path.lexists(path):
            os.rename(old, path)  # put the old model back rather than leave nothing
        raise
    _fsync_dir(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old)
    return old is not None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["MODEL_FILES", "Saved", "check_out", "save_model"]
