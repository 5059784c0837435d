"""The ``zero`` stage: make transformers build under ZeRO-3 for the rest of the build only.

transformers decides whether to partition while it builds a model by looking at a
process-global weak reference to an ``HfDeepSpeedConfig``. DeepSpeed-Chat creates
one and relies on garbage collection to drop it; hfbuilder holds it for exactly the
build and restores whatever was there before, also when a stage raises.
"""

from __future__ import annotations

import os
from typing import Any

from ..context import BuildContext
from ..errors import DistributedSetupError
from ..hookspecs import hookimpl
from ..stage import Stage

LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def zero3_dtype(ds_config: dict[str, Any]) -> str:
    """The parameter dtype a DeepSpeed config trains in: bfloat16, float16 or float32."""
    for key, dtype in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16")):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled") in (True, "auto"):
            return dtype
    return "float32"


def ensure_distributed() -> None:
    """Initialize torch.distributed through DeepSpeed if the caller has not."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            "ZeRO-3 needs torch.distributed, which is not initialized, and the environment lacks "
            f"{', '.join(missing)}. Launch with `deepspeed` or `torchrun`, call "
            "deepspeed.init_distributed() first, or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE "
            "and LOCAL_RANK (e.g. 127.0.0.1, 29500, 0, 1, 0 for one process)."
        )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend) if backend else deepspeed.init_distributed()


class ZeroStage(Stage):
    """With ZeRO-3, activates ``HfDeepSpeedConfig`` until the build ends."""

    name = "zero"
    after = ("dropout",)

    def check(self, ctx: BuildContext) -> None:
        if not ctx.zero3:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            missing = [v for v in LAUNCHER_VARS if v not in os.environ]
            if missing:
                ensure_distributed()  # raises the DistributedSetupError naming what to set

    def explain(self, ctx: BuildContext) -> list[str]:
        ctx.fact("zero3", ctx.zero3)
        if not ctx.zero3:
            return ["ZeRO-3 off" + (" (DeepSpeed config without stage 3)" if ctx.ds_config else "")]
        ctx.options.setdefault("dtype", zero3_dtype(ctx.ds_config))  # as run() does, for the later stages
        return [
            f"ZeRO-3 on: HfDeepSpeedConfig active for this build only; parameters partitioned over the ranks, "
            f"dtype {ctx.options['dtype']}"
        ]

    def run(self, ctx: BuildContext) -> None:
        ctx.fact("zero3", ctx.zero3)
        if not ctx.zero3:
            ctx.note("ZeRO-3 off")
            return
        ensure_distributed()
        from transformers.integrations import deepspeed as hf_ds

        previous = hf_ds._hf_deepspeed_config_weak_ref
        dschf = hf_ds.HfDeepSpeedConfig(ctx.ds_config)  # sets the global weak reference
        ctx.state["hf_deepspeed_config"] = dschf  # the strong reference that keeps it alive

        def restore() -> None:
            hf_ds._hf_deepspeed_config_weak_ref = previous
            ctx.state.pop("hf_deepspeed_config", None)

        ctx.call_on_exit(restore)
        ctx.options.setdefault("dtype", zero3_dtype(ctx.ds_config))
        ctx.note(f"HfDeepSpeedConfig active for this build; dtype {ctx.options['dtype']}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [ZeroStage()]
