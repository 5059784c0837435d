"""Buffered or direct reads: how much of a checkpoint the page cache holds, asked without reading it.

instanttensor's reads go through the page cache (``buffered``) or around it (``direct``,
O_DIRECT); ``load.io="auto"`` picks by what :func:`cached_fraction` finds.
"""

from __future__ import annotations

import os

IO_MODES = ("auto", "buffered", "direct")
#: ``auto`` reads buffered when at least this share of the sampled pages is in the page cache.
WARM_FRACTION = 0.9


def cached_fraction(files: list[str], samples: int = 64) -> float | None:
    """The share of sampled pages of ``files`` that the page cache holds, or None where unknown.

    Asked with ``mincore`` on a mapping of each file, which reads nothing and starts no
    readahead (a probing ``preadv(RWF_NOWAIT)`` would: it makes the next probe see a warm file).
    """
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):  # not Linux/glibc
        return None
    page = mmap.PAGESIZE
    hits = total = 0
    vec = ctypes.create_string_buffer(1)
    for file in files:
        size = os.path.getsize(file)
        if size == 0:
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                for i in range(samples):
                    offset = size * (2 * i + 1) // (2 * samples) // page * page
                    if libc.mincore(addr + offset, page, vec) != 0:
                        return None
                    hits += vec.raw[0] & 1
                    total += 1
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return hits / total if total else None


def choose_io(requested: str, files: list[str]) -> tuple[str, str]:
    """``("buffered" | "direct", why)`` for instanttensor's reads of ``files``."""
    if requested != "auto":
        return requested, f"load.io={requested!r}"
    share = cached_fraction(files)
    if share is None:
        return "buffered", "page-cache residency unknown on this system"
    if share >= WARM_FRACTION:
        return "buffered", f"{share:.0%} of the files' sampled pages are in the page cache"
    return "direct", f"{share:.0%} of the files' sampled pages are in the page cache: direct I/O reads a cold disk fastest"


__all__ = ["IO_MODES", "WARM_FRACTION", "cached_fraction", "choose_io"]
