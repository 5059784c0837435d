"""Load backends: how a checkpoint's tensors get from safetensors files onto the build's device.

``safetensors`` (always there) memory-maps each file and copies tensor by tensor from the
page cache: on a GPU each copy comes from pageable memory, so a build moves about 5-7 GB/s
whatever the link can do. ``instanttensor`` (``pip install 'hfbuilder[fast]'``, Apache-2.0, the
loader vLLM and SGLang use) reads the files with io_uring or AIO into pinned staging buffers and
pipelines the host-to-device copies, which is what it takes to approach the link's 50+ GB/s. It
reads safetensors onto CUDA devices only, so it is used only there (``auto``), and a request for
it elsewhere is an error before any work.

Its reads go through the page cache (``buffered``: fast when the files are cached, and they stay
cached for the next model built from them) or around it (``direct``: O_DIRECT, the fastest way
to read a cold file from disk). ``auto`` asks the kernel which it is (:func:`cached_fraction`).

Nothing here takes a build context: the load and checkpoint stages call these helpers and write
the notes, facts and provenance. torch and instanttensor are imported only when a read starts.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import BuilderInputError, CheckpointError
from .pagecache import IO_MODES, cached_fraction, choose_io

LOADERS = ("auto", "safetensors", "instanttensor", "transformers")


class ReadFailed(CheckpointError):
    """A load backend could not read the files (not a problem of the checkpoint's contents).

    With ``loader="auto"`` the stages fall back to safetensors on it, with a warning.
    """


FAST_EXTRA = "pip install 'hfbuilder[fast]'"


def instanttensor_installed() -> bool:
    """Whether ``import instanttensor`` would find the package (it is not imported)."""
    try:
        return importlib.util.find_spec("instanttensor") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (deliberately absent)
        return False


def is_cuda(device: Any) -> bool:
    return device is not None and str(device).split(":")[0] == "cuda"


@dataclass(frozen=True)
class LoaderChoice:
    """The backend a read will use (``instanttensor``, ``safetensors`` or ``torch.load``), and why."""

    name: str
    why: str


def check_loader(requested: str, device: Any) -> None:
    """Raise :class:`BuilderInputError` when the requested loader cannot run at all (before any work)."""
    if requested != "instanttensor":
        return
    if not is_cuda(device):
        raise BuilderInputError(
            f"load.loader='instanttensor' reads onto CUDA devices only, but the build's device is {device!r}: "
            "build with .on_device('cuda'), or use loader 'auto' (instanttensor on CUDA, safetensors elsewhere)"
        )
    if not instanttensor_installed():
        raise BuilderInputError(
            f"load.loader='instanttensor' needs the instanttensor package, which is not installed: {FAST_EXTRA} "
            "(or use loader 'auto', which falls back to safetensors)"
        )


def choose_loader(requested: str, device: Any, fmt: str = "safetensors") -> LoaderChoice:
    """The backend for reading a checkpoint of format ``fmt`` ("safetensors" or "bin") onto ``device``."""
    check_loader(requested, device)
    if fmt != "safetensors":
        return LoaderChoice("torch.load", "the checkpoint is a pickle (.bin), which only torch.load reads")
    if requested == "transformers":
        return LoaderChoice("transformers", "load.loader='transformers': from_pretrained reads the files")
    if requested == "safetensors":
        return LoaderChoice("safetensors", "load.loader='safetensors'")
    if requested == "instanttensor":
        return LoaderChoice("instanttensor", "load.loader='instanttensor'")
    if not is_cuda(device):
        return LoaderChoice("safetensors", f"the device is {device or 'cpu'}, not CUDA")
    if not instanttensor_installed():
        return LoaderChoice("safetensors", f"instanttensor is not installed ({FAST_EXTRA})")
    return LoaderChoice("instanttensor", "installed, and the device is CUDA")


# -- reads -----------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """Tensors read onto a device, and what the read cost."""

    tensors: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    loader: str = ""
    #: the I/O path the loader took (``URING_BUFFERED``, ``AIO``..., ``mmap`` for safetensors)
    backend: str = ""
    #: the tensors summed as they arrived and found finite (``check_finite`` reads), as (data pointer,
    #: dtype, shape): a parameter that is one of them needs no second look (:func:`read_finite`)
    finite: set[tuple[int, Any, tuple[int, ...]]] = field(default_factory=set)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _signature(t: Any) -> tuple[int, Any, tuple[int, ...]]:
    return t.data_ptr(), t.dtype, tuple(t.shape)


def read_finite(model: Any, loaded: Loaded | None) -> dict[str, tuple[Any, int]]:
    """``BuildContext.read_finite`` entries for ``model`` after assignment: name -> (parameter, data
    pointer) for each parameter that is one of the tensors the read found finite, not a cast or a
    copy of one (same memory, dtype and shape)."""
    if loaded is None or not loaded.finite:
        return {}
    return {name: (p, p.data_ptr()) for name, p in model.named_parameters(remove_duplicate=False)
            if _signature(p) in loaded.finite}


class InstantRead:
    """instanttensor's ``safe_open`` of ``files``, opened now and drained later.

    Opening starts the read: instanttensor's native threads fill its staging buffers at once,
    without the GIL, while this thread builds the model. The tensors are taken in this thread
    too (:meth:`drain`): instanttensor's loop holds the GIL while it waits for each tensor, so
    draining it from a background thread would starve the thread building the model (measured:
    a meta-device build of 0.06 s took 2.9 s beside a cold read).
    """

    def __init__(self, files: list[str], device: Any, io: str = "buffered", keys: list[str] | None = None,
                 check_finite: bool = False) -> None:  # fmt: skip
        import instanttensor
        import torch

        self.check_finite = check_finite

        dev = torch.device(device)
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        kwargs: dict[str, Any] = {}
        if io == "buffered":
            kwargs["backend"] = instanttensor.BackendPolicy.BUFFERED
        if keys is not None:
            kwargs.update(tensor_filter=sorted(keys), tensor_name_match_mode="exact")
        self.start = time.perf_counter()
        with torch.cuda.device(self.device):  # it syncs the current device's stream: make it the target's
            self._fh: Any = instanttensor.safe_open(sorted(files), framework="pt", device=self.device.index, **kwargs)
            self._fh.__enter__()
            if check_finite:
                from .weights import FiniteSums

                FiniteSums.prewarm(self.device)  # loads the reduction's code while the read runs

    def drain(self) -> Loaded:
        """Every tensor, each owning its memory; then the loader is closed.

        With ``check_finite`` each tensor is summed as it arrives, on a side stream, so the
        sums run while the next tensors are copied (:class:`~hfbuilder.weights.FiniteSums`).
        """
        import torch

        from .weights import FiniteSums

        out = Loaded(loader="instanttensor")
        fh = self._fh
        try:
            with torch.cuda.device(self.device):
                sums = FiniteSums(len(fh.keys()), self.device, overlap=True) if self.check_finite else None
                for name, tensor in fh.tensors():
                    out.tensors[name] = tensor
                    out.bytes += _nbytes(tensor)
                    if sums is not None:
                        sums.add(name, tensor)
                if sums is not None:
                    out.finite = {_signature(out.tensors[k]) for k in sums.finite()}
        finally:
            self._close()
        out.backend = getattr(getattr(fh, "backend", None), "name", "") or str(getattr(fh, "backend", ""))
        out.seconds = time.perf_counter() - self.start
        return out

    def abandon(self) -> None:
        """Close it unread (a build that failed before taking the tensors): drain, then drop."""
        if self._fh is not None:
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the build is failing already; its own error is the one to see
                self._close()

    def _close(self) -> None:
        import torch

        fh, self._fh = self._fh, None
        if fh is not None:
            with torch.cuda.device(self.device):
                fh.__exit__(None, None, None)


def read_instanttensor(files: list[str], device: Any, io: str = "buffered", keys: list[str] | None = None,
                       check_finite: bool = False) -> Loaded:  # fmt: skip
    """Every tensor of ``files`` (or only ``keys``) on the CUDA ``device``, each owning its memory."""
    return InstantRead(files, device, io, keys, check_finite).drain()


def read_safetensors(files: list[str], device: Any, keys: list[str] | None = None) -> Loaded:
    """Every tensor of ``files`` (or only ``keys``) through safetensors' own reader, onto ``device``."""
    from safetensors import safe_open

    wanted = None if keys is None else set(keys)
    out = Loaded(loader="safetensors", backend="mmap")
    start = time.perf_counter()
    for file in sorted(files):
        with safe_open(file, framework="pt", device=str(device or "cpu")) as fh:
            for name in fh.keys():
                if wanted is None or name in wanted:
                    out.tensors[name] = fh.get_tensor(name)
                    out.bytes += _nbytes(out.tensors[name])
    out.seconds = time.perf_counter() - start
    return out


class Read:
    """A read of every tensor of some safetensors files onto a device, started now, taken by :meth:`result`.

    instanttensor starts reading when the read is made (:class:`InstantRead`), so its I/O
    and copies overlap whatever the build does until it takes the tensors; safetensors reads
    in :meth:`result`. A read that cannot start or finish is a :class:`ReadFailed` from
    :meth:`result`.
    """

    def __init__(self, loader: str, files: list[str], device: Any, io: str = "buffered",
                 keys: list[str] | None = None, why: str = "", check_finite: bool = False) -> None:  # fmt: skip
        self.loader, self.files, self.device, self.io = loader, list(files), device, io
        self.why = why  # why this I/O mode, for the report
        self._keys = keys
        self._result: Loaded | None = None
        self._error: BaseException | None = None
        self._open: InstantRead | None = None
        if loader == "instanttensor":
            try:
                self._open = InstantRead(self.files, device, io, keys, check_finite)
            except Exception as exc:  # noqa: BLE001 - reported by result(), with the files named
                self._error = exc

    def result(self) -> Loaded:
        """The tensors (reads what is left to read); a failed read is a :class:`ReadFailed`."""
        if self._result is None and self._error is None:
            opened, self._open = self._open, None
            try:
                self._result = opened.drain() if opened is not None else read_safetensors(self.files, self.device,
                                                                                           self._keys)
            except Exception as exc:  # noqa: BLE001 - reported below, with the files named
                self._error = exc
        if self._error is not None:
            raise ReadFailed(
                f"{self.loader} could not read {', '.join(self.files)} onto {self.device}: "
                f"{type(self._error).__name__}: {self._error}"
            ) from self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Finish a read nobody took (a build that failed half-way) and drop what it read."""
        opened, self._open = self._open, None
        if opened is not None:
            opened.abandon()
        self._result = None


class PrefetchedReader:
    """A checkpoint reader whose tensors were already read onto the device.

    ``get(key, device)`` hands over the read tensor (once); everything else, and any
    tensor asked for elsewhere, goes to the wrapped reader.
    """

    def __init__(self, reader: Any, tensors: dict[str, Any], device: Any) -> None:
        self.reader, self._tensors, self._device = reader, dict(tensors), str(device)

    def get(self, key: str, device: Any = None) -> Any:
        if device is not None and str(device) == self._device and key in self._tensors:
            return self._tensors.pop(key)
        return self.reader.get(key, device=device)

    def unused(self) -> list[str]:
        """Keys that were read but never asked for."""
        return sorted(self._tensors)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)

    def __contains__(self, key: object) -> bool:
        return key in self.reader

    def __iter__(self) -> Any:
        return iter(self.reader)

    def __len__(self) -> int:
        return len(self.reader)


def device_source(reader: Any, device: Any, loader: str, io: str, started: Read | None = None,
                  check_finite: bool = False) -> tuple[Any, LoaderChoice, Loaded | None]:  # fmt: skip
    """Where assignment takes ``reader``'s tensors from when they go to ``device``.

    With instanttensor: a :class:`PrefetchedReader` over its read (``started``, when it read these
    files, else a new one), the choice, and what was read. Otherwise ``reader`` itself. A failed
    read is a :class:`CheckpointError`.
    """
    choice = choose_loader(loader, device, reader.format)
    if choice.name == "transformers":  # it names from_pretrained's reads; a checkpoint is read here
        return reader, LoaderChoice("safetensors", "the checkpoint stage reads safetensors files itself"), None
    if choice.name != "instanttensor":
        return reader, choice, None
    read = started
    if read is None or read.files != list(reader.files):
        if read is not None:
            read.close()
        mode, why = choose_io(io, reader.files)
        read = Read("instanttensor", reader.files, device, mode, why=why, check_finite=check_finite)
    try:
        loaded = read.result()
    finally:
        read.close()  # from here on the tensors belong to the PrefetchedReader
    how = LoaderChoice("instanttensor", f"{read.io} I/O ({loaded.backend}; {read.why})")
    return PrefetchedReader(reader, loaded.tensors, device), how, loaded


__all__ = [
    "device_source",
    "FAST_EXTRA",
    "IO_MODES",
    "LOADERS",
    "Loaded",
    "LoaderChoice",
    "PrefetchedReader",
    "InstantRead",
    "Read",
    "ReadFailed",
    "cached_fraction",
    "check_loader",
    "choose_io",
    "choose_loader",
    "instanttensor_installed",
    "is_cuda",
    "read_finite",
    "read_instanttensor",
    "read_safetensors",
]
