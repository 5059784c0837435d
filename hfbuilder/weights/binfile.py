"""``.bin`` state dicts through torch's restricted unpickler: tensors only, no code."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError


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


__all__ = ["load_bin"]
