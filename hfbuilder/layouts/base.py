"""What a reward/critic checkpoint layout is, and the pieces every layout shares.

Each RLHF framework stores the same model, a transformer body and a ``Linear(hidden, 1)``
value head, under its own names. A :class:`Layout` knows one framework's names: it
recognizes them (``detect``), maps them onto hfbuilder's ``RewardModel`` names
(``key_map``: ``rwtransformer.*``, ``v_head.weight`` and, when the source has one,
``v_head.bias``), reads the framework's metadata (``extras``) and writes the model back
in the framework's own way (``write``). Layouts are registered through the
``hfbuilder_reward_layouts`` hook, so a third party adds one as it adds a stage.

torch and transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError

BODY = "rwtransformer."
HEAD_WEIGHT = "v_head.weight"
HEAD_BIAS = "v_head.bias"

#: config.json keys that belong to one framework's head or metadata, not to the transformer.
FOREIGN_CONFIG_KEYS = ("value_head_prefix", "normalize_reward", "mean", "std")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class KeyMap:
    """Where a checkpoint keeps the body and the head, in its own key names."""

    #: prefix of the transformer body's keys ("model.", "transformer.", "rwtransformer.", "").
    backbone: str
    #: key of the head's ``[1, hidden]`` weight.
    weight: str
    #: key of its ``[1]`` bias, when the head has one.
    bias: str | None = None
    #: keys the value model does not use (a causal LM's ``lm_head.weight``), kept for conversions.
    unused: tuple[str, ...] = ()
    #: weight files besides the main checkpoint that hold some of these keys.
    files: tuple[str, ...] = ()

    def to_model(self, key: str) -> str | None:
        """The ``RewardModel`` name of ``key``; None for unused keys; ``key`` itself when it fits nowhere."""
        if key == self.weight:
            return HEAD_WEIGHT
        if key == self.bias:
            return HEAD_BIAS
        if key in self.unused:
            return None
        if key.startswith(self.backbone):
            return BODY + key[len(self.backbone):]
        return key  # left as it is, so a strict load names it as unexpected

    def to_source(self, name: str) -> str:
        if name == HEAD_WEIGHT:
            return self.weight
        if name == HEAD_BIAS:
            if self.bias is None:
                raise KeyError(name)
            return self.bias
        if name.startswith(BODY):
            return self.backbone + name[len(BODY):]
        raise KeyError(name)

    @property
    def renames(self) -> bool:
        """Whether any key differs from the ``RewardModel`` name it loads into."""
        return self.backbone != BODY or self.weight != HEAD_WEIGHT or self.bias not in (None, HEAD_BIAS)

    def describe(self) -> str:
        body = f"{self.backbone}* -> {BODY}*" if self.backbone != BODY else f"{BODY}* as they are"
        head = f"{self.weight} -> {HEAD_WEIGHT}" + (f", {self.bias} -> {HEAD_BIAS}" if self.bias else "")
        return f"{body}; {head}"


@dataclass(frozen=True)
class Extras:
    """A framework's metadata about the head's outputs."""

    #: OpenRLHF's ``(mean, std)`` of the rewards on its eval set; its models compute ``(r - mean) / std``.
    normalization: tuple[float, float] | None = None
    #: whether training had OpenRLHF's ``normalize_reward`` on (None: unknown).
    normalize_reward: bool | None = None


@dataclass(frozen=True)
class Export:
    """Everything a layout's ``write`` gets: the value model's tensors, and what else is known."""

    #: ``RewardModel`` names -> tensors: ``rwtransformer.*``, ``v_head.weight``, ``v_head.bias`` if any.
    tensors: Mapping[str, Any]
    #: the source's config.json, without other frameworks' keys.
    config: Mapping[str, Any]
    extras: Extras = field(default_factory=Extras)
    #: source tensors the value model does not use, by their Hugging Face name (``lm_head.weight``).
    unused: Mapping[str, Any] = field(default_factory=dict)
    #: ``len(tokenizer)`` and its pad id, when the source has a tokenizer.
    tokenizer_size: int | None = None
    pad_token_id: int | None = None


class Layout:
    """One framework's way to store a reward/critic model. Subclass and set ``name``."""

    #: the name ``layout=`` and ``--to``/``--from`` take.
    name: str = ""
    #: who writes it and where, one line (shown by explain and the docs).
    framework: str = ""
    #: whether the head this layout writes has a bias.
    head_bias: bool = False
    #: whether the layout has a place for :class:`Extras` normalization.
    keeps_normalization: bool = False

    def detect(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> str | None:
        """A short sentence of evidence that the checkpoint follows this layout, or None."""
        raise NotImplementedError

    def key_map(self, keys: Shapes, config: Mapping[str, Any], folder: str | None) -> KeyMap:
        """The checkpoint's key map; :class:`CheckpointError` when its head is not there."""
        raise NotImplementedError

    def extras(self, config: Mapping[str, Any]) -> Extras:
        return Extras()

    def write(self, out_dir: str, export: Export) -> list[str]:
        """Write the model into the (empty) ``out_dir`` as the framework does; return notes."""
        raise NotImplementedError(f"layout {self.name!r} can be read but not written")

    def __repr__(self) -> str:
        return f"<Layout {self.name}>"


# -- helpers the built-in layouts share -------------------------------------------------


def is_head(keys: Shapes, key: str) -> bool:
    """``key`` is a ``[1, hidden]`` matrix: a scalar head's weight."""
    shape = keys.get(key)
    return shape is not None and len(shape) == 2 and shape[0] == 1


def is_bias(keys: Shapes, key: str) -> bool:
    shape = keys.get(key)
    return shape is not None and tuple(shape) == (1,)


def body_prefix(keys: Shapes, config: Mapping[str, Any], exclude: set[str]) -> str:
    """The prefix of the transformer body's keys: the model class's ``base_model_prefix`` when every
    body key carries it (``model.``, ``transformer.``, ``gpt_neox.``), else none (a bare base model)."""
    body = [k for k in keys if k not in exclude]
    prefix = base_model_prefix(config)
    if prefix and body and all(k.startswith(prefix + ".") for k in body):
        return prefix + "."
    if prefix is None:  # no config: one leading component shared by every key
        firsts = {k.partition(".")[0] for k in body}
        if len(firsts) == 1 and all("." in k for k in body):
            return firsts.pop() + "."
    return ""


def model_class(config: Mapping[str, Any], kind: str) -> Any:
    """The transformers class of ``kind`` ("base", "causal-lm", "seqcls", "tokencls") for ``config``'s model type."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    table = {
        "base": auto.MODEL_MAPPING_NAMES,
        "causal-lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "seqcls": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "tokencls": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    }[kind]
    model_type = config.get("model_type")
    name = table.get(model_type) if isinstance(model_type, str) else None
    if isinstance(name, (list, tuple)):
        name = name[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise CheckpointError(
            f"transformers has no {kind} class for model_type {model_type!r} (config.json), so hfbuilder "
            "cannot tell its key names"
        )
    return cls


def base_model_prefix(config: Mapping[str, Any]) -> str | None:
    """``base_model_prefix`` of the model type's classes ("model" for Llama); None when unknown."""
    try:
        return model_class(config, "causal-lm").base_model_prefix or ""
    except CheckpointError:
        try:
            return model_class(config, "base").base_model_prefix or ""
        except CheckpointError:
            return None


def hf_config(config: Mapping[str, Any], kind: str, **changes: Any) -> tuple[Any, Any]:
    """(class, config object) for writing ``config`` as a transformers ``kind`` model."""
    cls = model_class(config, kind)
    data = {k: v for k, v in config.items() if k not in FOREIGN_CONFIG_KEYS and k != "architectures"}
    cfg = cls.config_class.from_dict(data)
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.architectures = [cls.__name__]
    return cls, cfg


def meta_state_keys(cls: Any, cfg: Any) -> tuple[str, dict[str, tuple[int, ...]], set[str]]:
    """(base_model_prefix, key -> shape, tied keys) of ``cls(cfg)`` built on the meta device: reads no weight."""
    import torch

    with torch.device("meta"):
        model = cls(cfg)
    seen: dict[int, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    tied: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(key)
            continue
        seen[id(tensor)] = key
        shapes[key] = tuple(tensor.shape)
    return cls.base_model_prefix, shapes, tied


def body_tensors(export: Export, prefix: str) -> dict[str, Any]:
    """The body's tensors under ``prefix`` ("model." ...), contiguous for safetensors."""
    return {prefix + name[len(BODY):]: t.contiguous() for name, t in export.tensors.items() if name.startswith(BODY)}


def check_written(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], tied: set[str],
                  what: str) -> list[str]:
    """Notes on keys a ``what`` model will miss or not use, compared with its meta-device state dict."""
    notes = []
    missing = [k for k in expected if k not in state and k not in tied]
    extra = [k for k in state if k not in expected and k not in tied]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        raise CheckpointError(f"cannot write {what}: shapes differ from its config for {wrong[:5]}")
    if missing:
        notes.append(f"not in the source, so {what} will initialize them: {', '.join(missing)}")
    if extra:
        notes.append(f"written but unused by {what}: {', '.join(extra[:10])}")
    return notes


def save_safetensors(out_dir: str, state: Mapping[str, Any]) -> list[str]:
    """Write ``state`` as ``save_pretrained`` does (shards over 5 GB, with an index); return the file names."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(dict(state), out_dir, metadata={"format": "pt"})
    return sorted(f for f in os.listdir(out_dir) if f.startswith("model") and ".safetensors" in f)


__all__ = [
    "BODY",
    "HEAD_BIAS",
    "HEAD_WEIGHT",
    "Export",
    "Extras",
    "KeyMap",
    "Layout",
    "base_model_prefix",
    "body_prefix",
    "hf_config",
    "meta_state_keys",
    "model_class",
    "save_safetensors",
]
