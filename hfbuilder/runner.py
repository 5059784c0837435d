"""The one loop that runs a plan, for ``build()`` and ``explain()`` alike.

Every stage's ``check`` runs before any stage's work, so a bad input fails before a weight is
read. Then each stage runs (or, in a dry run, explains itself), followed by the
``hfbuilder_after_stage`` implementations as a row of their own. ``build`` ends with the
invariants of :mod:`hfbuilder.verify`.
"""

from __future__ import annotations

import time
from typing import Any

from .context import BuildContext, BuildReport, StageRecord
from .errors import HFBuilderError, blame_stage
from .explain import Explanation, StageExplanation, default_world_size, estimate_memory
from .manager import Plugins
from .ordering import Entry
from .verify import carry_provenance, finish_build, parameter_ids


def build(plugins: Plugins, order: list[Entry], ctx: BuildContext) -> tuple[Any, BuildReport]:
    """Check every stage, run them in order, verify the model; return it with the report."""
    from .weights.binfile import shared_reads

    start = time.perf_counter()
    try:
        ctx.enter_context(shared_reads())  # a .bin that checks and stages all open is unpickled once
        for entry in order:
            ctx.current_stage = entry.name
            _guard(entry, "check", entry.stage.check, ctx)
        before = parameter_ids(ctx.model)
        for entry in order:
            ctx.current_stage = entry.name
            ctx.report.stages.append(StageRecord(entry.name, entry.provider))
            _guard(entry, "run", plugins.run_stage, entry.stage, ctx)
            before = carry_provenance(ctx, before)
            if after_stage(plugins, entry, ctx) is not None:
                before = parameter_ids(ctx.model)  # a hook acted: it may have replaced parameters
        ctx.current_stage = None
        if ctx.model is not None:
            finish_build(ctx)
    finally:
        ctx.current_stage = None
        ctx.close()
    ctx.report.total_seconds = time.perf_counter() - start
    if ctx.model is None:
        raise HFBuilderError(f"the build finished without a model: no stage set ctx.model (plan: {ctx.report.plan})")
    return ctx.model, ctx.report


def explain(plugins: Plugins, order: list[Entry], ctx: BuildContext, world_size: int | None) -> Explanation:
    """The dry run: every check (failures collected, not raised), then every stage's ``explain``."""
    from .weights.binfile import shared_reads

    ctx.dry_run = True
    failed: dict[str, HFBuilderError] = {}
    stages: list[StageExplanation] = []
    try:
        ctx.enter_context(shared_reads())
        for entry in order:
            ctx.current_stage = entry.name
            try:
                _guard(entry, "check", entry.stage.check, ctx)
            except HFBuilderError as exc:
                failed[entry.name] = exc
        stopped: str | None = None
        for entry in order:
            ctx.current_stage = entry.name
            record = StageRecord(entry.name, entry.provider)
            ctx.report.stages.append(record)
            seen = len(ctx.report.warnings)
            lines: list[str] = []
            if stopped is None:
                try:
                    lines = list(_guard(entry, "explain", entry.stage.explain, ctx) or [])
                except HFBuilderError as exc:
                    failed.setdefault(entry.name, exc)
                    stopped = entry.name
            else:
                lines = [f"not explained: stage {stopped!r} could not be explained"]
            error = failed.get(entry.name)
            stages.append(StageExplanation(
                entry.name, entry.provider, record.actions + [str(x) for x in lines], record.facts,
                ctx.report.warnings[seen:], str(error) if error is not None else None,
            ))
            if stopped is None:
                seen = len(ctx.report.warnings)
                after = after_stage(plugins, entry, ctx)
                if after is not None:
                    stages.append(StageExplanation(
                        after.name, after.provider, after.actions, after.facts, ctx.report.warnings[seen:], None
                    ))
    finally:
        ctx.current_stage = None
        ctx.close()
    return Explanation(
        model_class=getattr(ctx.model_class, "__name__", repr(ctx.model_class)),
        model_name_or_path=ctx.model_name_or_path,
        plan=[e.name for e in order],
        stages=stages,
        zero3=ctx.zero3,
        invariants=ctx.settings("verify").invariants,
        expectations=[f"{e.pattern!r} from {e.source} ({e.by})" for e in ctx.report.expectations],
        memory=estimate_memory(stages, ctx.zero3, world_size or default_world_size()),
        exceptions=list(failed.values()),
    )


def after_stage(plugins: Plugins, entry: Entry, ctx: BuildContext) -> StageRecord | None:
    """Run the ``hfbuilder_after_stage`` implementations as a report row of their own, if any acted."""
    name = f"after:{entry.name}"
    record = StageRecord(name, "")
    ctx.report.stages.append(record)
    ctx.current_stage = name
    start = time.perf_counter()
    done = plugins.after_stage(entry.stage, ctx)
    record.seconds = time.perf_counter() - start
    ctx.current_stage = entry.name
    if not done:
        ctx.report.stages.remove(record)
        return None
    record.provider = ", ".join(plugin for plugin, _ in done)
    record.actions.extend(line for _, lines in done for line in lines)
    return record


def _guard(entry: Entry, what: str, fn: Any, *args: Any) -> Any:
    """Run a stage's ``check``/``explain``/``run``; an error names the stage and its plugin."""
    try:
        return fn(*args)
    except Exception as exc:
        blamed = blame_stage(exc, entry.name, entry.provider, what)
        if blamed is exc:
            raise
        raise blamed from exc


__all__ = ["after_stage", "build", "explain"]
