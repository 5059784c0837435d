"""The timing wrapper around every stage: wall time, peak RSS and peak CUDA memory.

It is an ordinary ``wrapper=True`` implementation of ``hfbuilder_run_stage``: write
your own the same way to trace or profile stages.

- ``seconds``: wall time of the stage; with CUDA in use the wrapper synchronizes the device
  at the end of each stage, so queued copies and kernels count where they were queued.
- ``peak_rss_mib``: the process's RSS high-water mark (``ru_maxrss``) when the stage ends.
  The kernel keeps one mark per process and hfbuilder does not reset it (that would hide
  earlier peaks from anyone else measuring), so a stage set a new peak exactly when its
  value is above the previous stage's. ``rss_delta_mib`` is what the stage left resident.
- ``peak_cuda_mib``: ``torch.cuda.max_memory_allocated`` during the stage, on the build's
  device. Only when CUDA is already initialized or the stage initializes it; the wrapper
  never imports torch or starts CUDA itself.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Generator
from typing import Any

from ..context import BuildContext
from ..hookspecs import hookimpl
from ..stage import Stage


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``ru_maxrss``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _cuda() -> Any:
    """``torch.cuda`` if torch is imported and CUDA initialized; else None.

    It never imports torch and never initializes CUDA: a CPU build on a GPU machine must not
    pay for a CUDA context, and before CUDA is initialized no CUDA memory can be in use.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _cuda_device(ctx: BuildContext) -> str | None:
    """The CUDA device the build fills (``on_device("cuda:1")``), or None for the current one."""
    device = ctx.settings("load").device
    return device if isinstance(device, str) and device.startswith("cuda") else None


@hookimpl(wrapper=True)
def hfbuilder_run_stage(stage: Stage, ctx: BuildContext) -> Generator[None, Any, Any]:
    record = ctx.report.stages[-1] if ctx.report.stages and ctx.report.stages[-1].name == stage.name else None
    device = _cuda_device(ctx)
    cuda = _cuda()
    if cuda is not None:
        # Exact per-stage peaks need torch's peak counter reset (as DeepSpeed's see_memory_usage does):
        # code that reads max_memory_allocated() across a build must take the max of the stage peaks.
        cuda.reset_peak_memory_stats(device)
    before = current_rss_mib()
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        cuda = _cuda()  # a stage may be the one that initialized CUDA: its peak counts from zero
        if cuda is not None and record is not None:
            cuda.synchronize(device)  # charge queued copies and kernels to the stage that queued them
        if record is not None:
            record.seconds = time.perf_counter() - start
            record.peak_rss_mib = peak_rss_mib()
            after = current_rss_mib()
            if before is not None and after is not None:
                record.rss_delta_mib = after - before
            if cuda is not None:
                record.peak_cuda_mib = cuda.max_memory_allocated(device) / (1024 * 1024)
