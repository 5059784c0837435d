"""The RLHF phases: DeepSpeed-Chat's three steps as named bundles of builder settings.

``builder.for_phase(name, **options)`` looks the phase up through the
``hfbuilder_phases`` hook; a plugin that returns a phase with the same name
replaces the built-in one. A phase only sets options, heads and stages on the
builder it gets, so the result can still be changed (``.without_stage(...)``...).

================  =====================  ===============================================
phase             DeepSpeed-Chat step    what it sets
================  =====================  ===============================================
``sft``           1 (actor SFT)          the six core stages (``create_hf_model``)
``reward``        2 (reward model)       reward head on the pretrained base, trainable
``actor``         3                      causal LM from the SFT output, actor dropout
``reference``     3                      like ``actor``, frozen, eval mode, dropout 0
``critic``        3                      reward head, deferred weights, step-2 checkpoint
``reward_eval``   3                      like ``critic``, frozen, eval mode, dropout 0
================  =====================  ===============================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..stage import Phase

if TYPE_CHECKING:  # pragma: no cover
    from ..builder import ModelBuilder


def _take(phase: str, options: dict[str, Any], allowed: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise BuilderInputError(f"phase {phase!r} has no option(s) {unknown}; it takes {sorted(allowed)}")
    return {**allowed, **options}


def _common(builder: ModelBuilder, o: dict[str, Any]) -> ModelBuilder:
    if o.get("model_name_or_path") is not None:
        path = o["model_name_or_path"]
        if not isinstance(path, (str, os.PathLike)):
            raise BuilderInputError(f"model_name_or_path must be a path, got {path!r}")
        builder = replace(builder, model_name_or_path=os.fspath(path))
    if o.get("dropout") is not None:
        builder = builder.with_dropout(o["dropout"])
    if o.get("lora") is not None:
        if not isinstance(o["lora"], Mapping):
            raise BuilderInputError(f"lora must be a dict of with_lora() arguments, got {o['lora']!r}")
        builder = builder.with_lora(**o["lora"])
    return builder


_LM = {"model_name_or_path": None, "dropout": None, "lora": None}
_HEAD = {**_LM, "num_padding_at_beginning": 0, "compute_fp32_loss": False}


def _reward_head(builder: ModelBuilder, o: dict[str, Any]) -> ModelBuilder:
    return builder.with_head(
        "reward", num_padding_at_beginning=o["num_padding_at_beginning"], compute_fp32_loss=o["compute_fp32_loss"]
    )


class SftPhase(Phase):
    name = "sft"
    description = "step 1: the causal LM to fine-tune (DeepSpeed-Chat's create_hf_model)"

    def apply(self, builder: ModelBuilder, **options: Any) -> ModelBuilder:
        return _common(builder, _take(self.name, options, _LM))


class RewardPhase(Phase):
    name = "reward"
    description = "step 2: the pretrained base model with a fresh reward head, to be trained"

    def apply(self, builder: ModelBuilder, **options: Any) -> ModelBuilder:
        o = _take(self.name, options, _HEAD)
        return _reward_head(_common(builder, o), o)


class ActorPhase(Phase):
    name = "actor"
    description = "step 3: the actor, a causal LM from the SFT output with the actor's dropout"

    def apply(self, builder: ModelBuilder, **options: Any) -> ModelBuilder:
        return _common(builder, _take(self.name, options, _LM))


class ReferencePhase(Phase):
    name = "reference"
    description = "step 3: the reference model, the SFT output frozen in eval mode with dropout 0"

    def apply(self, builder: ModelBuilder, **options: Any) -> ModelBuilder:
        o = _take(self.name, options, {"model_name_or_path": None})
        return _common(builder, o).with_dropout(0.0).frozen()


class CriticPhase(Phase):
    name = "critic"
    description = "step 3: the critic, the step-2 reward model loaded from its checkpoint (deferred weights)"

    def apply(self, builder: ModelBuilder, **options: Any) -> ModelBuilder:
        o = _take(self.name, options, {**_HEAD, "checkpoint": None, "layout": "auto"})
        builder = _reward_head(_common(builder, o), o)
        return builder.with_checkpoint(o["checkpoint"], layout=o["layout"])  # None: the (new) model_name_or_path


class RewardEvalPhase(Phase):
    name = "reward_eval"
    description = "step 3: the reward model that scores rollouts; like critic, frozen in eval mode with dropout 0"

    def apply(self, builder: ModelBuilder, **options: Any) -> ModelBuilder:
        allowed = {k: v for k, v in _HEAD.items() if k not in ("dropout", "lora")}
        o = _take(self.name, options, {**allowed, "checkpoint": None, "layout": "auto"})
        builder = _reward_head(_common(builder, o), o)
        return builder.with_checkpoint(o["checkpoint"], layout=o["layout"]).with_dropout(0.0).frozen()


PHASES: tuple[type[Phase], ...] = (SftPhase, RewardPhase, ActorPhase, ReferencePhase, CriticPhase, RewardEvalPhase)


@hookimpl
def hfbuilder_phases() -> list[Phase]:
    return [cls() for cls in PHASES]
