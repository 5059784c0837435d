"""Every tensor of a model once, with all the names that reach it (tied weights share one).

Loading a checkpoint, filling ZeRO-3 partitions and materializing meta tensors all
need the same thing: one entry per distinct tensor, listing every name it has, in an
order that is the same on every rank. accelerate's ``find_tied_parameters`` answers a
narrower question (parameters only, groups in set order, which is hash-randomized per
process), so the order would differ between ZeRO-3 ranks that must make the same
collective calls in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorGroup:
    """One distinct tensor and every name that reaches it, in state-dict order."""

    names: tuple[str, ...]
    tensor: Any
    is_parameter: bool

    @property
    def name(self) -> str:
        """The first name, the one ``state_dict`` order reaches first."""
        return self.names[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The full shape, also of a ZeRO-3 partitioned parameter (whose own shape is ``(0,)``)."""
        return tuple(getattr(self.tensor, "ds_shape", None) or self.tensor.shape)


def tensor_groups(model: Any, *, non_persistent: bool = False) -> list[TensorGroup]:
    """Every distinct tensor of ``model`` in ``state_dict`` order, with all its names.

    Non-persistent buffers (never in a checkpoint) are left out unless ``non_persistent``.
    Modules reached twice contribute each name, as ``state_dict`` does.
    """
    order: list[int] = []
    names: dict[int, list[str]] = {}
    found: dict[int, tuple[Any, bool]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        skip = set() if non_persistent else module._non_persistent_buffers_set
        entries = [(a, t, True) for a, t in module._parameters.items()]
        entries += [(a, t, False) for a, t in module._buffers.items() if a not in skip]
        for attr, tensor, is_param in entries:
            if tensor is None:
                continue
            tid = id(tensor)
            if tid not in names:
                order.append(tid)
                names[tid] = []
                found[tid] = (tensor, is_param)
            names[tid].append(prefix + attr)
    return [TensorGroup(tuple(names[tid]), *found[tid]) for tid in order]


def tied_groups(model: Any) -> list[list[str]]:
    """The names of each tensor that has more than one (tied weights), in state-dict order."""
    return [list(g.names) for g in tensor_groups(model) if len(g.names) > 1]


def set_tensor(model: Any, name: str, value: Any) -> None:
    """Make ``name`` (a parameter or buffer of ``model``) be ``value``, without touching other names."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


__all__ = ["TensorGroup", "set_tensor", "tensor_groups", "tied_groups"]
