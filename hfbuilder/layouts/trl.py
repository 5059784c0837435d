"""TRL's ``AutoModelForCausalLMWithValueHead``, and LLaMA-Factory's copy of it in two files.

``trl``: ``save_pretrained`` of the wrapper saves the causal LM's state dict (``model.*``,
``lm_head.weight``) plus ``v_head.summary.weight`` ``[1, hidden]`` and
``v_head.summary.bias`` ``[1]`` in one checkpoint. Values are
``summary(dropout(hidden_states[-1]))``, the hidden state cast to the head's dtype first.

``llamafactory``: ``fix_valuehead_checkpoint`` splits the same state dict: the causal LM
goes through ``save_pretrained``, the two head tensors into ``value_head.safetensors``
(``value_head.bin`` without safetensors) beside it; ``load_valuehead_params`` reads them
back into TRL's wrapper.

The LM head is not part of the value model; it is kept aside so that a conversion to
either layout can write it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from ..weights import CheckpointReader
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
    is_head,
    meta_state_keys,
    save_safetensors,
)

WEIGHT, BIAS = "v_head.summary.weight", "v_head.summary.bias"
SIDE_FILES = ("value_head.safetensors", "value_head.bin")
_LM_HEADS = ("lm_head.", "embed_out.")


def _key_map(keys: Shapes, config: Mapping[str, Any], files: tuple[str, ...] = ()) -> KeyMap:
    head = {WEIGHT, BIAS}
    prefix = base_model_prefix(config)
    unused = tuple(
        k for k in keys
        if k not in head and (k.startswith(_LM_HEADS) or (prefix and not k.startswith(prefix + ".")))
    )
    return KeyMap(body_prefix(keys, config, head | set(unused)), WEIGHT, BIAS if BIAS in keys else None,
                  unused, files)


def _head_text(keys: Shapes) -> str:
    return f"{WEIGHT} {list(keys[WEIGHT])}" + (f" and {BIAS} {list(keys[BIAS])}" if BIAS in keys else "")


def _causal_lm_state(export: Export) -> tuple[dict[str, Any], Any, list[str]]:
    """The causal LM's tensors (body and, when the source had it, the LM head), its config, notes."""
    cls, cfg = hf_config(export.config, "causal-lm")
    prefix, expected, tied = meta_state_keys(cls, cfg)
    state = body_tensors(export, prefix + ".")
    state.update({k: t.contiguous() for k, t in export.unused.items() if k in expected})
    notes = check_written(state, expected, tied, cls.__name__)
    return state, cfg, notes


def _head_state(export: Export) -> dict[str, Any]:
    weight = export.tensors[HEAD_WEIGHT].contiguous()
    bias = export.tensors.get(HEAD_BIAS)
    if bias is None:  # convert() adds a zero bias and says so; this keeps write() whole on its own
        import torch

        bias = torch.zeros(1, dtype=weight.dtype)
    return {WEIGHT: weight, BIAS: bias.contiguous()}


class Trl(Layout):
    name = "trl"
    framework = "TRL AutoModelForCausalLMWithValueHead.save_pretrained: v_head.summary.* beside the causal LM"
    head_bias = True

    def detect(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> str | None:
        if not is_head(keys, WEIGHT):
            return None
        return f"{_head_text(keys)} beside the causal LM's keys, in the same checkpoint"

    def key_map(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> KeyMap:
        if WEIGHT not in keys:
            raise CheckpointError(f"no TRL value head: the checkpoint has no {WEIGHT!r}")
        return _key_map(keys, config)

    def write(self, out_dir: str, export: Export) -> list[str]:
        state, cfg, notes = _causal_lm_state(export)
        state.update(_head_state(export))
        files = save_safetensors(out_dir, state)
        cfg.to_json_file(os.path.join(out_dir, "config.json"))
        return notes + [f"wrote {', '.join(files)}: {type(cfg).__name__} causal LM with {WEIGHT} and {BIAS}"]


def side_file(folder: str | None) -> str | None:
    """LLaMA-Factory's value-head file in ``folder``, safetensors first as its loader reads them."""
    if folder is None:
        return None
    return next((os.path.join(folder, n) for n in SIDE_FILES if os.path.isfile(os.path.join(folder, n))), None)


def _side_shapes(path: str) -> dict[str, tuple[int, ...]]:
    with CheckpointReader(path) as reader:
        return {k: reader.info(k).shape for k in reader.keys()}


class LlamaFactory(Layout):
    name = "llamafactory"
    framework = "LLaMA-Factory (fix_valuehead_checkpoint): the causal LM plus value_head.safetensors"
    head_bias = True

    def detect(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> str | None:
        side = side_file(folder)
        if side is None:
            return None
        shapes = _side_shapes(side)
        if not is_head(shapes, WEIGHT):
            return None
        return f"{os.path.basename(side)} holds {_head_text(shapes)}, beside the causal LM"

    def key_map(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> KeyMap:
        side = side_file(folder)
        if side is None:
            raise CheckpointError(f"no LLaMA-Factory value head: neither of {SIDE_FILES} is in {folder!r}")
        shapes = _side_shapes(side)
        if WEIGHT not in shapes:
            raise CheckpointError(f"{side} has no {WEIGHT!r}; it holds {sorted(shapes)}")
        return _key_map({**keys, **shapes}, config, (side,))

    def write(self, out_dir: str, export: Export) -> list[str]:
        from safetensors.torch import save_file

        state, cfg, notes = _causal_lm_state(export)
        files = save_safetensors(out_dir, state)
        save_file(_head_state(export), os.path.join(out_dir, SIDE_FILES[0]), metadata={"format": "pt"})
        cfg.to_json_file(os.path.join(out_dir, "config.json"))
        return notes + [f"wrote {', '.join(files)} ({type(cfg).__name__}) and {SIDE_FILES[0]} ({WEIGHT}, {BIAS})"]


TRL = Trl()
LLAMAFACTORY = LlamaFactory()

__all__ = ["LLAMAFACTORY", "SIDE_FILES", "TRL", "LlamaFactory", "Trl", "side_file"]
