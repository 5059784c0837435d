"""The ``load`` stage: make the model, with or without its pretrained weights."""

from __future__ import annotations

import copy
from typing import Any

from ..context import PROVENANCE_PRETRAINED, PROVENANCE_UNINITIALIZED, BuildContext
from ..hookspecs import hookimpl
from ..stage import Stage


def torch_dtype(name: Any) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` and None pass through."""
    if name is None or name == "auto" or not isinstance(name, str):
        return name
    import torch

    return getattr(torch, name)


class LoadStage(Stage):
    """``from_pretrained`` (straight onto ``options["device"]`` when set), or, with deferred
    weights, the architecture alone: on the meta device without ZeRO-3, so no time is
    spent initializing weights that a checkpoint will overwrite.
    """

    name = "load"
    after = ("zero",)

    def explain(self, ctx: BuildContext) -> list[str]:
        cls = getattr(ctx.model_class, "__name__", str(ctx.model_class))
        dtype = ctx.options.get("dtype") or "transformers' default (auto)"
        device = ctx.options.get("device") or "cpu"
        if ctx.options.get("deferred"):
            return [f"{cls}.from_config: architecture only, weights deferred; dtype {dtype}"]
        return [f"{cls}.from_pretrained({ctx.model_name_or_path!r}); dtype {dtype}; device {device}"]

    def run(self, ctx: BuildContext) -> None:
        config = copy.deepcopy(ctx.config)  # from_config/from_pretrained mutate the config they get
        dtype = torch_dtype(ctx.options.get("dtype"))
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        if ctx.options.get("deferred"):
            ctx.model = self._architecture(ctx, config, kwargs)
            return
        if ctx.zero3 and ctx.options.get("zero3_partition_loader", True):
            from ..zero3 import load_pretrained_partitioned

            # Each rank reads only the safetensors rows of its own partitions; None: use from_pretrained.
            model = load_pretrained_partitioned(ctx, config, dtype)
            if model is not None:
                ctx.model = model
                ctx.note(f"{type(model).__name__} built partitioned, no weight init; filled from {ctx.model_name_or_path}")
                return
        device = ctx.options.get("device")
        if device and not ctx.zero3:
            kwargs["device_map"] = device
        model, info = ctx.model_class.from_pretrained(
            ctx.model_name_or_path, config=config, output_loading_info=True, **kwargs
        )
        ctx.model = model
        missing = sorted(info.get("missing_keys") or [])
        mismatched = info.get("mismatched_keys") or []
        for name, _ in model.named_parameters():
            ctx.report.provenance[name] = PROVENANCE_PRETRAINED
        if missing or mismatched:
            from ..context import PROVENANCE_INITIALIZED

            for name in missing:
                ctx.report.provenance[name] = PROVENANCE_INITIALIZED
            ctx.warn(
                f"{ctx.model_name_or_path} lacks weights for {missing + [m[0] for m in mismatched]}; "
                "transformers initialized them randomly"
            )
        ctx.note(
            f"{type(model).__name__}.from_pretrained: {sum(p.numel() for p in model.parameters()):,} "
            f"parameters, dtype {next(model.parameters()).dtype}, device {next(model.parameters()).device}"
        )

    def _architecture(self, ctx: BuildContext, config: Any, kwargs: dict[str, Any]) -> Any:
        if ctx.zero3:
            # transformers' from_config builds under deepspeed.zero.Init, partitioned.
            model = ctx.model_class.from_config(config, **kwargs)
            ctx.note(f"{type(model).__name__}.from_config under zero.Init (weights deferred)")
        else:
            from accelerate import init_empty_weights

            # Parameters on the meta device, buffers (rotary inv_freq...) real: no init work.
            with init_empty_weights(include_buffers=False):
                model = ctx.model_class.from_config(config, **kwargs)
            ctx.state["meta_build"] = True
            ctx.note(f"{type(model).__name__}.from_config on the meta device: no weight init spent")
        for name, _ in model.named_parameters():
            ctx.report.provenance[name] = PROVENANCE_UNINITIALIZED
        return model


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [LoadStage()]
