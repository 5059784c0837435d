"""Probes of this process for the benchmarks: resident and private memory, and bytes read.

Linux only (``/proc``). Nothing here imports torch at module level.

* **Peak RSS**: the kernel's high-water mark (``VmHWM``), which :func:`reset_peak_rss` restarts.
  RSS counts the page cache of every file page the process has mapped, shared or not.
* **Private memory (USS)**: ``Private_Clean + Private_Dirty`` from ``/proc/self/smaps_rollup``,
  the pages no other process maps. Reading it walks the page tables (10-50 ms for a
  process holding torch), so :class:`Sampler` reads it every few hundred milliseconds and
  reads ``RssAnon`` (a counter, microseconds) every tick: the anonymous memory is private
  too, so a spike between two USS samples still shows.
* **Bytes read from a checkpoint**: where they are handed out, because a page cache shared by
  every rank on the host makes the kernel's per-process disk counters say who read a page
  first, not who needed it. :class:`ReadCounter` counts what safetensors returns (``get_tensor``,
  ``get_slice(...)[...]``), for any caller that looks ``safetensors.safe_open`` up when it calls
  it (hfbuilder) or imports it after :meth:`ReadCounter.install` (transformers). Files read
  through a memory map that stays open (``torch.load(mmap=True)`` of a ``.bin``) are measured
  by the pages of the mapping this process has touched (``/proc/self/pagemap``), sampled.
  Plain ``read()`` calls (``torch.load`` without mmap) show in ``rchar`` of ``/proc/self/io``, less
  what the probes themselves read from ``/proc``.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
#: What the probes themselves read from /proc (``rchar`` counts it too): the Sampler takes it back out.
probe_reads = [0]


def _read_proc(path: str, mode: str = "r") -> Any:
    with open(path, mode) as fh:
        data = fh.read()
    probe_reads[0] += len(data)
    return data


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / MIB


def _status_kib(*fields: str) -> dict[str, int]:
    out = {}
    for line in _read_proc("/proc/self/status").splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[name] = int(value.split()[0])
    return out


def peak_rss_mib() -> float:
    """The peak resident set since the process started, or since :func:`reset_peak_rss`."""
    try:
        return _status_kib("VmHWM")["VmHWM"] / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def uss_mib() -> float:
    """Private memory: ``Private_Clean + Private_Dirty`` of ``/proc/self/smaps_rollup``."""
    total = 0
    for line in _read_proc("/proc/self/smaps_rollup").splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def io_counters() -> dict[str, int]:
    """``/proc/self/io``: ``rchar`` (bytes through read()/pread()), ``read_bytes`` (from storage)."""
    return {k: int(v) for k, v in (line.split(":") for line in _read_proc("/proc/self/io").splitlines())}


def mapped_bytes(paths: set[str]) -> int:
    """Bytes of ``paths`` this process has mapped and touched: present pages of their mappings."""
    import numpy as np

    ranges = []
    for line in _read_proc("/proc/self/maps").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in paths:
            start, stop = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, stop))
    present = 0
    if ranges:
        with open("/proc/self/pagemap", "rb") as pm:
            for start, stop in ranges:
                pm.seek(start // PAGE * 8)
                data = pm.read((stop - start) // PAGE * 8)
                probe_reads[0] += len(data)
                present += int(np.count_nonzero(np.frombuffer(data, dtype=np.uint64) >> np.uint64(63)))
    return present * PAGE


class ReadCounter:
    """Counts the bytes safetensors hands out in this process, from :meth:`install` on."""

    def __init__(self) -> None:
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, tensor: Any) -> Any:
        with self._lock:
            self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def install(self) -> ReadCounter:
        """Put a counting ``safe_open`` in ``safetensors`` and ``safetensors.torch``.

        Call it before transformers is imported: transformers binds ``safe_open`` at import.
        """
        import safetensors
        import safetensors.torch

        original, counter = safetensors.safe_open, self

        class _Slice:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getitem__(self, index: Any) -> Any:
                return counter.add(self._inner[index])

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

        class CountingSafeOpen:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._inner = original(*args, **kwargs)

            def __enter__(self) -> CountingSafeOpen:
                self._inner.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return self._inner.__exit__(*exc)

            def get_tensor(self, name: str) -> Any:
                return counter.add(self._inner.get_tensor(name))

            def get_slice(self, name: str) -> _Slice:
                return _Slice(self._inner.get_slice(name))

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

        safetensors.safe_open = CountingSafeOpen
        safetensors.torch.safe_open = CountingSafeOpen
        return self


class Sampler:
    """Peaks of private memory (and of touched ``mapped`` files) while a build runs, in a thread.

    ``start()`` records the starting point and resets the peak-RSS mark; ``stop()`` takes a last
    sample and returns the figures, in MiB above the start (bytes for ``mapped``).
    """

    def __init__(self, mapped: set[str] | None = None, tick: float = 0.05, duty: float = 0.05) -> None:
        self.mapped = set(mapped or ())
        self.tick, self.duty = tick, duty  # USS reads take at most ``duty`` of this thread's time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self.rss0 = current_rss_mib()
        self.uss0 = self.uss_peak = uss_mib()
        self.anon0 = self.anon_peak = _status_kib("RssAnon")["RssAnon"] / 1024
        self.mapped0 = self.mapped_peak = mapped_bytes(self.mapped) if self.mapped else 0
        self.io0, self.probe0 = io_counters(), probe_reads[0]
        self.uss_samples = 1
        self._next_uss = time.monotonic()
        reset_peak_rss()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self, uss: bool = False) -> None:
        self.anon_peak = max(self.anon_peak, _status_kib("RssAnon")["RssAnon"] / 1024)
        if self.mapped:
            self.mapped_peak = max(self.mapped_peak, mapped_bytes(self.mapped))
        now = time.monotonic()
        if uss or now >= self._next_uss:
            began = time.perf_counter()
            self.uss_peak = max(self.uss_peak, uss_mib())
            self.uss_samples += 1
            self._next_uss = now + max(0.25, (time.perf_counter() - began) / self.duty)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(uss=True)
        uss_end = uss_mib()
        io, probed = io_counters(), probe_reads[0] - self.probe0
        return {
            "rss_start_mib": self.rss0,
            "rss_peak_above_start_mib": peak_rss_mib() - self.rss0,
            "uss_start_mib": self.uss0,
            "uss_end_above_start_mib": uss_end - self.uss0,
            "uss_peak_above_start_mib": self.uss_peak - self.uss0,
            "anon_peak_above_start_mib": self.anon_peak - self.anon0,
            # The goal's figure: USS, sampled, or the anonymous part where it peaked between samples.
            "private_peak_above_start_mib": max(self.uss_peak - self.uss0, self.anon_peak - self.anon0),
            "uss_samples": self.uss_samples,
            "rchar": io["rchar"] - self.io0["rchar"] - probed,  # read()/pread() of the build, not of the probes
            "storage_read_bytes": io["read_bytes"] - self.io0["read_bytes"],
            "mapped_peak_bytes": max(0, self.mapped_peak - self.mapped0),
        }


__all__ = [
    "MIB", "ReadCounter", "Sampler", "current_rss_mib", "io_counters", "mapped_bytes", "peak_rss_mib",
    "reset_peak_rss", "uss_mib",
]  # fmt: skip
