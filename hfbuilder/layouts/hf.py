"""transformers' own classifiers with one label, as reward and critic models.

``hf-seqcls``: ``*ForSequenceClassification`` with ``num_labels=1`` (reward models on the
Hub, torchtune's reward checkpoints saved by its HF checkpointer): the body at
``base_model_prefix`` and ``score = Linear(hidden, 1, bias=False)``; transformers scores
the rightmost token that is not ``pad_token_id``.

``hf-tokencls``: ``*ForTokenClassification`` with ``num_labels=1`` (the critics of verl,
NeMo-RL and AReaL): the same body, ``Linear(hidden, 1)`` with a bias (``score`` in most
decoder families, ``classifier`` in GPT-2 and GPT-NeoX) after a dropout, one value per token.

The head's name comes from the class itself, built on the meta device, so every family
transformers has is written under the names its ``from_pretrained`` expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .base import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    Export,
    KeyMap,
    Layout,
    Shapes,
    base_model_prefix,
    body_prefix,
    body_tensors,
    check_written,
    hf_config,
    is_bias,
    is_head,
    meta_state_keys,
    save_safetensors,
)


class HfClassifier(Layout):
    #: the architecture name's ending, and the kind of transformers class.
    suffix: str = ""
    kind: str = ""

    def _head(self, keys: Shapes, config: Mapping[str, Any]) -> tuple[list[str], str, str | None] | None:
        archs = [a for a in config.get("architectures") or () if isinstance(a, str) and a.endswith(self.suffix)]
        if not archs:
            return None
        prefix = base_model_prefix(config)
        outside = [k for k in keys if not (prefix and k.startswith(prefix + "."))]
        weights = [k for k in outside if k.endswith(".weight") and is_head(keys, k)]
        if len(weights) != 1:
            return None
        bias = weights[0].removesuffix("weight") + "bias"
        return archs, weights[0], bias if is_bias(keys, bias) else None

    def detect(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> str | None:
        found = self._head(keys, config)
        if found is None:
            return None
        archs, weight, bias = found
        head = f"{weight} {list(keys[weight])}" + (f" and {bias} [1]" if bias else "")
        return f"config.json architectures {archs} and {head}"

    def key_map(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> KeyMap:
        found = self._head(keys, config)
        if found is None:
            raise CheckpointError(
                f"no {self.name} head: config.json architectures must name a *{self.suffix} class, and the "
                f"checkpoint must hold one [1, hidden] head weight outside the body "
                f"(architectures {config.get('architectures')})"
            )
        _, weight, bias = found
        return KeyMap(body_prefix(keys, config, {weight, bias or weight}), weight, bias)

    def write(self, out_dir: str, export: Export) -> list[str]:
        cls, cfg = hf_config(export.config, self.kind, num_labels=1)
        notes = []
        if getattr(cfg, "pad_token_id", None) is None and export.pad_token_id is not None:
            cfg.pad_token_id = export.pad_token_id
            notes.append(f"pad_token_id set to the tokenizer's ({export.pad_token_id}): transformers pools "
                         "at the last token that is not padding, and needs it for batches")
        prefix, expected, tied = meta_state_keys(cls, cfg)
        head = [k for k in expected if not k.startswith(prefix + ".")]
        weight = next((k for k in head if k.endswith(".weight")), None)
        if weight is None:
            raise CheckpointError(f"cannot find the head of {cls.__name__}: its keys outside {prefix}. are {head}")
        state = body_tensors(export, prefix + ".")
        state[weight] = export.tensors[HEAD_WEIGHT].contiguous()
        bias = weight.removesuffix("weight") + "bias"
        if bias in expected:
            value = export.tensors.get(HEAD_BIAS)
            if value is None:
                import torch

                value = torch.zeros(1, dtype=state[weight].dtype)
                notes.append(f"{bias} written as 0: the source head has no bias")
            state[bias] = value.contiguous()
        notes += check_written(state, expected, tied, cls.__name__)
        files = save_safetensors(out_dir, state)
        cfg.to_json_file(f"{out_dir}/config.json")
        return notes + [f"wrote {', '.join(files)} for {cls.__name__} (num_labels=1, head {weight})"]


class HfSequenceClassification(HfClassifier):
    name = "hf-seqcls"
    framework = "transformers *ForSequenceClassification, num_labels=1 (Hub reward models, torchtune)"
    suffix = "ForSequenceClassification"
    kind = "seqcls"


class HfTokenClassification(HfClassifier):
    name = "hf-tokencls"
    framework = "transformers *ForTokenClassification, num_labels=1 (verl, NeMo-RL and AReaL critics)"
    suffix = "ForTokenClassification"
    kind = "tokencls"
    head_bias = True


SEQCLS = HfSequenceClassification()
TOKENCLS = HfTokenClassification()

__all__ = ["SEQCLS", "TOKENCLS", "HfClassifier", "HfSequenceClassification", "HfTokenClassification"]
