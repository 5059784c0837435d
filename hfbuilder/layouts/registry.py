"""The ``hfbuilder_reward_layouts`` hook: its spec, the built-in layouts, and a typed way to call it.

The spec is not part of the core contract: the ``reward_layout`` plugin adds it with
``hfbuilder_addhooks``, as a plugin that invents an extension point should. Callers get
layouts through :func:`reward_layouts`, never through ``pm.hook``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import PluginError
from ..hookspecs import hookspec
from .base import Layout
from .dschat import LAYOUT as DSCHAT
from .hf import SEQCLS, TOKENCLS
from .openrlhf import LAYOUT as OPENRLHF
from .trl import LLAMAFACTORY, TRL

#: The layouts hfbuilder provides, in the order they are asked and listed.
BUILTIN_LAYOUTS: tuple[Layout, ...] = (DSCHAT, OPENRLHF, SEQCLS, TOKENCLS, TRL, LLAMAFACTORY)
BUILTIN_PROVIDER = "hfbuilder.plugins.reward_layout"


class LayoutSpecs:
    """The hook the ``reward_layout`` plugin adds to the contract."""

    @hookspec
    def hfbuilder_reward_layouts(self) -> list[Layout]:
        """Return reward/critic checkpoint layouts (:class:`hfbuilder.layouts.Layout` instances or classes).

        Each is asked to detect every reward-model checkpoint that a build or ``hfbuilder convert``
        reads, and can be chosen by name (``layout=``, ``--from``, ``--to``). Two plugins that
        provide the same name are an error naming both.
        """


def reward_layouts(hook: Any = None) -> dict[str, tuple[Layout, str]]:
    """name -> (layout, providing plugin), from ``hook`` (a plugin manager's ``pm.hook``); the built-ins without one."""
    caller = getattr(hook, "hfbuilder_reward_layouts", None) if hook is not None else None
    if caller is None:
        return {layout.name: (layout, BUILTIN_PROVIDER) for layout in BUILTIN_LAYOUTS}
    from ..manager import collect_hook

    found: dict[str, tuple[Layout, str]] = {}
    for layout, provider in collect_hook(hook, "hfbuilder_reward_layouts", Layout):  # built-ins first
        if layout.name in found:
            raise PluginError(f"two plugins provide reward layout {layout.name!r}: {found[layout.name][1]} and {provider}")
        found[layout.name] = (layout, provider)
    return found


def available_layouts(plugins: Sequence[Any] = ()) -> dict[str, tuple[Layout, str]]:
    """The layouts a builder with ``plugins`` (and the installed entry points) would see."""
    from ..manager import Plugins

    return reward_layouts(Plugins(plugins).pm.hook)


__all__ = ["BUILTIN_LAYOUTS", "LayoutSpecs", "available_layouts", "reward_layouts"]
