"""The ``head`` stage: wrap the model in the head chosen with ``.with_head(name, **options)``."""

from __future__ import annotations

from typing import Any

from ..context import BuildContext
from ..errors import UnknownHeadError
from ..hookspecs import hookimpl
from ..stage import Head, Stage


def selected_head(ctx: BuildContext) -> tuple[Head, dict[str, Any]]:
    name = ctx.options["head"]
    if name not in ctx.heads:
        raise UnknownHeadError(f"unknown head {name!r}; known heads: {sorted(ctx.heads) or 'none'}")
    return ctx.heads[name], dict(ctx.options.get("head_options") or {})


class HeadStage(Stage):
    """Runs after ``resize``; in the plan only when a head was chosen."""

    name = "head"
    after = ("resize",)

    def enabled(self, options: dict[str, Any]) -> bool:
        return options.get("head") is not None

    def check(self, ctx: BuildContext) -> None:
        head, options = selected_head(ctx)
        head.check(ctx, **options)

    def explain(self, ctx: BuildContext) -> list[str]:
        head, options = selected_head(ctx)
        return head.describe(ctx, **options)

    def run(self, ctx: BuildContext) -> None:
        head, options = selected_head(ctx)
        ctx.model = head.wrap(ctx.model, ctx, **options)
        ctx.note(f"wrapped in head {head.name!r} -> {type(ctx.model).__name__}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [HeadStage()]
