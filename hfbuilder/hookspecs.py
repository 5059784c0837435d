"""The hook contract: everything a plugin can provide or observe.

A plugin is any object or module with functions marked ``@hfbuilder.hookimpl``
whose names match the specs below. Built-in stages use exactly these hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .context import BuildContext
    from .stage import Head, Phase, Stage

PROJECT = "hfbuilder"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hfbuilder_stages() -> list[Stage]:
    """Return the stages this plugin provides (instances, or classes taking no arguments).

    A stage whose ``replaces`` names another stage takes that stage's place in the
    plan. Two plugins that provide the same stage name are an error naming both.
    """


@hookspec
def hfbuilder_heads() -> list[Head]:
    """Return the model heads this plugin provides, selectable with ``.with_head(name)``."""


@hookspec
def hfbuilder_phases() -> list[Phase]:
    """Return RLHF phases (bundles of settings) selectable with ``.for_phase(name)``.

    A phase from a third-party plugin with the same name as a built-in one overrides it.
    """


@hookspec
def hfbuilder_dropout_keys() -> list[str]:
    """Return config attribute names that hold a dropout probability.

    The dropout stage sets every such key the model's config has. Add keys here
    to teach hfbuilder a new model family.
    """


@hookspec(historic=True)
def hfbuilder_addhooks(pluginmanager: Any) -> None:
    """Add hook specifications of your own with ``pluginmanager.add_hookspecs(module_or_class)``.

    A plugin that invents an extension point owns its hookspec (pytest's ``pytest_addhooks``);
    this contract lists only what every build uses. Historic: plugins registered later are
    called too.
    """


@hookspec
def hfbuilder_after_stage(stage: Stage, ctx: BuildContext) -> list[str] | None:
    """Repair or complete the model after ``stage`` ran; return one line per thing done, or None.

    Called after every stage's ``run``, and after every stage's ``explain`` with ``ctx.dry_run``
    True, when it must only describe (return what it would do) and change nothing. What the
    implementations return becomes a row of its own in the report and in ``explain()``
    (``after:<stage>``), timed apart from the stage. Use it for work that follows any stage, such
    as partitioning under ZeRO-3 whatever a stage left unpartitioned.
    """


@hookspec(firstresult=True)
def hfbuilder_run_stage(stage: Stage, ctx: BuildContext) -> Any:
    """Run one stage. The built-in implementation is ``trylast`` and calls ``stage.run(ctx)``.

    Implement it with ``wrapper=True`` to observe every stage (timing, tracing,
    profiling): ``result = yield`` runs the stage. Observers must not change the model:
    use ``hfbuilder_after_stage`` for that. Implement it plainly and return a non-None
    value to take over running a stage.
    """
