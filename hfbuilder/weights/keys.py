"""Which model tensor each checkpoint key loads into: one rule, transformers' own.

transformers 5 renames legacy keys when it loads (GPT-NeoX's ``embed_out`` is
``lm_head``, ``LayerNorm.gamma`` is ``.weight``) and renames them back when it saves;
``from_pretrained`` also adds or strips the base-model prefix (``model.``) so a bare
model's checkpoint loads into a ``*ForCausalLM`` and the other way round. This module
asks transformers' own rules, for each transformers model inside the model being built
(a DeepSpeed-Chat ``RewardModel`` holds one under ``rwtransformer.``), so that
``explain``, the checkpoint stage and ZeRO-3's partition loader predict the same names
``from_pretrained`` would use. Keys outside every transformers model (a ``v_head``)
must match exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .tied import TensorGroup, tensor_groups


@dataclass(frozen=True)
class KeyMap:
    """Where each checkpoint key goes in the model."""

    #: checkpoint key -> model name it loads into, renamed as transformers renames.
    names: dict[str, str] = field(default_factory=dict)
    #: checkpoint key -> model name, for keys transformers would convert (merge, split), not just rename.
    converted: dict[str, str] = field(default_factory=dict)
    #: checkpoint keys that load into nothing, in checkpoint order.
    unused: list[str] = field(default_factory=list)

    def sources(self) -> dict[str, str]:
        """model name -> the checkpoint key that fills it; a key of the same name wins over a renamed one."""
        out: dict[str, str] = {}
        for key, name in self.names.items():
            if name not in out or key == name:
                out[name] = key
        return out

    @property
    def filled(self) -> set[str]:
        """Model names some checkpoint key fills, by renaming or by conversion."""
        return set(self.names.values()) | set(self.converted.values())


Rename = Callable[[str], tuple[str, bool]]


def _rename_rule(root: Any, expected: set[str], prefixes: bool) -> Rename:
    """key (relative to ``root``) -> (model name relative to ``root``, needs a value conversion)."""
    prefix = getattr(root, "base_model_prefix", None) or None
    known = dict.fromkeys(expected, True)  # transformers asks ``.get(name) is not None``
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: only the base-model prefix rule
        def plain(key: str) -> tuple[str, bool]:
            if prefixes and prefix and key not in known:
                for candidate in (f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
                    if candidate in known:
                        return candidate, False
            return key, False

        return plain
    mapping = get_model_conversion_mapping(root) if hasattr(root, "config") else []
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    base = (prefix, known) if prefixes else (None, None)

    def rename(key: str) -> tuple[str, bool]:
        new, pattern = rename_source_key(key, renamings, converters, *base)
        if new not in known and key in known:  # as transformers does: keep a key that already fits
            new, pattern = rename_source_key(key, [], [], *base)
        return new, pattern is not None

    return rename


def _roots(model: Any) -> list[tuple[str, Any]]:
    """The outermost transformers models inside ``model`` (``model`` itself if it is one), with their paths."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(n == "" or name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


def _natural(key: str) -> Any:
    """transformers' loading order: some renamings (a guard, then its dependants) depend on it."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:  # transformers 4
        return key
    return dot_natural_key(key)


def map_keys(model: Any, checkpoint_keys: Iterable[str], *, prefixes: bool = True,
             groups: list[TensorGroup] | None = None) -> KeyMap:
    """Map checkpoint keys onto ``model``'s state-dict names as ``from_pretrained`` would.

    ``prefixes=False`` leaves out the base-model prefix rule: the checkpoint stage loads
    the state dict of the very model being built (head included), where a key that fits
    only once ``model.`` is added is a mistake to report, not to repair.
    ``model`` may be on the meta device or partitioned; no tensor is read. ``groups``: the
    model's :func:`~hfbuilder.weights.tied.tensor_groups`, when the caller has them already.
    """
    expected = {n for g in (groups if groups is not None else tensor_groups(model)) for n in g.names}
    keys = list(checkpoint_keys)
    if expected.issuperset(keys):
        # Every key already is a model name: transformers' renamings map legacy names, which a
        # model does not have, so nothing moves. Asking it would build its table of about a
        # thousand compiled patterns on first use: 0.1-0.4 s of a build that needs none of it.
        return KeyMap(names={k: k for k in keys})
    rules = []
    for path, root in _roots(model):
        head = f"{path}." if path else ""
        inside = {n[len(head):] for n in expected if n.startswith(head)}
        rules.append((head, _rename_rule(root, inside, prefixes)))
    placed: dict[str, tuple[str, bool]] = {}
    for key in sorted(keys, key=_natural):
        target, converted = key, False
        for head, rename in rules:
            if key.startswith(head):
                new, converted = rename(key[len(head):])
                target = head + new
                break
        placed[key] = (target, converted)
    out = KeyMap()
    for key in keys:  # checkpoint order
        target, converted = placed[key]
        if target not in expected:
            out.unused.append(key)
        elif converted:
            out.converted[key] = target
        else:
            out.names[key] = target
    return out


__all__ = ["KeyMap", "map_keys"]
