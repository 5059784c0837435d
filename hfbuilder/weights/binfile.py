"""``.bin`` state dicts through torch's restricted unpickler: tensors only, no code.

Only the zip format ``torch.save`` has written since torch 1.6 is read: it is opened
memory-mapped, so reading its "headers" (keys, shapes, dtypes) reads the pickle and not
the tensor data. The legacy (non-zip) format cannot be memory-mapped: reading any of it
means reading all of it, so it is refused with a way out instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import zipfile
from collections.abc import Iterator
from typing import Any

from ..errors import CheckpointError

#: What torch's restricted unpickler names when it refuses (torch 2.x wording).
_REFUSED = (re.compile(r"Unsupported global: GLOBAL (\S+)"), re.compile(r"WeightsUnpickler error: ([^\n.]+)"))


def refused_global(message: str) -> str:
    """The global (``module.name``) or operation torch's unpickler refused, without torch's advice."""
    for pattern in _REFUSED:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return "an object that is not a tensor"


_SHARED: contextvars.ContextVar[dict[tuple[Any, ...], dict[str, Any]] | None] = contextvars.ContextVar(
    "hfbuilder_shared_bin_reads", default=None)


@contextlib.contextmanager
def shared_reads() -> Iterator[None]:
    """Within the block, a ``.bin`` file is unpickled once, whoever opens it.

    One build opens a checkpoint several times (a stage's check, layout detection, the load
    itself), and unpickling a pickle of hundreds of tensors costs tens of milliseconds each
    time. The tensors are shared only inside the block: a later build gets its own, so two
    models never share a parameter's storage.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def load_bin(file: str) -> dict[str, Any]:
    """A zip ``.bin`` state dict through ``torch.load(weights_only=True, mmap=True)``.

    Anything but tensors and plain containers is refused by torch's restricted unpickler
    before it runs; the error names the global it refused. torch's own message suggests
    ``weights_only=False``, which would run the payload: it is not passed on. Inside
    :func:`shared_reads`, a file already read (same path, size and modification time) is not
    read again.
    """
    shared = _SHARED.get()
    if shared is None:
        return _load_bin(file)
    st = os.stat(file)
    key = (os.path.realpath(file), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in shared:
        shared[key] = _load_bin(file)
    return dict(shared[key])  # callers may change their dict, not the shared one


def _load_bin(file: str) -> dict[str, Any]:
    import pickle

    import torch

    if not zipfile.is_zipfile(file):
        raise CheckpointError(
            f"refused to read {file!r}: it is not in torch's zip format (a legacy torch.save file, or not a "
            "checkpoint at all). A legacy file cannot be read without reading all of it; convert it with "
            "code you trust (torch.save(torch.load(f), f) re-saves it zipped) or, better, to safetensors."
        )
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        reason = refused_global(str(exc))
        raise CheckpointError(
            f"refused to load {file!r}: it holds pickled objects other than tensors, and hfbuilder never "
            f"executes pickled code (the restricted unpickler refused {reason}). Convert it with code you "
            "trust to safetensors."
        ) from None  # torch's message advises weights_only=False, which would run the payload
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
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


__all__ = ["load_bin", "refused_global", "shared_reads"]
