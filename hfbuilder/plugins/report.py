"""The timing wrapper around every stage: wall time, peak RSS and peak CUDA memory.

It is an ordinary ``wrapper=True`` implementation of ``hfbuilder_run_stage``: write
your own the same way to trace or profile stages.
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
    """``torch.cuda`` if torch is already imported and a GPU is present; never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


@hookimpl(wrapper=True)
def hfbuilder_run_stage(stage: Stage, ctx: BuildContext) -> Generator[None, Any, Any]:
    record = ctx.report.stages[-1] if ctx.report.stages and ctx.report.stages[-1].name == stage.name else None
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    before = current_rss_mib()
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        if record is not None:
            record.seconds = time.perf_counter() - start
            record.peak_rss_mib = peak_rss_mib()
            after = current_rss_mib()
            if before is not None and after is not None:
                record.rss_delta_mib = after - before
            if cuda is not None:
                record.peak_cuda_mib = cuda.max_memory_allocated() / (1024 * 1024)
