"""Load a checkpoint into a model built on the meta device by assignment: nothing initialized, then overwritten.

Each tensor becomes the checkpoint's, memory-mapped from a safetensors file (or a zip
``.bin``) and converted only if its dtype differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from .match import LoadPlan
from .reader import Reader
from .tied import set_tensor


@dataclass(frozen=True)
class Assigned:
    """What :func:`assign_from_checkpoint` did."""

    tensors: int
    bytes: int


def assign_from_checkpoint(model: Any, plan: LoadPlan, reader: Reader, *, device: Any = None,
                           keep_dtype: bool = False, mmap: bool = True, source: str = "the checkpoint") -> Assigned:
    """Make each tensor the checkpoint's (``load_state_dict(assign=True)``), following ``plan``.

    ``device``: read each tensor straight onto it (None: memory-mapped on the CPU).
    ``keep_dtype``: keep floating tensors in the checkpoint's dtype (``dtype="auto"``)
    instead of the dtype the model was built in. ``mmap=False`` copies tensors out of the
    file. Rows in ``plan.partial_rows`` beyond the checkpoint's are left uninitialized
    for the caller. Tied names share one tensor again afterwards; a checkpoint that
    stores tied names with different values is a :class:`CheckpointError`.
    """
    import torch

    current = model.state_dict(keep_vars=True)
    state: dict[str, Any] = {}
    nbytes = 0
    for name, key in plan.sources.items():
        tensor = reader.get(key, device=device)
        loaded = tensor
        like = current[name]
        if tensor.is_floating_point() and not keep_dtype:
            tensor = tensor.to(like.dtype)  # the dtype the model was built in: the options' or the config's
        elif not tensor.is_floating_point() and tensor.dtype != like.dtype:
            tensor = tensor.to(like.dtype)
        if name in plan.partial_rows:
            old, new = plan.partial_rows[name]
            full = torch.empty((new, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            full[:old].copy_(tensor)
            tensor = full  # rows old:new are initialized by the caller (the materialize stage)
        elif tensor is loaded and not mmap:
            tensor = tensor.clone()
        state[name] = tensor
        nbytes += tensor.numel() * tensor.element_size()
    model.load_state_dict(state, strict=False, assign=True)
    # Tied names share one tensor again (assign replaced only the one that was loaded).
    after = model.state_dict(keep_vars=True)
    keys = set(reader.keys())
    for names in plan.tied:
        loaded_names = [n for n in names if n in state]
        if not loaded_names:
            continue
        first, value = loaded_names[0], after[loaded_names[0]]
        for other in names:
            if other == first:
                continue
            other_key = plan.renamed.get(other, other)
            if other_key in keys and not _same_values(reader, other_key, value):
                raise CheckpointError(f"checkpoint {source} holds tied weights {first!r} and {other!r} with "
                                      "different values")
            set_tensor(model, other, value)
    return Assigned(len(state), nbytes)


def init_std(model: Any) -> float:
    """The std transformers' ``_init_weights`` draws new weights with: the config's, else 0.02."""
    config = getattr(model, "config", None)
    return getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02


def fill_new_rows(weight: Any, old: int, new: int, mean_resizing: bool, std: float) -> None:
    """Give rows ``old:new`` of ``weight`` (grown by a resize, absent from the checkpoint) values made
    from the loaded rows ``:old``: their mean (``mean_resizing``), or transformers' normal init."""
    import torch

    with torch.no_grad():
        rows = weight[old:new]
        if mean_resizing:
            rows.copy_(weight[:old].float().mean(0, keepdim=True).to(weight.dtype).expand_as(rows))
        else:
            rows.normal_(0.0, std)


def _same_values(reader: Reader, key: str, value: Any) -> bool:
    import torch

    other = reader.get(key)
    if other.data_ptr() == value.data_ptr():
        return True
    value = value.detach()[: other.shape[0]] if other.dim() else value.detach()  # grown rows are not in the file
    return other.shape == value.shape and torch.equal(other.to(value.dtype), value)


__all__ = ["Assigned", "assign_from_checkpoint", "fill_new_rows", "init_std"]
