"""The ``reward_layout`` stage, and the ``hfbuilder_reward_layouts`` hook it owns.

A reward or critic checkpoint may come from DeepSpeed-Chat, OpenRLHF, TRL, LLaMA-Factory
or transformers' own classifiers (:mod:`hfbuilder.layouts`). Before the head is made,
this stage decides which layout the checkpoint follows, from its keys and config.json
(or ``layout=``), so that the head gets a bias exactly when the checkpoint's has one and
the ``checkpoint`` stage reads every key under the value model's name. It is in the plan
only for the ``reward`` head with a checkpoint.

The hook is this plugin's own extension point (added with ``hfbuilder_addhooks``): a
third party returns more :class:`~hfbuilder.layouts.Layout` objects from
``hfbuilder_reward_layouts``, and they are detected, forced and converted like the
built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..layouts import (
    AUTO,
    BUILTIN_LAYOUTS,
    Layout,
    LayoutSpecs,
    Resolved,
    check_layout_name,
    checkpoint_config,
    resolve_layout,
    reward_layouts,
)
from ..settings import Settings, setting
from ..stage import Stage


@dataclass(frozen=True)
class RewardLayoutSettings(Settings):
    layout: str = setting(AUTO, option="layout", doc="the reward checkpoint's framework: auto (detect it from keys "
                                                     "and config.json) or a registered layout's name")


@hookimpl
def hfbuilder_addhooks(pluginmanager: Any) -> None:
    pluginmanager.add_hookspecs(LayoutSpecs)


@hookimpl
def hfbuilder_reward_layouts() -> list[Layout]:
    return list(BUILTIN_LAYOUTS)


class RewardLayoutStage(Stage):
    """Decides the checkpoint's layout (setting ``layout``: ``"auto"`` or a layout's name).

    It leaves its answer in ``ctx.reward_layout`` for the head (bias or not) and the checkpoint
    stage (the key map).
    """

    name = "reward_layout"
    after = ("resize",)
    before = ("head",)
    Settings = RewardLayoutSettings

    def enabled(self, settings: Any) -> bool:
        return settings("checkpoint").path is not None and (
            settings("head").name == "reward" or settings(self.name).layout != AUTO
        )

    def check(self, ctx: BuildContext) -> None:
        layouts = {name: layout for name, (layout, _) in reward_layouts(ctx.hook).items()}
        layout = ctx.settings(self.name).layout
        check_layout_name(layout, layouts)
        head = ctx.settings("head").name
        if head != "reward":
            raise BuilderInputError(
                f"layout={layout!r} reads reward/critic checkpoints into the 'reward' head, and "
                f"this build's head is {head!r}; use with_head('reward') or for_phase('critic')"
            )

    def explain(self, ctx: BuildContext) -> list[str]:
        return self._describe(ctx, self.resolve(ctx))

    def run(self, ctx: BuildContext) -> None:
        for line in self._describe(ctx, self.resolve(ctx)):
            ctx.note(line)

    def resolve(self, ctx: BuildContext) -> Resolved:
        """Decide once: explain and run (and the head and checkpoint stages) use the same answer."""
        resolved = ctx.reward_layout
        if resolved is None:
            found = reward_layouts(ctx.hook)
            path = ctx.settings("checkpoint").path
            config = checkpoint_config(path)
            if config is None and ctx.config is not None:  # a bare weights file: the model's own config
                config = ctx.config.to_dict()
            resolved = resolve_layout(path, {n: lay for n, (lay, _) in found.items()},
                                      ctx.settings(self.name).layout, config)
            resolved = replace(resolved, provider=found[resolved.layout.name][1])
            ctx.reward_layout = resolved
        return resolved

    def _describe(self, ctx: BuildContext, resolved: Resolved) -> list[str]:
        ctx.fact("reward_layout", resolved.layout.name)
        lines = resolved.describe()
        if resolved.provider != __name__:  # a third party's layout: say whose
            lines[0] += f" [layout from {resolved.provider}]"
        return lines


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [RewardLayoutStage()]


__all__ = ["RewardLayoutSettings", "RewardLayoutStage"]
