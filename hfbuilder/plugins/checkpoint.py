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
the assignment live in :mod:`hfbuilder.weights`; this stage reads the options and writes
the notes and provenance.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..context import PROVENANCE_CHECKPOINT, PROVENANCE_RESIZED, BuildContext
from ..errors import BuilderInputError, CheckpointError
from ..hookspecs import hookimpl
from ..stage import Stage
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


class CheckpointStage(Stage):
    """Loads ``options["checkpoint"]`` into the final model; only in the plan when a checkpoint was given.

    Options: ``checkpoint_strict`` (default True; False turns missing/unexpected keys
    into warnings, and the ``materialize`` stage initializes what is missing);
    ``checkpoint_mmap`` (default True; False copies tensors out of the file instead
    of memory-mapping them).
    """

    name = "checkpoint"
    after = ("head", "resize")

    def enabled(self, options: dict[str, Any]) -> bool:
        return options.get("checkpoint") is not None

    def check(self, ctx: BuildContext) -> None:
        # A missing, unknown or malformed checkpoint fails before any work: opening reads and
        # checks every header and the shard index, and no tensor data.
        open_checkpoint(ctx.options["checkpoint"]).close()
        conflict = format_conflict(ctx.options["checkpoint"])
        if conflict:
            ctx.warn(conflict)
        for key in ("checkpoint_strict", "checkpoint_mmap"):
            if not isinstance(ctx.options.get(key, True), bool):
                raise BuilderInputError(f"{key} must be True or False, got {ctx.options[key]!r}")
        if ctx.zero3 and importlib.util.find_spec("hfbuilder.zero3") is None:
            raise CheckpointError(
                "loading a checkpoint under ZeRO-3 needs hfbuilder.zero3.load_checkpoint_into_partitions, "
                "which this installation lacks"
            )

    def explain(self, ctx: BuildContext) -> list[str]:
        fmt, file = find_checkpoint(ctx.options["checkpoint"])
        strict = ctx.options.get("checkpoint_strict", True)
        how = "into ZeRO-3 partitions" if ctx.zero3 else "by assignment onto the meta-device model (mmap, no init)"
        return [f"load every weight from {file} ({fmt}) {how}; {'strict' if strict else 'non-strict'} key matching"]

    def run(self, ctx: BuildContext) -> None:
        reader = open_checkpoint(ctx.options["checkpoint"])
        ctx.call_on_exit(reader.close)
        resized = {id(w): (old, new) for w, old, new in ctx.state.get("resized_rows", ())}
        plan = match_keys(ctx.model, reader, resized)
        strict = bool(ctx.options.get("checkpoint_strict", True))
        for warning in check_plan(plan, strict=strict, source=reader.file, model_name=type(ctx.model).__name__):
            ctx.warn(warning)
        ctx.state["checkpoint_plan"] = plan
        if ctx.zero3:
            from ..zero3 import load_checkpoint_into_partitions

            filled = load_checkpoint_into_partitions(ctx.model, reader, plan, ds_config=ctx.ds_config)
            ctx.report.provenance.update(filled.provenance)
            ctx.note(filled.describe())
        else:
            device = ctx.options.get("device")
            assigned = assign_from_checkpoint(
                ctx.model, plan, reader, device=None if device in (None, "meta") else device,
                keep_dtype=ctx.options.get("dtype") == "auto", mmap=bool(ctx.options.get("checkpoint_mmap", True)),
                source=reader.file)
            ctx.state["pending_rows"] = dict(plan.partial_rows)
            ctx.note(f"assigned {assigned.tensors} tensors ({assigned.bytes / 2**20:.1f} MiB) from {reader.file} "
                     f"({reader.format})")
        self._record(ctx, plan)

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
        if plan.partial_rows:
            rows = ", ".join(f"{n}[{old}:{new}]" for n, (old, new) in plan.partial_rows.items())
            ctx.note(f"rows added by resize are not in the checkpoint and are left to materialize: {rows}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [CheckpointStage()]
