"""The DeepSpeed config a builder holds: read, checked where hfbuilder relies on it, deep-frozen.

A builder is shared by the actor, reference and critic derived from it, so the config it
holds must not change under them: it is stored deep-frozen, and each build gets its own
plain ``dict`` copy (``deepspeed.initialize`` and ``HfDeepSpeedConfig`` want one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from .errors import BuilderInputError
from .settings import freeze, thaw


def load_ds_config(ds_config: Any) -> Mapping[str, Any]:
    """A DeepSpeed config, deep-frozen: from a mapping or the path of a JSON file, checked."""
    if isinstance(ds_config, Mapping):
        try:
            # thaw: another builder's frozen config is a mapping of mapping proxies
            data = json.loads(json.dumps(thaw(ds_config), allow_nan=False))  # plain data, no NaN
        except (TypeError, ValueError) as exc:
            raise BuilderInputError(f"a DeepSpeed config must be plain JSON data: {exc}") from None
    elif isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        if not os.path.isfile(path):
            raise BuilderInputError(f"DeepSpeed config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
            raise BuilderInputError(f"DeepSpeed config file {path!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BuilderInputError(f"DeepSpeed config file {path!r} must hold a JSON object")
    else:
        raise BuilderInputError(
            f"a DeepSpeed config must be a dict or a JSON file path, got {type(ds_config).__name__}"
        )
    check_ds_config(data)
    return freeze(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a DeepSpeed config can hold")


def check_ds_config(data: Mapping[str, Any]) -> None:
    """Refuse the values hfbuilder would misread: the ZeRO stage and the precision switches."""
    zero = data.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, Mapping):
            raise BuilderInputError(f"DeepSpeed config: zero_optimization must be an object, got {zero!r}")
        if "stage" in zero:
            stage = zero["stage"]
            if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
                raise BuilderInputError(
                    f"DeepSpeed config: zero_optimization.stage must be an int 0, 1, 2 or 3, got {stage!r}"
                )
    for key in ("fp16", "bf16", "bfloat16"):
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise BuilderInputError(f"DeepSpeed config: {key} must be an object, got {section!r}")
        enabled = section.get("enabled", False)
        if not isinstance(enabled, bool) and enabled != "auto":
            raise BuilderInputError(f"DeepSpeed config: {key}.enabled must be true, false or \"auto\", got {enabled!r}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = data.get(key)
        if value is not None and value != "auto" and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise BuilderInputError(f"DeepSpeed config: {key} must be a positive int or \"auto\", got {value!r}")
    clip = data.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)):
        raise BuilderInputError(f"DeepSpeed config: gradient_clipping must be a finite number, got {clip!r}")


def zero_stage_of(ds_config: Mapping[str, Any] | None) -> int | None:
    """The ZeRO stage a DeepSpeed config asks for, or None if it has none."""
    if not ds_config:
        return None
    zero = ds_config.get("zero_optimization")
    if not isinstance(zero, Mapping) or "stage" not in zero:
        return None
    return int(zero["stage"])


__all__ = ["check_ds_config", "load_ds_config", "zero_stage_of"]
