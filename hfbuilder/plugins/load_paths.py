"""How the load stage reads a plain build's weights by assignment, and the checkpoint read it starts early.

:func:`by_assignment` says when a plain build is the architecture on the meta device assigned the
checkpoint's tensors instead of ``from_pretrained``; :func:`assign_pretrained` does it through
:mod:`hfbuilder.pretrained` and writes the stage's notes, facts and provenance.
"""

from __future__ import annotations

import os
from typing import Any

from ..context import PROVENANCE_INITIALIZED, PROVENANCE_PRETRAINED, BuildContext
from ..errors import CheckpointError
from ..loaders import LoaderChoice, Read, ReadFailed, choose_io, choose_loader
from ..pretrained import pretrained_by_assignment
from ..remote_code import remote_code_kwargs
from ..verify import reads_loaded_weights
from ..weights import open_checkpoint


def by_assignment(choice: LoaderChoice, device: str | None) -> bool:
    """Whether a plain build assigns the checkpoint's tensors to the architecture built on the meta
    device, instead of calling from_pretrained: with instanttensor's read, or on the CPU from the
    files' memory map (from_pretrained's own CPU result, without its per-tensor machinery)."""
    if choice.name == "instanttensor":
        return True
    return choice.name == "safetensors" and device in (None, "cpu")


def assign_pretrained(ctx: BuildContext, config: Any, settings: Any, choice: LoaderChoice) -> Any:
    """The pretrained model by assignment (:func:`by_assignment`), or None (with a note saying why)
    where from_pretrained must do it."""
    path, device = ctx.model_name_or_path, settings.device
    try:
        done = pretrained_by_assignment(ctx.model_class, config, path, device=device, dtype=ctx.dtype, loader=choice.name,
                                        io=settings.io, check_finite=reads_loaded_weights(ctx.settings("verify"), device),
                                        **remote_code_kwargs(ctx.model_class, ctx.settings("config").trust_remote_code))
    except ReadFailed as exc:
        if settings.loader != "auto":
            raise
        ctx.warn(f"{exc}; from_pretrained reads it instead")
        return None
    if isinstance(done, str):
        ctx.note(f"assignment not possible: {done}; from_pretrained reads it")
        return None
    ctx.read_finite.update(done.finite)
    for name in done.loaded:
        ctx.report.provenance[name] = PROVENANCE_PRETRAINED
    for name in done.missing:
        ctx.report.provenance[name] = PROVENANCE_INITIALIZED
    ctx.fact("missing_weights", done.missing)
    if done.missing:
        ctx.warn(f"{path} lacks weights for {done.missing}; they were initialized with the model's _init_weights")
    if done.unexpected:
        ctx.note(f"{len(done.unexpected)} checkpoint tensor(s) the model does not use: {done.unexpected[:5]}")
    ctx.fact("loader", choice.name)
    ctx.fact("load_phases", done.phases)
    if choice.name == "instanttensor":
        copied(ctx, device, lambda: done.bytes, done.read_seconds,
                f"instanttensor, {done.io} I/O ({done.backend}; {done.io_why})")
    first = next(done.model.parameters())
    ctx.note(f"{type(done.model).__name__} built on the meta device and assigned {len(done.loaded)} tensors "
             f"({'read by instanttensor' if choice.name == 'instanttensor' else 'memory-mapped from the files'}): "
             f"dtype {first.dtype}, device {first.device}; initialized by _init_weights: {len(done.initialized)} "
             "(non-persistent buffers, missing weights)")
    return done.model


def start_checkpoint_read(ctx: BuildContext) -> None:
    """Start reading the checkpoint onto the device now, when the checkpoint stage will read it with instanttensor."""
    settings, path = ctx.settings("load"), ctx.settings("checkpoint").path
    if path is None or choose_loader(settings.loader, settings.device).name != "instanttensor":
        return
    reader = open_checkpoint(path)
    ctx.call_on_exit(reader.close)
    if reader.format != "safetensors":
        return
    io, why = choose_io(settings.io, reader.files)
    ctx.weights_read = Read("instanttensor", reader.files, settings.device, io, why=why,
                            check_finite=reads_loaded_weights(ctx.settings("verify"), settings.device))
    ctx.call_on_exit(ctx.weights_read.close)


def weights_bytes(path: str) -> int | None:
    if not os.path.isdir(path):
        return None
    try:
        with open_checkpoint(path) as reader:
            return sum(os.path.getsize(f) for f in reader.files)
    except (CheckpointError, OSError):
        return None


def copied(ctx: BuildContext, device: Any, size: Any, seconds: float, how: str) -> None:
    """The bytes a stage put on the device (``size()``) and how fast; a CPU build maps files, it copies nothing."""
    if device in (None, "cpu", "meta") or seconds <= 0:
        return
    nbytes = size()
    if not nbytes:
        return
    gbps = nbytes / seconds / 1e9
    ctx.fact("load_bytes", nbytes)
    ctx.fact("load_gbps", round(gbps, 2))
    ctx.note(f"read {nbytes / 1e9:.2f} GB onto {device} in {seconds:.3f} s ({gbps:.1f} GB/s) with {how}")
