"""DeepSpeed-Chat: the ``RewardModel`` state dict itself, in ``pytorch_model.bin``.

Step 2 saves with ``save_hf_format``: ``torch.save(model.state_dict())`` of
``RewardModel(AutoModel)``, so the body is under ``rwtransformer.`` and the head is
``v_head.weight`` ``[1, hidden]`` with no bias, beside the base model's config.json and
the tokenizer's vocabulary files. Step 3 (``create_critic_model``) reads
``pytorch_model.bin`` and nothing else, and only after ``create_hf_model`` resized the
embeddings to ``8 * ceil(len(tokenizer) / 8)`` rows; its ``load_state_dict_into_model``
drops every tensor whose shape differs without a word.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .base import BODY, FOREIGN_CONFIG_KEYS, HEAD_BIAS, HEAD_WEIGHT, Export, KeyMap, Layout, Shapes, model_class

WEIGHTS_NAME = "pytorch_model.bin"


class DeepSpeedChat(Layout):
    name = "dschat"
    framework = "DeepSpeed-Chat step 2 (save_hf_format): RewardModel.state_dict() in pytorch_model.bin"

    def detect(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> str | None:
        if not any(k.startswith(BODY) for k in keys):
            return None
        if HEAD_WEIGHT in keys:
            return f"keys under {BODY} with {HEAD_WEIGHT} {list(keys[HEAD_WEIGHT])}"
        return f"keys under {BODY}, but no {HEAD_WEIGHT} (a strict load will refuse it)"

    def key_map(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> KeyMap:
        # The names are the model's own: a missing head is left to the strict key check to report.
        return KeyMap(BODY, HEAD_WEIGHT, HEAD_BIAS if HEAD_BIAS in keys else None)

    def write(self, out_dir: str, export: Export) -> list[str]:
        import torch

        notes = []
        state = {name: t.contiguous() for name, t in export.tensors.items() if name != HEAD_BIAS}
        torch.save(state, os.path.join(out_dir, WEIGHTS_NAME))
        config = {k: v for k, v in export.config.items() if k not in FOREIGN_CONFIG_KEYS}
        try:  # save_hf_format writes the base model's config, which came from the SFT (causal LM) checkpoint
            config["architectures"] = [model_class(config, "causal-lm").__name__]
        except CheckpointError:  # a model type without a causal LM keeps what it had
            pass
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
        embed = _embedding_rows(state)
        if export.tokenizer_size is not None and embed is not None:
            rows = 8 * math.ceil(export.tokenizer_size / 8)
            if embed[1] != rows:
                notes.append(
                    f"DeepSpeed-Chat resizes the embeddings to 8 * ceil(len(tokenizer) / 8) = {rows} rows before "
                    f"loading, and {embed[0]} has {embed[1]}: its load_state_dict_into_model would skip it silently"
                )
        return notes


def _embedding_rows(state: Mapping[str, Any]) -> tuple[str, int] | None:
    """The input embedding's key and row count, found as the body's first 2-D tensor whose name says so."""
    for name, t in state.items():
        if name.startswith(BODY) and t.dim() == 2 and any(w in name for w in ("embed_tokens", "wte", "embed_in")):
            return name, int(t.shape[0])
    return None


LAYOUT = DeepSpeedChat()
