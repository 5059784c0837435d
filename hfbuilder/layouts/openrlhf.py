"""OpenRLHF: ``get_llm_for_sequence_regression`` models (openrlhf/models/model.py).

Its ``RewardModel``/``CriticModel`` subclass the family's ``PreTrainedModel``: the body is
``AutoModel`` at ``base_model_prefix`` (``model.`` for Llama) and the head is
``nn.Linear(hidden_size, 1, bias=False)`` at the attribute named ``value_head_prefix``:
``score`` since 2024-12, ``value_head`` before. ``train_rm`` stores that name in
config.json as ``value_head_prefix`` and the reward model's eval ``mean`` and ``std``;
``normalize_reward`` records the training flag. Values are
``head(last_hidden_state).squeeze(-1)``; with normalization on, the reward model
returns ``(r - mean) / std`` in eval mode and the critic normalizes every value.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .base import (
    HEAD_WEIGHT,
    Export,
    Extras,
    KeyMap,
    Layout,
    Shapes,
    body_prefix,
    body_tensors,
    check_written,
    hf_config,
    is_head,
    meta_state_keys,
    save_safetensors,
)

DEFAULT_PREFIX = "score"
OLD_PREFIX = "value_head"
#: What OpenRLHF names its classes, which save_pretrained writes into config.json's architectures.
ARCHITECTURES = ("RewardModel", "CriticModel")


class OpenRLHF(Layout):
    name = "openrlhf"
    framework = "OpenRLHF (get_llm_for_sequence_regression): {value_head_prefix}.weight beside the body"
    keeps_normalization = True

    def _prefix(self, keys: Shapes, config: Mapping[str, Any]) -> tuple[str | None, str]:
        """(head prefix, why) from config.json, or from the head names OpenRLHF has used."""
        prefix = config.get("value_head_prefix")
        if isinstance(prefix, str) and prefix:
            return prefix, f"config.json value_head_prefix={prefix!r}"
        if is_head(keys, f"{OLD_PREFIX}.weight"):
            return OLD_PREFIX, f"{OLD_PREFIX}.weight (OpenRLHF's head name before 'score' became its default)"
        markers = [k for k in ("normalize_reward", "mean", "std") if k in config]
        archs = [a for a in config.get("architectures") or () if a in ARCHITECTURES]
        if is_head(keys, f"{DEFAULT_PREFIX}.weight") and (markers or archs):
            why = ", ".join([f"config.json {m}" for m in markers] + [f"architectures {archs}"] * bool(archs))
            return DEFAULT_PREFIX, f"{why} (written by OpenRLHF)"
        return None, ""

    def detect(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> str | None:
        prefix, why = self._prefix(keys, config)
        if prefix is None or not is_head(keys, f"{prefix}.weight"):
            return None
        return f"{why} and {prefix}.weight {list(keys[f'{prefix}.weight'])}"

    def key_map(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> KeyMap:
        prefix, _ = self._prefix(keys, config)
        prefix = prefix or DEFAULT_PREFIX
        weight = f"{prefix}.weight"
        if weight not in keys:
            raise CheckpointError(f"no OpenRLHF value head: the checkpoint has no {weight!r}")
        return KeyMap(body_prefix(keys, config, {weight}), weight)

    def extras(self, config: Mapping[str, Any]) -> Extras:
        mean, std = config.get("mean"), config.get("std")
        numbers_ = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (mean, std))
        flag = config.get("normalize_reward")
        return Extras(
            normalization=(float(mean), float(std)) if numbers_ else None,
            normalize_reward=flag if isinstance(flag, bool) else None,
        )

    def write(self, out_dir: str, export: Export) -> list[str]:
        base_cls, cfg = hf_config(export.config, "base")
        base_prefix, expected, tied = meta_state_keys(base_cls, cfg)
        prefix = base_prefix + "."  # OpenRLHF puts AutoModel at its PreTrainedModel's base_model_prefix
        state = body_tensors(export, prefix)
        state[f"{DEFAULT_PREFIX}.weight"] = export.tensors[HEAD_WEIGHT].contiguous()
        hidden = tuple(export.tensors[HEAD_WEIGHT].shape)
        wanted = {**{prefix + k: s for k, s in expected.items()}, f"{DEFAULT_PREFIX}.weight": hidden}
        notes = check_written(state, wanted, {prefix + k for k in tied}, "OpenRLHF's model")
        files = save_safetensors(out_dir, state)
        data = cfg.to_dict()
        data.update(architectures=["RewardModel"], value_head_prefix=DEFAULT_PREFIX,
                    normalize_reward=bool(export.extras.normalize_reward))
        if export.extras.normalization is not None:
            data["mean"], data["std"] = export.extras.normalization
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        return notes + [f"wrote {', '.join(files)} ({prefix}* and {DEFAULT_PREFIX}.weight)"]


LAYOUT = OpenRLHF()

__all__ = ["LAYOUT", "OpenRLHF"]
