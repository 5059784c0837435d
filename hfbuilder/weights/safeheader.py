"""Say which tensor of a safetensors file is wrong, from its header alone.

safetensors refuses a file whose header disagrees with its data (a shape that does not
fit its byte range, overlapping ranges, a truncated file), but its message names no
tensor. When it refuses, this reads the header (8 bytes of length, then JSON; no tensor
data) and names the first tensor at fault, so the error says which file and which key.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

#: Bytes per element of each safetensors dtype code (sub-byte float codes are left out: not checked).
ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

#: A header larger than this is refused without being read, as safetensors does.
MAX_HEADER_BYTES = 100 * 1000 * 1000


def read_header(file: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the number of data bytes after it. Raises ValueError."""
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"the file is {size} bytes long, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"the header claims {length} bytes but the file holds {size - 8} after the length")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, size - 8 - length


def diagnose(file: str) -> str | None:
    """The first thing wrong with ``file``'s header, naming the tensor; None if nothing is found."""
    try:
        header, data = read_header(file)
    except (OSError, ValueError) as exc:
        return str(exc)
    ranges = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            return f"tensor {key!r} has a malformed header entry {entry!r}"
        if dtype not in ITEM_BYTES:
            if dtype in ("F4", "F6_E2M3", "F6_E3M2"):
                continue
            return f"tensor {key!r} has an unknown dtype {dtype!r}"
        want = math.prod(shape) * ITEM_BYTES[dtype]
        if stop - start != want:
            return (f"tensor {key!r} is declared {dtype} {list(shape)} ({want} bytes) but its data_offsets "
                    f"[{start}, {stop}] hold {stop - start} bytes")
        ranges.append((start, stop, key))
    at = 0
    for start, stop, key in sorted(ranges):
        if start != at:
            return f"tensor {key!r} starts at byte {start} of the data, where {at} was expected (overlap or gap)"
        at = stop
    if at > data:
        last = max(ranges)[2]
        return f"the file is truncated: its header places tensor {last!r} up to byte {at} of the data, the file holds {data}"
    if at < data:
        return f"the file holds {data - at} bytes after its last tensor that no header entry covers"
    return None


__all__ = ["ITEM_BYTES", "diagnose", "read_header"]
