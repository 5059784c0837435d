"""What plugins register: stages, heads and phases.

These are deliberately tiny. A plugin author subclasses one, sets a few class
attributes and implements one method; the rest of the contract is in
:mod:`hfbuilder.hookspecs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .settings import NoSettings, freeze
from .settings import Settings as _Settings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from .context import BuildContext

#: What ``Stage.enabled`` gets: ``settings("load")`` is the load stage's settings.
SettingsLookup = Callable[[str], Any]


def _names(value: Any, owner: str, attr: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"{owner}.{attr} must be a tuple of stage names, got {value!r}") from None
    for n in names:
        if not isinstance(n, str) or not n:
            raise TypeError(f"{owner}.{attr} must hold non-empty strings, got {n!r}")
    return names


class Stage:
    """One step of a build: reads and writes the shared :class:`BuildContext`.

    Class attributes:

    ``name``
        Unique name of the stage; what ``plan()`` lists and ``without_stage`` takes.
    ``after`` / ``before``
        Names of stages this one must run after / before. Order comes only from these.
    ``replaces``
        Name of a stage this one takes the place of (inheriting its position), or None.
    ``Settings``
        What the stage reads: a frozen dataclass subclassing :class:`hfbuilder.Settings`
        whose fields are typed and documented (``setting(default, doc=...)``). The builder
        holds one instance per stage (``configure(name, **fields)``, ``with_options``); the
        stage reads it with ``ctx.settings(self.name)``, and another stage's by its name.

    Stages are instantiated with no arguments.
    """

    name: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    replaces: ClassVar[str | None] = None
    Settings: ClassVar[type[_Settings]] = NoSettings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.after = _names(cls.after, cls.__name__, "after")
        cls.before = _names(cls.before, cls.__name__, "before")
        settings = cls.__dict__.get("Settings")
        if settings is not None and not (isinstance(settings, type) and issubclass(settings, _Settings)):
            raise TypeError(f"{cls.__name__}.Settings must be a subclass of hfbuilder.Settings, got {settings!r}")

    def enabled(self, settings: SettingsLookup) -> bool:
        """Whether the stage belongs in the plan, given the build's settings (``settings("load")``).

        The six core stages always return True (a stage with nothing to do stays
        in the plan and does nothing); optional stages such as ``head`` or
        ``checkpoint`` appear only when their settings ask for them.
        """
        return True

    def check(self, ctx: BuildContext) -> None:
        """Validate inputs before any stage runs; raise a typed error to stop the build.

        Runs for every stage before the first ``run``, so a bad tokenizer or path
        fails before any weights are read.
        """

    def explain(self, ctx: BuildContext) -> list[str]:
        """Describe, without reading weights, what ``run`` will do: one line per action.

        ``ModelBuilder.explain()`` calls it in plan order with ``ctx.dry_run`` True, after
        the earlier stages' ``explain``: ``ctx.config`` is the config the build will use and
        ``ctx.model`` the architecture on the meta device (or None). Record machine-readable
        results with ``ctx.fact`` (the same keys ``run`` records) and problems with
        ``ctx.warn``. It may update ``ctx`` as ``run`` would where that reads no weights.
        """
        return []

    def run(self, ctx: BuildContext) -> None:
        """Do the stage's work on ``ctx``."""
        raise NotImplementedError(f"stage {self.name!r} does not implement run()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class Head:
    """A model head: wraps the built base model in another ``nn.Module``.

    Set ``name`` and implement :meth:`wrap`. ``.with_head(name, **options)`` calls it
    after the resize stage.
    """

    name: ClassVar[str] = ""
    #: The model class the head wants as its base, or None to keep the builder's.
    base_model_class: ClassVar[Any] = None

    def check(self, ctx: BuildContext, **options: Any) -> None:
        """Validate the head's options before the build starts."""

    def wrap(self, model: nn.Module, ctx: BuildContext, **options: Any) -> nn.Module:
        raise NotImplementedError(f"head {self.name!r} does not implement wrap()")

    def describe(self, ctx: BuildContext, **options: Any) -> list[str]:
        """What the head will do, for ``explain()``: which token it pools, what it adds.

        ``ctx.model`` is the base architecture on the meta device. Record
        ``ctx.fact("parameters_added", n)`` so the memory estimate counts the head.
        """
        return [f"wrap the model in head {self.name!r}"]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


@dataclass(frozen=True)
class Phase:
    """An RLHF phase: data the builder applies with ``for_phase(name, **parameters)``.

    ``settings``
        Fields per stage, applied first: ``{"dropout": {"p": 0.0}, "freeze": {"enabled": True}}``.
    ``head`` / ``head_options``
        The head to wrap the model in, and its default options; a ``for_phase`` parameter
        with the name of a head option overrides it.
    ``checkpoint``
        True when the whole model is loaded from a checkpoint: the ``checkpoint`` parameter,
        else the builder's ``model_name_or_path``.
    ``parameters``
        The other keywords ``for_phase`` accepts: ``model_name_or_path``, ``lora`` (a dict of
        ``with_lora`` arguments), ``checkpoint``, or any flat settings name (``dropout``).
    """

    name: str
    description: str = ""
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    head: str | None = None
    head_options: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: bool = False
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a Phase needs a non-empty name, got {self.name!r}")
        object.__setattr__(self, "settings", freeze(self.settings))
        object.__setattr__(self, "head_options", freeze(self.head_options))
        object.__setattr__(self, "parameters", tuple(self.parameters))

    def accepts(self) -> list[str]:
        """Every keyword ``for_phase`` takes for this phase."""
        return sorted({*self.parameters, *self.head_options})


__all__ = ["Head", "Phase", "Stage"]
