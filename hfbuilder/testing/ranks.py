"""Rank processes for real DeepSpeed runs on one host (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os


def end_rank() -> None:
    """Leave a rank process without the interpreter's teardown.

    Its results are written; what is left is DeepSpeed's CPU shared-memory communication op,
    whose threads can abort the C++ static destructors at exit ("terminate called without an
    active exception", exit -6) after every check passed. Close the process group in step on
    every rank, flush, and exit.
    """
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = ["end_rank"]
