"""The ``zero`` stage: make transformers build under ZeRO-3 for the rest of the build only.

transformers decides whether to partition while it builds a model by looking at a
process-global weak reference to an ``HfDeepSpeedConfig``. DeepSpeed-Chat creates
one and relies on garbage collection to drop it; hfbuilder holds it for exactly the
build and restores whatever was there before, also when a stage raises.

This plugin also implements ``hfbuilder_after_stage``: under ZeRO-3, after every stage,
whatever parameters the stage left unpartitioned (a head, adapters, anything a third-party
stage made) are cast to the config's dtype and partitioned from rank 0's values, so no stage
needs ZeRO-3 code of its own to keep the model consistent. It shows in the report as its own
row, ``after:<stage>``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage
from ..zero3 import (
    check_distributed,
    check_one_dtype,
    ds_dtype_name,
    ensure_distributed,
    listed,
    partition_unpartitioned,
)


@dataclass(frozen=True)
class ZeroSettings(Settings):
    read: Literal["all", "rank0"] = setting(
        "all", option="zero3_read", doc="under ZeRO-3, who reads checkpoint data: each rank its own rows (all), or "
                                        "rank 0 for every rank, scattering the slices (rank0: for storage where one "
                                        "reader beats N)")


class ZeroStage(Stage):
    """With ZeRO-3, activates ``HfDeepSpeedConfig`` until the build ends.

    Any other DeepSpeed config (stage 0, 1 or 2) changes nothing at build time, as in
    DeepSpeed-Chat: those stages partition optimizer state and gradients, which
    ``deepspeed.initialize`` sets up later.
    """

    name = "zero"
    after = ("dropout",)
    Settings = ZeroSettings

    def check(self, ctx: BuildContext) -> None:
        if not ctx.zero3:
            return
        if importlib.util.find_spec("deepspeed") is None:
            raise BuilderInputError("a ZeRO-3 build needs deepspeed installed (pip install deepspeed)")
        wanted = ds_dtype_name(ctx.ds_config)
        given = ctx.settings("load").dtype
        if given not in (None, "auto", wanted):
            raise BuilderInputError(
                f"with_dtype({given!r}) contradicts the ZeRO-3 config, which partitions every parameter in "
                f"{wanted}; drop with_dtype or change the config's bf16/fp16 section"
            )
        check_distributed()

    def explain(self, ctx: BuildContext) -> list[str]:
        ctx.fact("zero3", ctx.zero3)
        if not ctx.zero3:
            return ["ZeRO-3 off" + (" (DeepSpeed config without stage 3)" if ctx.ds_config else "")]
        return [
            f"ZeRO-3 on: HfDeepSpeedConfig active for this build only; parameters partitioned over the ranks, "
            f"dtype {ds_dtype_name(ctx.ds_config)}",
            "after every stage: partition what the stage left unpartitioned (rank 0's values)",
        ]

    def run(self, ctx: BuildContext) -> None:
        ctx.fact("zero3", ctx.zero3)
        if not ctx.zero3:
            ctx.note("ZeRO-3 off")
            return
        ensure_distributed()
        from transformers.integrations import deepspeed as hf_ds

        previous = hf_ds._hf_deepspeed_config_weak_ref

        def restore() -> None:
            hf_ds._hf_deepspeed_config_weak_ref = previous
            ctx.partitioning = False

        ctx.call_on_exit(restore)  # before the constructor sets the global: restored even if it raises
        # transformers holds only a weak reference: the closure below keeps the object alive until restore.
        strong = hf_ds.HfDeepSpeedConfig(ctx.ds_config)
        ctx.call_on_exit(lambda: strong)
        ctx.partitioning = True
        ctx.note(f"HfDeepSpeedConfig active for this build; dtype {ds_dtype_name(ctx.ds_config)}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [ZeroStage()]


@hookimpl
def hfbuilder_after_stage(stage: Stage, ctx: BuildContext) -> list[str] | None:
    """Under ZeRO-3, partition whatever ``stage`` left unpartitioned, so no stage needs ZeRO-3 code."""
    if not ctx.zero3 or stage.name == "zero" or ctx.model is None:
        return None
    dtype = ds_dtype_name(ctx.ds_config)
    if ctx.dry_run:
        added = (ctx.report.stages[-1].facts.get("parameters_added") if ctx.report.stages else None)
        if not added:
            return None
        return [f"ZeRO-3: partition the {added:,} parameters {stage.name!r} adds, in {dtype}, rank 0's values"]
    if not ctx.partitioning or not hasattr(ctx.model, "named_parameters"):
        return None
    names = partition_unpartitioned(ctx.model, ctx.ds_config)
    check_one_dtype(ctx.model, ctx.ds_config, stage.name)
    if not names:
        return None
    return [f"ZeRO-3: partitioned {len(names)} parameter(s) {stage.name!r} left unpartitioned, in {dtype}, "
            f"rank 0's values: {listed(names)}"]


__all__ = ["ZeroStage"]
