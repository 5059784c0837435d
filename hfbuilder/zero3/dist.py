"""Distributed set-up for ZeRO-3: check it cheaply before any work, start it when needed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import DistributedSetupError

#: What ``deepspeed``/``torchrun`` set for every process; ``deepspeed.init_distributed`` reads them.
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def ds_dtype_name(ds_config: Mapping[str, Any]) -> str:
    """The parameter dtype a DeepSpeed config trains in: ``bfloat16``, ``float16`` or ``float32``.

    ``zero.Init`` creates every partition in this dtype, so everything partitioned later
    must have it too.
    """
    for key, dtype in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16")):
        section = ds_config.get(key)
        if isinstance(section, Mapping) and section.get("enabled") in (True, "auto"):
            return dtype
    return "float32"


def check_distributed() -> None:
    """Raise :class:`DistributedSetupError` unless :func:`ensure_distributed` can succeed.

    Cheap and side-effect free, so the ``zero`` stage can call it from ``check()``, before
    any stage reads a weight. DeepSpeed itself would try MPI discovery and fail with a
    traceback about ``mpi4py``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedSetupError("ZeRO-3 needs torch.distributed, which this torch build does not have")
    if dist.is_initialized():
        if "LOCAL_RANK" not in os.environ:
            raise DistributedSetupError(
                "torch.distributed is initialized but LOCAL_RANK is not set; deepspeed.zero.Init reads it "
                "to pick this process's device. Set LOCAL_RANK (the rank on this node), as the deepspeed "
                "launcher and torchrun do."
            )
        return
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            "ZeRO-3 needs torch.distributed, which is not initialized, and the environment lacks "
            f"{', '.join(missing)}. Launch with `deepspeed train.py` or `torchrun --nproc_per_node=N train.py`, "
            "call deepspeed.init_distributed() before building, or set MASTER_ADDR, MASTER_PORT, RANK, "
            "WORLD_SIZE and LOCAL_RANK yourself (127.0.0.1, 29500, 0, 1, 0 for a single process)."
        )


def ensure_distributed() -> None:
    """Initialize ``deepspeed.comm`` (and torch.distributed) unless the caller already has.

    If the caller initialized torch.distributed directly, DeepSpeed wraps that process
    group instead of making another.
    """
    check_distributed()
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized() and ds_dist.is_initialized():
        return
    # The CPU accelerator names "ccl" only when oneCCL is installed; gloo otherwise.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def group_rank(param: Any) -> int:
    """This process's rank in ``param``'s partition group (``modifier_rank`` counts in it)."""
    import deepspeed.comm as ds_dist

    return ds_dist.get_rank(group=param.ds_process_group)



def group_src(param: Any) -> int:
    """The global rank of rank 0 in ``param``'s partition group."""
    import deepspeed.comm as ds_dist

    group = param.ds_process_group
    return 0 if group == ds_dist.get_world_group() else ds_dist.get_global_rank(group, 0)


__all__ = ["LAUNCHER_VARS", "check_distributed", "ds_dtype_name", "ensure_distributed", "group_rank", "group_src"]
