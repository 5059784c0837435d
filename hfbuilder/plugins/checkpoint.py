"""The ``checkpoint`` stage: load the whole (wrapped) model's weights from a checkpoint, strictly.

``.with_checkpoint(path)`` puts it in the plan, after the head, so the keys it
matches are the final model's: ``rwtransformer.*`` and ``v_head.weight`` for a
DeepSpeed-Chat step-2 reward model. DeepSpeed-Chat ignores every key that does not
match, so a typo leaves a ``v_head`` random without a word; here missing keys,
unexpected keys and shape mismatches are a :class:`~hfbuilder.CheckpointError`
that lists them.

Without ZeRO-3 the model was built on the meta device, so loading is assigning:
each parameter becomes the checkpoint's tensor, memory-mapped from a safetensors
file (or a zip ``.bin``) and converted only if its dtype differs. Nothing is
initialized and then overwritten. Under ZeRO-3 the work goes to
``hfbuilder.zero3.load_checkpoint_into_partitions``. The key matching, the strict check and
the assignment live in :mod:`hfbuilder.weights`; this stage reads its settings and writes
the notes and provenance.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

from ..context import PROVENANCE_CHECKPOINT, PROVENANCE_RESIZED, BuildContext
from ..errors import CheckpointError
from ..hookspecs import hookimpl
from ..loaders import LoaderChoice, ReadFailed, device_source, read_finite
from ..settings import Settings, setting
from ..stage import Stage
from ..verify import reads_loaded_weights
from ..weights import (
    LoadPlan,
    assign_from_checkpoint,
    check_plan,
    find_checkpoint,
    format_conflict,
    listing,
    match_keys,
    open_checkpoint,
)


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    path: str | None = setting(None, option="checkpoint",
                               doc="load the whole (wrapped) model's weights from this file or directory")
    strict: bool = setting(True, doc="missing or unexpected keys are an error; False: warnings, and materialize "
                                     "initializes what is missing")
    mmap: bool = setting(True, doc="keep tensors memory-mapped from the file; False copies them out")

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        super().__post_init__()


class CheckpointStage(Stage):
    """Loads the checkpoint into the final model; only in the plan when a checkpoint was given."""

    name = "checkpoint"
    after = ("head", "resize")
    Settings = CheckpointSettings

    def enabled(self, settings: Any) -> bool:
        return settings(self.name).path is not None

    def check(self, ctx: BuildContext) -> None:
        # A missing, unknown or malformed checkpoint fails before any work: opening reads and
        # checks every header and the shard index, and no tensor data.
        path = ctx.settings(self.name).path
        open_checkpoint(path).close()
        conflict = format_conflict(path)
        if conflict:
            ctx.warn(conflict)
        if ctx.zero3 and importlib.util.find_spec("hfbuilder.zero3") is None:
            raise CheckpointError(
                "loading a checkpoint under ZeRO-3 needs hfbuilder.zero3.load_checkpoint_into_partitions, "
                "which this installation lacks"
            )

    def explain(self, ctx: BuildContext) -> list[str]:
        settings = ctx.settings(self.name)
        fmt, file = find_checkpoint(settings.path)
        strict = settings.strict
        how = "into ZeRO-3 partitions" if ctx.zero3 else "by assignment onto the meta-device model (mmap, no init)"
        layout = ctx.reward_layout
        keys = f"; {layout.layout.name} keys renamed" if layout is not None and layout.key_map.renames else ""
        return [f"load every weight from {file} ({fmt}) {how}; {'strict' if strict else 'non-strict'} key matching{keys}"]

    def run(self, ctx: BuildContext) -> None:
        settings = ctx.settings(self.name)
        load = ctx.settings("load")
        device = None if load.device in (None, "meta") else load.device
        start = time.perf_counter()
        reader: Any = open_checkpoint(settings.path)
        ctx.call_on_exit(reader.close)
        how, loaded = LoaderChoice("zero3 partitions", "each rank reads its own rows"), None
        if not ctx.zero3:
            reader, how, loaded = self._source(ctx, reader, device)
        layout = ctx.reward_layout  # a reward model's checkpoint, in any framework's layout
        if layout is not None:
            reader = layout.open(reader)  # seen under the RewardModel's names
            ctx.call_on_exit(reader.close)
        resized = {id(w): (old, new) for w, old, new in ctx.resized_rows}
        plan = match_keys(ctx.model, reader, resized)
        for warning in check_plan(plan, strict=settings.strict, source=reader.file, model_name=type(ctx.model).__name__):
            ctx.warn(warning)
        ctx.load_plan = plan
        if ctx.zero3:
            from ..zero3 import load_checkpoint_into_partitions

            filled = load_checkpoint_into_partitions(ctx.model, reader, plan, ds_config=ctx.ds_config,
                                                     read=ctx.settings("zero").read)
            ctx.report.provenance.update(filled.provenance)
            ctx.note(filled.describe())
            for key, value in filled.facts().items():
                ctx.fact(key, value)
            if plan.partial_rows:  # the checkpoint holds the rows from before the resize
                from ..zero3 import fill_grown_rows_partitioned

                mean = ctx.settings("resize").mean_resizing
                rows = fill_grown_rows_partitioned(ctx.model, plan.partial_rows, mean)
                how = "the mean of the loaded rows" if mean else "a normal init"
                ctx.note(f"filled rows added by resize, which the checkpoint lacks, with {how}: {', '.join(rows)}")
        else:
            assigned = assign_from_checkpoint(
                ctx.model, plan, reader, device=device, keep_dtype=ctx.dtype == "auto", mmap=settings.mmap,
                source=reader.file)
            ctx.rows_to_fill.update(plan.partial_rows)
            ctx.read_finite.update(read_finite(ctx.model, loaded))
            ctx.note(f"assigned {assigned.tensors} tensors ({assigned.bytes / 2**20:.1f} MiB) from {reader.file} "
                     f"({reader.format})")
            ctx.fact("loader", how.name)
            nbytes, seconds = (loaded.bytes, loaded.seconds) if loaded else (assigned.bytes, time.perf_counter() - start)
            if device not in (None, "cpu") and seconds > 0:  # on the CPU tensors are mapped, not copied
                ctx.fact("load_bytes", nbytes)
                ctx.fact("load_gbps", round(nbytes / seconds / 1e9, 2))
                ctx.note(f"read {nbytes / 1e9:.2f} GB onto {device} in {seconds:.3f} s "
                         f"({nbytes / seconds / 1e9:.1f} GB/s) with {how.name} ({how.why})")
        self._record(ctx, plan)
        if layout is not None:
            ctx.model.reward_normalization = layout.extras.normalization
            if layout.key_map.unused:
                ctx.note(f"not loaded, the value model does not use them: {listing(layout.key_map.unused)}")

    def _source(self, ctx: BuildContext, reader: Any, device: Any) -> tuple[Any, LoaderChoice, Any]:
        """The reader assignment takes tensors from: instanttensor's read onto the device (the one the
        load stage started before building the architecture, else a new one), or ``reader`` itself."""
        load = ctx.settings("load")
        started, ctx.weights_read = ctx.weights_read, None
        try:
            return device_source(reader, device, load.loader, load.io, started,
                                 check_finite=reads_loaded_weights(ctx.settings("verify"), device))
        except ReadFailed as exc:
            if load.loader != "auto":
                raise
            ctx.warn(f"{exc}; read with safetensors instead")
            return reader, LoaderChoice("safetensors", "instanttensor's read failed"), None

    def _record(self, ctx: BuildContext, plan: LoadPlan) -> None:
        group_of = {n: names for names in plan.tied for n in names}
        label: dict[str, str] = {}
        for source in plan.sources:
            if source in plan.partial_rows:
                old, new = plan.partial_rows[source]
                text = f"{PROVENANCE_CHECKPOINT}+{PROVENANCE_RESIZED}[{old}:{new}]"
            else:
                text = PROVENANCE_CHECKPOINT
            for name in group_of.get(source, [source]):
                label[name] = text
        for name, _ in ctx.model.named_parameters():
            if name in label:
                ctx.report.provenance[name] = label[name]
        if plan.ignored:
            ctx.note(f"ignored as transformers does: {listing(plan.ignored)}")
        if plan.renamed:
            ctx.note(f"legacy names renamed as transformers does: {listing([f'{k} -> {n}' for n, k in plan.renamed.items()])}")
        if plan.partial_rows and not ctx.zero3:
            rows = ", ".join(f"{n}[{old}:{new}]" for n, (old, new) in plan.partial_rows.items())
            ctx.note(f"rows added by resize are not in the checkpoint and are left to materialize: {rows}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [CheckpointStage()]
