"""Partitioning: every parameter partitioned, in one dtype, and models built partitioned without wasted work.

transformers builds resized embeddings outside ``zero.Init`` on purpose, and heads are
plain modules. :func:`partition_unpartitioned` partitions whatever a stage left
unpartitioned, broadcasting rank 0's values first so the ranks agree, and casting to
the DeepSpeed config's dtype (DeepSpeed's ``defragment`` asserts when partitions differ).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvariantError
from .dist import ds_dtype_name

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

_MAX_LISTED = 20


def listed(names: list[str]) -> str:
    """At most a screenful of names, for messages: ``[a, b, ...] (n)``."""
    shown = ", ".join(names[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(names) > _MAX_LISTED else ''}] ({len(names)})"


def is_partitioned(param: Any) -> bool:
    """True for a parameter that ``deepspeed.zero.Init`` has taken over."""
    return hasattr(param, "ds_id")


def unpartitioned_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters DeepSpeed does not manage, in ``named_parameters`` order (the same on every rank)."""
    return [(n, p) for n, p in model.named_parameters() if not is_partitioned(p)]


def partition_unpartitioned(model: nn.Module, ds_config: Mapping[str, Any]) -> list[str]:
    """Partition every parameter of ``model`` that is not yet partitioned; return their names.

    Each is first cast to the config's dtype, then handed to ``zero.Init(module=...)``,
    which broadcasts rank 0's values before it partitions, so a head initialized
    differently on each rank ends up with rank 0's weights everywhere. Every rank must call
    this at the same point of the build (collective).
    """
    import deepspeed
    import torch

    todo = unpartitioned_parameters(model)
    if not todo:
        return []
    meta = [n for n, p in todo if p.is_meta]
    if meta:
        raise InvariantError(
            f"cannot partition parameters that are still on the meta device (no values yet): {listed(meta)}"
        )
    dtype = getattr(torch, ds_dtype_name(ds_config))
    holder = torch.nn.Module()
    with torch.no_grad():
        for i, (_, p) in enumerate(todo):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
            holder.register_parameter(f"p{i}", p)  # the same Parameter objects: the model sees the change
    deepspeed.zero.Init(module=holder, config_dict_or_path=dict(ds_config))
    return [n for n, _ in todo]


def wrong_dtype_parameters(model: nn.Module, ds_config: Mapping[str, Any]) -> list[str]:
    """Names of floating-point parameters whose dtype is not the config's."""
    import torch

    dtype = getattr(torch, ds_dtype_name(ds_config))
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]


def check_one_dtype(model: nn.Module, ds_config: Mapping[str, Any], after: str) -> None:
    """Raise unless every floating parameter has the config's dtype (``deepspeed.initialize`` asserts it)."""
    wrong = wrong_dtype_parameters(model, ds_config)
    if wrong:
        raise InvariantError(
            f"under ZeRO-3 every parameter must be {ds_dtype_name(ds_config)} (the DeepSpeed config's dtype; "
            f"deepspeed.initialize asserts otherwise), but after stage {after!r} these are not: {listed(wrong)}"
        )


@functools.cache
def init_without_broadcast() -> type:
    """``deepspeed.zero.Init`` minus the broadcast of each new parameter from rank 0.

    ``zero.Init`` broadcasts every parameter before partitioning it so that the ranks
    agree on its initial values. For a tensor that is about to be overwritten from a
    checkpoint those values are uninitialized memory: broadcasting them costs a full
    model's worth of communication and touches every page of every full tensor. Falls
    back to plain ``zero.Init`` if DeepSpeed's internals have changed.
    """
    import deepspeed

    base = deepspeed.zero.Init
    if not all(hasattr(base, a) for a in ("_zero_init_param", "_convert_to_deepspeed_param")):
        return base

    class InitWithoutBroadcast(base):  # type: ignore[misc, valid-type]
        def _zero_init_param(self, param: Any) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


@contextlib.contextmanager
def _construction_for_fill() -> Iterator[None]:
    """While transformers builds a model whose every weight a checkpoint will fill:
    no ``initialize_weights_zero3`` (it gathers each module to init it on rank 0) and no
    broadcast of uninitialized memory."""
    import deepspeed
    from transformers.integrations import deepspeed as hf_ds

    saved_init = deepspeed.zero.Init
    saved_weights = getattr(hf_ds, "initialize_weights_zero3", None)
    deepspeed.zero.Init = init_without_broadcast()  # transformers looks it up at call time
    if saved_weights is not None:
        hf_ds.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        deepspeed.zero.Init = saved_init
        if saved_weights is not None:
            hf_ds.initialize_weights_zero3 = saved_weights


def build_partitioned(model_class: Any, config: Any, dtype: Any) -> nn.Module:
    """``model_class.from_config`` under the active ``HfDeepSpeedConfig``: partitioned, values undefined.

    Only for a model that a checkpoint fills completely right after.
    """
    kwargs = {} if dtype is None or dtype == "auto" else {"dtype": dtype}
    with _construction_for_fill():
        return model_class.from_config(config, **kwargs)


def empty_partitioned(shape: tuple[int, ...], like: Any, ds_config: Mapping[str, Any]) -> Any:
    """A new partitioned parameter of ``shape``, ``like``'s dtype and ``requires_grad``; values undefined.

    The full tensor is allocated but never written, so its pages are never made resident.
    """
    import torch

    holder = torch.nn.Module()
    holder.p = torch.nn.Parameter(torch.empty(shape, dtype=like.dtype), requires_grad=like.requires_grad)
    init_without_broadcast()(module=holder, config_dict_or_path=dict(ds_config))
    return holder.p


__all__ = [
    "build_partitioned",
    "check_one_dtype",
    "empty_partitioned",
    "init_without_broadcast",
    "is_partitioned",
    "listed",
    "partition_unpartitioned",
    "unpartitioned_parameters",
    "wrong_dtype_parameters",
]
