"""Settings: what a stage reads, declared beside it as a frozen dataclass that validates itself.

A stage names its settings class in ``Stage.Settings``; the builder holds one instance per stage
(``configure(stage, **fields)``), and the stage reads it with ``ctx.settings("resize")``. The
fields' types are the contract: :class:`Settings` checks every value against its annotation when
the instance is made, so ``"false"`` is never taken for a bool, a NaN never for a probability,
and a third-party stage gets the same checks by declaring its fields the same way.

Field metadata (through :func:`setting`) adds what a type cannot say: a one-line ``doc`` (the
settings reference and ``hfbuilder settings`` are generated from it), bounds, and the flat
``option`` name ``with_options`` accepts besides ``<stage>_<field>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Union

from .errors import BuilderInputError


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    option: str | None = None,
    min: float | None = None,  # noqa: A002 - reads as the bound it is
    max: float | None = None,  # noqa: A002
) -> Any:
    """A settings field: its default, a one-line ``doc``, optional bounds and flat ``option`` name."""
    meta = {"doc": doc, "option": option, "min": min, "max": max}
    if isinstance(default, (list, set)):
        raise TypeError("a mutable default is shared between instances: use a tuple")
    if isinstance(default, Mapping):
        frozen = freeze(default)
        return dataclasses.field(default_factory=lambda: frozen, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def freeze(value: Any) -> Any:
    """A deep, read-only copy: mappings become ``MappingProxyType``, lists and tuples tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain ``dict``/``list`` copy of a frozen value, for libraries that want to own one."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def closest_first(name: str, valid: Iterable[str]) -> list[str]:
    """``valid`` sorted by likeness to ``name``, as scikit-learn lists valid parameters."""
    return sorted(valid, key=lambda v: (-difflib.SequenceMatcher(None, name, v).ratio(), v))


@dataclass(frozen=True)
class Settings:
    """Base of every stage's settings: subclass it as a frozen dataclass and declare typed fields.

    Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``,
    ``tuple[str, ...]``, ``Mapping[...]`` (stored deep-frozen) and ``Any``. A subclass that needs
    more calls ``super().__post_init__()`` first, then checks what it must and raises
    :class:`~hfbuilder.BuilderInputError`.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            try:
                value = _check(hints[f.name], getattr(self, f.name), f, type(self))
            except BuilderInputError as exc:
                doc = f.metadata.get("doc")
                raise BuilderInputError(f"{exc} ({f.name}: {doc})" if doc else str(exc)) from None
            object.__setattr__(self, f.name, value)


_HINTS: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()


def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a settings class, resolved once: a builder makes one instance per stage per change."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


@dataclass(frozen=True)
class NoSettings(Settings):
    """The settings of a stage that reads none."""


def _label(owner: type, f: dataclasses.Field[Any]) -> str:
    return f"{getattr(owner, 'stage_name', None) or owner.__name__}.{f.name}"


def _check(hint: Any, value: Any, f: dataclasses.Field[Any], owner: type) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for arg in rest:
            try:
                return _check(arg, value, f, owner)
            except BuilderInputError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise BuilderInputError(f"{_label(owner, f)} must be {describe(hint)}, got {value!r}")
    if hint is Any:
        return freeze(value)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise BuilderInputError(f"{_label(owner, f)} must be one of {list(args)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise BuilderInputError(f"{_label(owner, f)} must be True or False, got {value!r}")
        return value
    if hint is int or hint is float:
        ok = isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
        if not ok or (hint is float and not math.isfinite(float(value))):
            kind = "an int" if hint is int else "a finite number"
            raise BuilderInputError(f"{_label(owner, f)} must be {kind}, got {value!r}")
        value = int(value) if hint is int else float(value)
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise BuilderInputError(f"{_label(owner, f)} must be in [{low}, {high}], got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str) or not value:
            raise BuilderInputError(f"{_label(owner, f)} must be a non-empty string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise BuilderInputError(f"{_label(owner, f)} must be a list of {describe(args[0])}, got {value!r}")
        return tuple(_check(args[0], v, f, owner) for v in value)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise BuilderInputError(f"{_label(owner, f)} must be a mapping, got {value!r}")
        return freeze(value)
    if isinstance(hint, type):
        if not isinstance(value, hint):
            raise BuilderInputError(f"{_label(owner, f)} must be a {hint.__name__}, got {value!r}")
        return value
    raise TypeError(f"{_label(owner, f)}: hfbuilder settings cannot check the annotation {hint!r}")


def describe(hint: Any) -> str:
    """A type annotation in words, for errors and the settings reference."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"list of {describe(args[0])}"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "mapping"
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A settings field's default value."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@dataclass(frozen=True)
class FieldInfo:
    """One setting as the reference and the CLI show it."""

    stage: str
    name: str
    type: str
    default: Any
    doc: str
    flat: tuple[str, ...]


def fields_of(stage: str, cls: type[Settings]) -> list[FieldInfo]:
    """The documented fields of a settings class, with the flat names ``with_options`` accepts."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        flat = [f"{stage}_{f.name}"]
        if f.metadata.get("option"):
            flat.insert(0, f.metadata["option"])
        default = default_of(f)
        out.append(FieldInfo(stage, f.name, describe(hints[f.name]), default, f.metadata.get("doc", ""),
                             tuple(dict.fromkeys(flat))))
    return out


class Catalog:
    """Every stage's settings class by stage name, and the flat names that lead to them.

    Built from every registered stage (planned or not), so ``with_options(checkpoint=...)`` finds
    the checkpoint stage before it is in the plan.
    """

    def __init__(self, classes: Mapping[str, type[Settings]], providers: Mapping[str, str]) -> None:
        self.classes = dict(classes)
        self.providers = dict(providers)
        # Two tiers, first match wins: a field's declared option name, then <stage>_<field>.
        # Bare field names are not flat names: "options" or "enabled" would mean whichever
        # stage happened to declare them, and a typo would land somewhere unexpected.
        self._tiers: tuple[dict[str, list[tuple[str, str]]], ...] = ({}, {})
        for stage, cls in self.classes.items():
            for f in dataclasses.fields(cls):
                names = (f.metadata.get("option"), f"{stage}_{f.name}")
                for tier, name in zip(self._tiers, names, strict=True):
                    if name:
                        tier.setdefault(name, []).append((stage, f.name))

    def option_names(self) -> set[str]:
        """The declared option names (``dropout``, ``checkpoint``, ``head``...)."""
        return set(self._tiers[0])

    def _lookup(self, name: str) -> list[tuple[str, str]]:
        for tier in self._tiers:
            if name in tier:
                return tier[name]
        return []

    def settings_class(self, stage: str) -> type[Settings]:
        if stage not in self.classes:
            valid = closest_first(stage, self.classes)
            raise BuilderInputError(f"unknown stage {stage!r} for settings. Valid stages, closest first: {valid}")
        return self.classes[stage]

    def make(self, stage: str, fields: Mapping[str, Any]) -> Settings:
        """The stage's settings with ``fields`` set; an unknown field names the valid ones, closest first."""
        cls = self.settings_class(stage)
        valid = [f.name for f in dataclasses.fields(cls)]
        for name in fields:
            if name not in valid:
                where = f"{stage} (from {self.providers.get(stage, '?')})"
                raise BuilderInputError(
                    f"invalid setting {name!r} for stage {where}. "
                    f"Valid settings, closest first: {closest_first(name, valid) or 'none'}"
                )
        try:
            return cls(**fields)
        except BuilderInputError as exc:
            raise BuilderInputError(str(exc).replace(f"{cls.__name__}.", f"{stage}.")) from None

    def resolve_flat(self, name: str) -> tuple[str, str]:
        """The (stage, field) a flat ``with_options`` name means; unknown or ambiguous names raise."""
        found = self._lookup(name)
        if len(found) == 1:
            return found[0]
        if not found:
            every = {n for tier in self._tiers for n in tier}
            valid = closest_first(name, every)[:12]
            raise BuilderInputError(
                f"invalid option {name!r}: no stage declares it. Valid options, closest first: {valid}; "
                "see `hfbuilder settings` or docs/settings.md"
            )
        owners = ", ".join(f"{s}.{f} (from {self.providers.get(s, '?')})" for s, f in found)
        raise BuilderInputError(
            f"option {name!r} is declared by more than one stage: {owners}; use configure(stage, ...) to say which"
        )

    def flat_name(self, stage: str, field: str) -> str:
        """The shortest flat name that leads to this field alone, else ``stage.field``."""
        f = next(f for f in dataclasses.fields(self.classes[stage]) if f.name == field)
        for name in (f.metadata.get("option"), f"{stage}_{f.name}"):
            if name and self._lookup(name) == [(stage, field)]:
                return name
        return f"{stage}.{field}"


def reference_markdown(catalog: Catalog) -> str:
    """The settings reference table (docs/settings.md and ``hfbuilder settings --markdown``)."""
    lines = ["| setting | `with_options` names | type | default | what it does |", "|---|---|---|---|---|"]
    for stage in sorted(catalog.classes):
        for info in fields_of(stage, catalog.classes[stage]):
            names = ", ".join(f"`{n}`" for n in info.flat)
            default = "`{}`" if isinstance(info.default, Mapping) and not info.default else f"`{info.default!r}`"
            lines.append(f"| `{stage}.{info.name}` | {names} | {info.type} | {default} | {info.doc} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Catalog",
    "FieldInfo",
    "NoSettings",
    "Settings",
    "closest_first",
    "default_of",
    "describe",
    "fields_of",
    "freeze",
    "reference_markdown",
    "setting",
    "thaw",
]
