"""Distributed set-up that fails fast, by name, instead of hanging.

A rank whose peers never come (``WORLD_SIZE=2`` with one process started, a wrong
``MASTER_PORT``) waits in the rendezvous for the process group's timeout: 10 to 30 minutes
of silence. hfbuilder gives the set-up its own short timeout, ``HFBUILDER_DIST_TIMEOUT``
seconds (default 30), and afterwards puts the group's operation timeout back to DeepSpeed's
(``DEEPSPEED_TIMEOUT`` minutes, default 10), so that training collectives, where ranks may
legitimately wait on each other for minutes, keep it.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

from .errors import DistributedSetupError

TIMEOUT_ENV = "HFBUILDER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0


def setup_timeout() -> float:
    """Seconds the set-up may wait for the other ranks: ``$HFBUILDER_DIST_TIMEOUT``, else 30."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise DistributedSetupError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


def init_distributed(backend: str) -> None:
    """``deepspeed.init_distributed`` bounded by :func:`setup_timeout`; a failure is a DistributedSetupError."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.constants import default_pg_timeout

    seconds = setup_timeout()
    ours = not dist.is_initialized()  # a group the caller made keeps the caller's timeout
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=seconds))
    except Exception as exc:  # torch raises DistStoreError, RuntimeError or ValueError, by backend
        env = {v: os.environ.get(v, "unset") for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        raise DistributedSetupError(
            f"torch.distributed set-up failed within {seconds:g} s ({TIMEOUT_ENV}): rank {env['RANK']} of "
            f"WORLD_SIZE {env['WORLD_SIZE']} at {env['MASTER_ADDR']}:{env['MASTER_PORT']}: "
            f"{type(exc).__name__}: {exc}. Start every rank (deepspeed or torchrun launch them all), check "
            f"MASTER_ADDR/MASTER_PORT, or give slow starts more time with {TIMEOUT_ENV}=SECONDS."
        ) from exc
    # The set-up timeout was for the rendezvous only: collectives get DeepSpeed's own again.
    c10d = dist.distributed_c10d
    if not ours or not dist.is_initialized():
        return
    if hasattr(c10d, "_set_pg_timeout"):
        c10d._set_pg_timeout(default_pg_timeout)
    if hasattr(c10d, "_get_default_store"):
        c10d._get_default_store().set_timeout(default_pg_timeout)


__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "init_distributed", "setup_timeout"]
