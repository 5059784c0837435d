"""Whether tensors hold NaN or inf, from one float32 sum each, read back in one copy.

A sum is finite exactly when no element is NaN or inf, unless it overflows (float16 past
65504); a non-finite sum is confirmed element by element, so an overflow is never reported.

Each sum is written into its slot of one preallocated float32 vector, which is copied to the host
once. On a GPU the sum is taken in float32 straight into its slot (``torch.sum(dtype=, out=)``):
one reduction kernel and one copy, however many tensors, and no stack or elementwise ``isfinite``
on the device. That matters in a fresh process, where the first launch of each kernel loads its
code (tens of milliseconds for a handful of kernels). On the CPU a 16-bit tensor is summed in its
own dtype (summing it into float32 is 10-20x slower there).

:class:`FiniteSums` can take tensors as they arrive (a load backend hands them over one by one)
on a side stream, so that the sums run while the next tensors are still being copied.
"""

from __future__ import annotations

import math
from typing import Any


def _summable(t: Any) -> bool:
    return not t.is_meta and t.numel() > 0 and t.is_floating_point()


class FiniteSums:
    """Float32 sums of up to ``capacity`` tensors on ``device``, queued by :meth:`add`, read by :meth:`finite`.

    ``overlap=True`` queues each sum on a side CUDA stream after the tensor's producer (the
    current stream), so a producer that synchronizes its own stream between tensors does not
    wait for them. The caller keeps every added tensor alive until :meth:`finite` returns.
    """

    def __init__(self, capacity: int, device: Any, *, overlap: bool = False) -> None:
        import torch

        self._device = torch.device(device)
        self._sums = torch.empty(max(capacity, 1), dtype=torch.float32, device=self._device)
        self._keys: list[Any] = []
        self._trivial: list[Any] = []  # nothing to sum: integers, empty tensors
        self._stream = torch.cuda.Stream(self._device) if overlap and self._device.type == "cuda" else None

    @staticmethod
    def prewarm(device: Any, dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")) -> None:
        """Launch the sums' reduction once per dtype on a two-element tensor of ``device``.

        In a fresh process the first launch of a CUDA kernel loads its module's code (about 40 ms
        for torch's sum reduction, measured on an H200); a load backend calls this as its read
        starts, so that the loading overlaps the read instead of delaying the first sum.
        """
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            return
        out = torch.empty(len(dtypes), dtype=torch.float32, device=device)
        for i, name in enumerate(dtypes):
            torch.sum(torch.zeros(2, dtype=getattr(torch, name), device=device), dim=(0,), dtype=torch.float32,
                      out=out[i])

    def add(self, key: Any, tensor: Any) -> None:
        import torch

        if not _summable(tensor):
            self._trivial.append(key)
            return
        if len(self._keys) >= self._sums.numel():
            raise ValueError(f"FiniteSums holds {self._sums.numel()} sums; {key!r} is one more")
        slot = self._sums[len(self._keys)]
        self._keys.append(key)
        t = tensor.detach()
        if t.device.type == "cpu":
            slot.copy_(t.sum())
            return
        t = t.reshape(1) if t.dim() == 0 else t
        if self._stream is None:
            torch.sum(t, dim=tuple(range(t.dim())), dtype=torch.float32, out=slot)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            torch.sum(t, dim=tuple(range(t.dim())), dtype=torch.float32, out=slot)

    def finite(self) -> set[Any]:
        """The keys whose tensor's sum is finite (and those with nothing to sum)."""
        if self._stream is not None:
            self._stream.synchronize()
        values = self._sums[: len(self._keys)].tolist() if self._keys else []
        return {k for k, v in zip(self._keys, values, strict=True) if math.isfinite(v)} | set(self._trivial)


def nonfinite(named: list[tuple[str, Any]]) -> list[str]:
    """The names whose tensor holds NaN or inf, in order (tensors on any devices, one read-back per device)."""
    import torch

    by_device: dict[Any, list[tuple[str, Any]]] = {}
    bad: set[str] = set()
    for name, t in named:
        if _summable(t):
            by_device.setdefault(t.device, []).append((name, t))
        elif not t.is_meta and t.is_complex() and not bool(torch.isfinite(t.detach()).all()):
            bad.add(name)
    for device, items in by_device.items():
        sums = FiniteSums(len(items), device)
        for name, t in items:
            sums.add(name, t)
        finite = sums.finite()
        # A float32 sum past float32's range is not NaN: confirm element by element.
        bad.update(name for name, t in items if name not in finite and not bool(torch.isfinite(t).all()))
    return [name for name, _ in named if name in bad]


__all__ = ["FiniteSums", "nonfinite"]
