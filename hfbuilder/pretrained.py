"""``from_pretrained`` by assignment, for tensors a fast loader already put on the device.

transformers' ``from_pretrained(device_map="cuda")`` reads each tensor through a memory map and
copies it to the device from pageable memory. When a load backend (``hfbuilder.loaders``) has
read every tensor onto the device already, loading is assignment, done the way
``from_pretrained`` does it for the models it can assign:

1. the model is built on the meta device with no init spent (``torch.device("meta")`` and
   transformers' ``no_init_weights``), in the dtype ``from_pretrained`` would pick;
2. checkpoint keys are matched to the model's (transformers' renamings included) and each
   tensor becomes its parameter, cast on the device if its dtype differs;
3. what the checkpoint lacks, and the non-persistent buffers (rotary ``inv_freq``...), are
   initialized by the model's own ``_init_weights`` (``hfbuilder.plugins.materialize``), which is
   how ``from_pretrained`` initializes missing keys;
4. ``eval()``, ``config.name_or_path`` and the generation config, as ``from_pretrained`` leaves them.

What it cannot do the same way (shapes that differ, weights that need transformers' converters,
quantized or fp32-pinned modules, adapters) is reported by :func:`blocker`, and the caller then
uses ``from_pretrained`` itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .loaders import PrefetchedReader, Read, choose_io, read_finite

FLOAT_PREFIXES = ("float", "bfloat")


def directory_blocker(path: str, fmt: str | None) -> str | None:
    """Why a directory cannot be loaded by assignment (None: it can), read from its files alone."""
    if not os.path.isdir(path):
        return "not a local directory"
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "a PEFT adapter directory (from_pretrained loads the adapter onto its base)"
    if fmt != "safetensors":
        return "the weights are not safetensors"
    return None


def model_blocker(model: Any, config: Any, dtype: Any) -> str | None:
    """Why this model cannot be loaded by assignment (None: it can): what from_pretrained does per module."""
    import torch

    if getattr(config, "quantization_config", None) is not None:
        return "the config asks for quantization"
    fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    strict = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if (fp32 and dtype == torch.float16) or (strict and dtype in (torch.float16, torch.bfloat16)):
        return f"modules {sorted(set(fp32 + strict))} are kept in float32"
    return None


def pretrained_dtype(requested: str | None, config: Any, dtypes: Iterable[str]) -> str:
    """The dtype ``from_pretrained`` builds in: the request, else (``auto``/None) the config's, else
    the first floating dtype the checkpoint stores, else float32."""
    if requested not in (None, "auto"):
        return str(requested)
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return str(configured).removeprefix("torch.")
    return next((d for d in dtypes if d.startswith(FLOAT_PREFIXES)), "float32")


def build_on_meta(model_class: Any, config: Any, dtype: Any = None, **kwargs: Any) -> Any:
    """The architecture with every parameter and buffer on the meta device, and no init spent.

    Under ``torch.device("meta")`` alone, ``nn.Linear`` still runs its kaiming init on meta tensors
    (through torch's Python reference ops: most of the construction time); transformers'
    ``no_init_weights`` skips those calls, as ``from_pretrained`` does under ZeRO-3. It also skips
    ``init_weights``, which would tie the weights: they are tied here.
    """
    import torch

    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4: its own module
        from transformers.modeling_utils import no_init_weights
    with torch.device("meta"), no_init_weights():
        model = model_class.from_config(config, **kwargs)
    model.tie_weights()
    return model


@dataclass
class AssignedPretrained:
    """What :func:`load_by_assignment` did."""

    model: Any
    loaded: list[str] = field(default_factory=list)  # model names filled from the checkpoint
    initialized: list[str] = field(default_factory=list)  # names _init_weights filled (missing, buffers)
    missing: list[str] = field(default_factory=list)  # parameters the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not use
    bytes: int = 0
    read_seconds: float = 0.0
    read_gbps: float = 0.0
    backend: str = ""
    io: str = ""  # buffered or direct
    io_why: str = ""
    #: seconds of each step, in order (a read runs alongside every step before "wait for the read")
    phases: dict[str, float] = field(default_factory=dict)
    #: ``BuildContext.read_finite`` entries: the parameters that are tensors the read found finite
    finite: dict[str, tuple[Any, int]] = field(default_factory=dict)


def pretrained_by_assignment(model_class: Any, config: Any, path: str, *, device: Any, dtype: str | None,
                             loader: str = "instanttensor", io: str = "auto", check_finite: bool = False,
                             **from_config: Any) -> AssignedPretrained | str:  # fmt: skip
    """The pretrained model in ``path`` by assignment; a str says why it must be ``from_pretrained`` instead.

    ``loader="instanttensor"``: its read onto the CUDA ``device`` starts first and runs while the
    architecture is built on the meta device (``io``: buffered or direct, :func:`choose_io`;
    ``check_finite``: each tensor is summed as it arrives). ``loader="safetensors"`` on the CPU:
    each parameter becomes a view of the memory-mapped file (no copy, as ``from_pretrained``
    leaves a CPU model), converted only if its dtype differs.

    ``dtype`` is the load setting (None/"auto": as ``from_pretrained`` picks). A failed read is a
    :class:`~hfbuilder.loaders.ReadFailed`; a tensor whose shape or dtype kind the model cannot
    take, the :class:`~hfbuilder.CheckpointError` a plain build's check raises (checked here, on
    the model this path builds anyway, before a tensor is assigned).
    """
    import torch

    from .weights import find_checkpoint, open_checkpoint
    from .weights.shards import shard_map

    clock = _Clock()
    read, mode, why = None, "", ""
    if loader == "instanttensor":
        files = sorted(shard_map(find_checkpoint(path)[1]))  # the index alone: the read starts before the headers
        mode, why = choose_io(io, files)
        read = Read("instanttensor", files, device, mode, why=why, check_finite=check_finite)  # reads meanwhile
    try:
        reader = open_checkpoint(path)  # every header and the shard rules, checked again while reading
        clock.lap("open")
        try:
            name = pretrained_dtype(dtype, config, (reader.info(k).dtype for k in reader.keys()))
            torch_dtype = getattr(torch, name)
            model = build_on_meta(model_class, config, torch_dtype, **from_config)
            clock.lap("architecture")
            done = model_blocker(model, config, torch_dtype) or load_by_assignment(model, path, reader, read, device,
                                                                                   clock)
        finally:
            reader.close()
    finally:
        if read is not None:
            read.close()
    if not isinstance(done, str):
        done.io, done.io_why, done.phases = mode, why, clock.laps
    return done


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 4)
        self._last = now


def load_by_assignment(model: Any, path: str, reader: Any, read: Read | None, device: Any,
                       clock: _Clock | None = None) -> AssignedPretrained | str:  # fmt: skip
    """Fill ``model`` (built by :func:`build_on_meta`) from the checkpoint; a str says why it cannot.

    ``reader`` is the checkpoint's :class:`~hfbuilder.weights.CheckpointReader` (keys, shapes,
    and the tensors when ``read`` is None: memory-mapped on the CPU); ``read`` a started read of
    its files onto ``device``. Keys map as ``from_pretrained`` maps them (the base-model prefix
    rule included). What the checkpoint will not fill (non-persistent buffers, missing weights)
    is initialized before the read is waited for, so that work overlaps the read.
    """
    from .plugins.materialize import materialize
    from .weights import LoadPlan, assign_from_checkpoint, check_plan, match_keys

    clock = clock or _Clock()
    plan = match_keys(model, reader, prefixes=True)
    # What a plain build's check refuses (from_pretrained's own business, missing and unexpected keys, aside).
    check_plan(LoadPlan(mismatched=plan.mismatched, wrong_dtype=plan.wrong_dtype, files=plan.files,
                        renamed=plan.renamed), strict=True, source=reader.file, model_name=type(model).__name__)
    if plan.converted:
        return "transformers converts some of its tensors (merges or splits them) when it loads them"
    clock.lap("keys")
    filled = {n for names in plan.tied for n in names if any(m in plan.sources for m in names)} | set(plan.sources)
    initialized = materialize(model, device or "cpu", skip=filled)
    clock.lap("initialize the rest")
    source, loaded = reader, None
    if read is not None:
        loaded = read.result()
        clock.lap("wait for the read")
        source = PrefetchedReader(reader, loaded.tensors, device)
        del loaded.tensors
    assign_from_checkpoint(model, plan, source, device=None if read is None else device, source=reader.file)
    del source  # tensors the model does not take free their memory now
    finite = read_finite(model, loaded)
    clock.lap("assign")
    model.eval()
    model.config.name_or_path = path
    _generation_config(model, path)
    clock.lap("finish")
    return AssignedPretrained(
        model=model, loaded=sorted(filled), initialized=initialized, missing=sorted(plan.missing),
        unexpected=sorted(plan.unexpected), bytes=loaded.bytes if loaded else 0,
        read_seconds=loaded.seconds if loaded else 0.0, read_gbps=loaded.gbps if loaded else 0.0,
        backend=loaded.backend if loaded else "mmap", finite=finite,
    )  # fmt: skip


def _generation_config(model: Any, path: str) -> None:
    """The generation config ``from_pretrained`` attaches: generation_config.json, else one from config.json."""
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(
            path, config_file_name="config.json", _from_model_config=True
        )


__all__ = [
    "AssignedPretrained",
    "build_on_meta",
    "directory_blocker",
    "load_by_assignment",
    "pretrained_by_assignment",
    "model_blocker",
    "pretrained_dtype",
]
