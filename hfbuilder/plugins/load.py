"""The ``load`` stage: make the model, with or without its pretrained weights."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from ..context import PROVENANCE_INITIALIZED, PROVENANCE_PRETRAINED, PROVENANCE_UNINITIALIZED, BuildContext
from ..errors import BuilderInputError, CheckpointError
from ..hookspecs import hookimpl
from ..loaders import LoaderChoice, check_loader, choose_loader
from ..pretrained import build_on_meta, directory_blocker
from ..remote_code import remote_code_kwargs
from ..settings import Settings, setting
from ..stage import Stage
from ..weights import (
    FORMAT_JSON,
    CheckpointSummary,
    FileInfo,
    check_pretrained,
    find_checkpoint,
    format_conflict,
    map_keys,
    summarize,
)
from .load_paths import assign_pretrained, by_assignment, copied, start_checkpoint_read, weights_bytes

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "npu", "hpu", "meta")


@dataclass(frozen=True)
class LoadSettings(Settings):
    deferred: bool = setting(False, option="deferred", doc="build the architecture without reading pretrained weights "
                                        "(DeepSpeed-Chat's rlhf_training); a checkpoint or materialize fills them")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] | None = setting(
        None, option="dtype", doc="the weights' dtype (a torch.dtype or its name); auto: as stored; None: the config's")
    device: str | None = setting(None, option="device", doc="load the weights straight onto this device (cuda, cuda:1, cpu...)")
    partition_loader: bool = setting(True, option="zero3_partition_loader",
                                     doc="under ZeRO-3 each rank reads only its rows of a safetensors checkpoint; "
                                         "False: transformers' from_pretrained")
    loader: Literal["auto", "safetensors", "instanttensor", "transformers"] = setting(
        "auto", option="loader", doc="how safetensors weights are read: instanttensor (pip install 'hfbuilder[fast]') "
        "reads onto a CUDA device with pinned, pipelined copies; safetensors memory-maps the files (on the CPU the "
        "model is assigned their views; on a GPU from_pretrained copies tensor by tensor); transformers: "
        "from_pretrained, on every device; auto: instanttensor when installed and the device is CUDA, else "
        "safetensors. Not used under ZeRO-3")
    io: Literal["auto", "buffered", "direct"] = setting(
        "auto", option="loader_io", doc="instanttensor's reads: buffered (through the page cache: fast when the files "
        "are cached, and they stay cached for the next model), direct (O_DIRECT: fastest from a cold disk); auto: "
        "buffered when the files are in the page cache, else direct")

    def __post_init__(self) -> None:
        if self.dtype is not None and not isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))  # torch.bfloat16 -> bfloat16
        if self.device is not None and not isinstance(self.device, str) and type(self.device).__name__ == "device":
            object.__setattr__(self, "device", str(self.device))
        super().__post_init__()
        if self.device is not None and self.device.split(":")[0] not in DEVICE_TYPES:
            raise BuilderInputError(f"load.device: unknown device {self.device!r}; device types: {list(DEVICE_TYPES)}")


def torch_dtype(name: Any) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` and None pass through."""
    if name is None or name == "auto" or not isinstance(name, str):
        return name
    import torch

    return getattr(torch, name)


class LoadStage(Stage):
    """``from_pretrained`` (straight onto the ``device`` setting when set), or, with deferred
    weights, the architecture alone: on the meta device without ZeRO-3, so no time is
    spent initializing weights that a checkpoint will overwrite.

    With the instanttensor loader (``loader`` setting) a plain build reads every tensor onto the
    GPU while the architecture is built on the meta device, then assigns them
    (:mod:`hfbuilder.pretrained`); a deferred build with a checkpoint starts the checkpoint's read
    here, for the checkpoint stage.
    """

    name = "load"
    after = ("zero",)
    Settings = LoadSettings

    def check(self, ctx: BuildContext) -> None:
        settings = ctx.settings(self.name)
        if not ctx.zero3:
            check_loader(settings.loader, settings.device)
        # from_pretrained of a local directory: refuse bad files from their headers now, with
        # the file and key named, rather than from inside transformers once loading is under way.
        path = ctx.model_name_or_path
        if settings.deferred or not os.path.isdir(path):
            return
        # The instanttensor path builds the architecture anyway and checks it there, while its read
        # runs; building a second one here would cost a meta build before the read starts.
        fast = not ctx.zero3 and self._choice(ctx, settings).name == "instanttensor"
        check_pretrained(path, None if fast else _meta_architecture(ctx))
        conflict = format_conflict(path)
        if conflict:
            ctx.warn(conflict)

    def explain(self, ctx: BuildContext) -> list[str]:
        cls = getattr(ctx.model_class, "__name__", str(ctx.model_class))
        settings = ctx.settings(self.name)
        deferred = settings.deferred
        weights = None if deferred else _local_weights(ctx)
        ctx.dtype = build_dtype(ctx)
        dtype = _explain_dtype(ctx, weights)
        # The architecture on the meta device: exact parameter count and names, at no memory
        # cost. Later stages' explain() see it as ctx.model.
        model = build_on_meta(ctx.model_class, copy.deepcopy(ctx.config), torch_dtype(dtype), **_remote_code(ctx))
        ctx.model = model
        n = sum(p.numel() for p in model.parameters())
        device = "meta" if deferred and not ctx.zero3 else settings.device or "cpu"
        ctx.fact("parameters", n)
        ctx.fact("dtype", dtype)
        if not ctx.zero3:
            ctx.fact("device", device)
        where = "partitioned over the ranks (ZeRO-3)" if ctx.zero3 else f"on {device}"
        if deferred:
            return [f"{cls}.from_config: {type(model).__name__}, {n:,} parameters, dtype {dtype}, {where}; "
                    "weights deferred (none read)"]
        choice = None if ctx.zero3 else self._choice(ctx, settings)
        if choice is not None:
            ctx.fact("loader", choice.name)
        if choice is not None and choice.name == "instanttensor":
            lines = [f"read every tensor of {ctx.model_name_or_path!r} onto {device} with instanttensor while "
                     f"{type(model).__name__} ({n:,} parameters, dtype {dtype}) is built on the meta device; assign them"]
        elif choice is not None and by_assignment(choice, settings.device):
            lines = [f"build {type(model).__name__} ({n:,} parameters, dtype {dtype}) on the meta device and assign "
                     f"it the memory-mapped tensors of {ctx.model_name_or_path!r} (what from_pretrained leaves on {device})"]
        else:
            lines = [f"{cls}.from_pretrained({ctx.model_name_or_path!r}): {type(model).__name__}, {n:,} parameters, "
                     f"dtype {dtype}, {where}" + (f" ({choice.name}: {choice.why})" if choice else "")]
        if weights is None:
            lines.append("not a local directory: transformers resolves the files through the Hugging Face cache")
            return lines
        return lines + _explain_weights(ctx, model, weights)

    def run(self, ctx: BuildContext) -> None:
        settings = ctx.settings(self.name)
        config = copy.deepcopy(ctx.config)  # from_config/from_pretrained mutate the config they get
        ctx.dtype = build_dtype(ctx)
        dtype = torch_dtype(ctx.dtype)
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        if settings.deferred:
            if kwargs.get("dtype") == "auto":
                # from_config has no "auto": build in the config's dtype; the checkpoint
                # stage then keeps each tensor's dtype as the checkpoint stores it.
                del kwargs["dtype"]
            ctx.model = self._architecture(ctx, config, kwargs)
            return
        if ctx.zero3 and settings.partition_loader:
            from ..zero3 import listed, load_pretrained_partitioned

            # Each rank reads only the safetensors rows of its own partitions, when it can.
            loaded = load_pretrained_partitioned(ctx.model_name_or_path, ctx.model_class, config, dtype,
                                                 trust_remote_code=ctx.settings("config").trust_remote_code,
                                                 read=ctx.settings("zero").read)
            if loaded.model is None:
                ctx.note(f"ZeRO-3 partition loader skipped: {loaded.skipped}; using from_pretrained")
            else:
                ctx.model = model = loaded.model
                ctx.report.provenance.update(loaded.fill.provenance)
                ctx.note(loaded.fill.describe())
                for key, value in loaded.fill.facts().items():
                    ctx.fact(key, value)
                unused = f"; keys it does not use (as from_pretrained): {listed(loaded.unused)}" if loaded.unused else ""
                ctx.note(f"{type(model).__name__} built partitioned, no init; filled from {ctx.model_name_or_path}{unused}")
                return
        choice = None if ctx.zero3 else self._choice(ctx, settings)
        if choice is not None and by_assignment(choice, settings.device):
            model = assign_pretrained(ctx, config, settings, choice)
            if model is not None:
                ctx.model = model
                _facts(ctx, model)
                return
        device = settings.device
        if device and not ctx.zero3:
            kwargs["device_map"] = device
        start = time.perf_counter()
        model, info = ctx.model_class.from_pretrained(
            ctx.model_name_or_path, config=config, output_loading_info=True, **kwargs, **_remote_code(ctx)
        )
        seconds = time.perf_counter() - start
        ctx.model = model
        missing = sorted(info.get("missing_keys") or [])
        mismatched = info.get("mismatched_keys") or []
        params = list(model.named_parameters())  # one walk for the provenance and the facts
        ctx.report.provenance.update(dict.fromkeys((name for name, _ in params), PROVENANCE_PRETRAINED))
        ctx.fact("missing_weights", missing)
        if missing or mismatched:
            for name in missing:
                ctx.report.provenance[name] = PROVENANCE_INITIALIZED
            ctx.warn(
                f"{ctx.model_name_or_path} lacks weights for {missing + [m[0] for m in mismatched]}; "
                "transformers initialized them randomly"
            )
        n, first = _facts(ctx, model, params), params[0][1]
        ctx.note(f"{type(model).__name__}.from_pretrained: {n:,} parameters, dtype {first.dtype}, device {first.device}")
        if choice is not None:
            ctx.fact("loader", choice.name)
            copied(ctx, device, lambda: weights_bytes(ctx.model_name_or_path), seconds, f"safetensors ({choice.why})")

    def _choice(self, ctx: BuildContext, settings: LoadSettings) -> LoaderChoice:
        """The backend a plain build reads with; assignment (instanttensor's, or the CPU's memory map)
        only where it can stand in for from_pretrained."""
        choice = choose_loader(settings.loader, settings.device)
        if not by_assignment(choice, settings.device):
            return choice
        path = ctx.model_name_or_path
        try:
            fmt = find_checkpoint(path)[0] if os.path.isdir(path) else None
        except CheckpointError:
            fmt = None
        why = directory_blocker(path, fmt)
        if why is None:
            return choice
        if choice.name == "instanttensor":
            return LoaderChoice("safetensors", f"instanttensor not used: {why}")
        return LoaderChoice("transformers", f"from_pretrained reads it: {why}")

    def _architecture(self, ctx: BuildContext, config: Any, kwargs: dict[str, Any]) -> Any:
        checkpoint = ctx.settings("checkpoint")
        if ctx.zero3 and checkpoint.path is not None and checkpoint.strict:
            from ..zero3 import build_partitioned

            # A strict checkpoint fills every weight or fails the build: partition without
            # transformers' ZeRO-3 init (gather, init on rank 0, broadcast) it would overwrite.
            model = build_partitioned(ctx.model_class, config, kwargs.get("dtype"),
                                      trust_remote_code=ctx.settings("config").trust_remote_code)
            ctx.values_undefined = True
            ctx.note(f"{type(model).__name__} built partitioned with no weight init; the strict checkpoint fills it")
        elif ctx.zero3:
            # transformers' from_config builds under deepspeed.zero.Init, partitioned.
            model = ctx.model_class.from_config(config, **kwargs, **_remote_code(ctx))
            ctx.note(f"{type(model).__name__}.from_config under zero.Init (weights deferred)")
        else:
            start_checkpoint_read(ctx)  # before building, so that the read overlaps it
            # Parameters and buffers on the meta device, no init work: the checkpoint stage
            # assigns what it holds and materialize initializes the rest, buffers included.
            model = build_on_meta(ctx.model_class, config, kwargs.get("dtype"), **_remote_code(ctx))
            ctx.note(f"{type(model).__name__}.from_config on the meta device: no weight init spent")
        for name, _ in model.named_parameters():
            ctx.report.provenance[name] = PROVENANCE_UNINITIALIZED
        _facts(ctx, model)
        return model


def build_dtype(ctx: BuildContext) -> str | None:
    """The dtype the build makes the weights in: the DeepSpeed config's under ZeRO-3, else the setting.

    Under ZeRO-3 every partition must share the config's dtype ("auto" would take the checkpoint's).
    """
    if ctx.zero3:
        from ..zero3 import ds_dtype_name

        return ds_dtype_name(ctx.ds_config)
    return ctx.settings("load").dtype


def _meta_architecture(ctx: BuildContext) -> Any:
    """The model's architecture on the meta device, from the config the config stage will read; None if it cannot.

    The config stage runs after every check; if the config cannot be read or built, that
    stage (or this one's run) reports it, so the header checks go ahead without the model.
    """
    try:
        from transformers import AutoConfig

        settings = ctx.settings("config")
        config = settings.config or AutoConfig.from_pretrained(
            ctx.model_name_or_path, **settings.kwargs, trust_remote_code=settings.trust_remote_code)
        return build_on_meta(ctx.model_class, copy.deepcopy(config), **_remote_code(ctx))
    except Exception:  # noqa: BLE001 - reported by the stage that owns it
        return None


def _remote_code(ctx: BuildContext) -> dict[str, Any]:
    """An explicit ``trust_remote_code`` for the model class: left unset, transformers prompts on stdin."""
    return remote_code_kwargs(ctx.model_class, ctx.settings("config").trust_remote_code)


def _facts(ctx: BuildContext, model: Any, params: list[tuple[str, Any]] | None = None) -> int:
    """The facts explain() predicts, from the model the stage made; returns its parameter count."""
    tensors = [p for _, p in params] if params is not None else list(model.parameters())
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in tensors)
    ctx.fact("parameters", n)
    ctx.fact("dtype", str(tensors[0].dtype).removeprefix("torch."))
    if not ctx.zero3:
        ctx.fact("device", str(tensors[0].device))
    return n


def _local_weights(ctx: BuildContext) -> CheckpointSummary | None:
    """The weight files in ``model_name_or_path`` and their headers, or None for a hub name."""
    return summarize(ctx.model_name_or_path) if os.path.isdir(ctx.model_name_or_path) else None


def _explain_weights(ctx: BuildContext, model: Any, weights: CheckpointSummary) -> list[str]:
    """The files from_pretrained reads, and the model's parameters no checkpoint tensor fills."""
    extra = os.path.join(ctx.model_name_or_path, "generation_config.json")
    infos = weights.files + ([FileInfo.of(extra, FORMAT_JSON)] if os.path.isfile(extra) else [])
    ctx.fact("files", [f.to_dict() for f in infos])
    stored = ", ".join(sorted({t.dtype for t in weights.tensors.values()}))
    lines = [f"checkpoint: {len(weights.tensors)} tensors, {weights.values:,} values, stored as {stored}"]
    keymap = map_keys(model, weights.tensors)
    missing = sorted(name for name, _ in model.named_parameters() if name not in keymap.filled)
    ctx.fact("missing_weights", missing)
    if missing:
        ctx.warn(f"{ctx.model_name_or_path} has no weights for {missing}; transformers will initialize them randomly")
    unused = sorted(keymap.unused)
    if unused:
        more = " ..." if len(unused) > 5 else ""
        lines.append(f"{len(unused)} checkpoint tensor(s) the model does not use: {unused[:5]}{more}")
    return lines


def _explain_dtype(ctx: BuildContext, weights: CheckpointSummary | None) -> str:
    """The dtype the model will have: the option, else the config's, else the checkpoint's (``auto``)."""
    dtype = build_dtype(ctx)
    if dtype not in (None, "auto"):
        return str(dtype)
    configured = getattr(ctx.config, "dtype", None)
    if configured is not None:
        return str(configured).removeprefix("torch.")
    if weights is not None:
        for t in weights.tensors.values():
            if t.dtype.startswith(("float", "bfloat")):
                return t.dtype
    return "float32"


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [LoadStage()]
