"""The RLHF phases: DeepSpeed-Chat's three steps as named bundles of builder settings.

``builder.for_phase(name, **options)`` looks the phase up through the
``hfbuilder_phases`` hook; a plugin that returns a phase with the same name
replaces the built-in one. A phase is data: settings per stage and a head, which the builder
applies, so the result can still be changed (``.without_stage(...)``...).

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

from ..hookspecs import hookimpl
from ..stage import Phase

#: What every phase takes: another model path, the dropout, LoRA adapters (a dict of with_lora arguments).
_LM = ("model_name_or_path", "dropout", "lora")
#: The reward head's options, with DeepSpeed-Chat's defaults.
_REWARD = {"num_padding_at_beginning": 0, "compute_fp32_loss": False}
_EVAL = {"dropout": {"p": 0.0}, "freeze": {"enabled": True}}

PHASES: tuple[Phase, ...] = (
    Phase("sft", "step 1: the causal LM to fine-tune (DeepSpeed-Chat's create_hf_model)", parameters=_LM),
    Phase("reward", "step 2: the pretrained base model with a fresh reward head, to be trained",
          head="reward", head_options=_REWARD, parameters=_LM),
    Phase("actor", "step 3: the actor, a causal LM from the SFT output with the actor's dropout", parameters=_LM),
    Phase("reference", "step 3: the reference model, the SFT output frozen in eval mode with dropout 0",
          settings=_EVAL, parameters=("model_name_or_path",)),
    Phase("critic", "step 3: the critic, the step-2 reward model loaded from its checkpoint (deferred weights)",
          head="reward", head_options=_REWARD, checkpoint=True, parameters=(*_LM, "checkpoint", "layout")),
    Phase("reward_eval", "step 3: the reward model that scores rollouts; like critic, frozen in eval mode with "
          "dropout 0", settings=_EVAL, head="reward", head_options=_REWARD, checkpoint=True,
          parameters=("model_name_or_path", "checkpoint", "layout")),
)


@hookimpl
def hfbuilder_phases() -> list[Phase]:
    return list(PHASES)
