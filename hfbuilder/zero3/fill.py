"""Fill one partitioned parameter from a reader, each rank reading only the rows that cover its partition.

Partition layout (DeepSpeed 0.19): a partitioned parameter ``p`` keeps its shape in
``p.ds_shape`` and its element count in ``p.ds_numel``; ``p.ds_tensor`` is a flat tensor of
``n = p.ds_tensor.ds_numel`` elements holding elements ``[r * n, (r + 1) * n)`` of the
flattened tensor, where ``r`` is the rank in ``p.ds_process_group``; the last rank's tail is
padding. For a matrix that is a run of whole rows plus a piece of one at each end.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..weights.reader import Reader
from .dist import group_rank

if TYPE_CHECKING:  # pragma: no cover
    import torch


def read_rows(reader: Reader, key: str, start: int, stop: int | None) -> torch.Tensor:
    """Rows ``start:stop`` of ``key`` (to the end when ``stop`` is None); a 0-d tensor as one element."""
    shape = tuple(reader.info(key).shape)
    if not shape:
        return reader.get(key).reshape(1)
    stop = shape[0] if stop is None else stop
    return reader.get_slice(key)[start:stop]


def fill_partition(param: Any, reader: Reader, key: str, rows: int | None = None) -> bool:
    """Copy this rank's share of ``key`` (its first ``rows`` rows) into ``param.ds_tensor``.

    False if the partition is not in memory here (NVMe offload, or gathered right now).
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    part = param.ds_tensor
    if part is None or getattr(part, "final_location", None) is not None or param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return False
    shape = tuple(param.ds_shape)
    row = math.prod(shape[1:]) if shape else 1
    size = part.ds_numel
    start = param.ds_zero_partition_rank * size
    stop = min(start + size, param.ds_numel, param.ds_numel if rows is None else rows * row)
    if start >= stop:
        return True  # this rank holds only padding, or only rows the checkpoint does not have
    first, last = start // row, -(-stop // row)
    values = read_rows(reader, key, first, last if shape else None).reshape(-1)
    part.data[: stop - start].copy_(values[start - first * row : stop - first * row])
    return True


def fill_gathered(param: Any, reader: Reader, key: str, rows: int | None = None) -> None:
    """Gather ``param``, fill it on rank 0 from ``key``, and let DeepSpeed repartition it (collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if group_rank(param) == 0:
            target = param.data if rows is None else param.data[:rows]
            target.copy_(read_rows(reader, key, 0, rows).reshape(target.shape))


def fill(param: Any, reader: Reader, key: str, rows: int | None = None) -> bool:
    """Fill ``param`` from ``key``: its own partition directly, else gathered from rank 0. True if direct."""
    if fill_partition(param, reader, key, rows):
        return True
    fill_gathered(param, reader, key, rows)
    return False


__all__ = ["fill", "fill_gathered", "fill_partition", "read_rows"]
