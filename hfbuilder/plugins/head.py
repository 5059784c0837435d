"""The ``head`` stage: wrap the model in the head chosen with ``.with_head(name, **options)``."""

from __future__ import annotations

from typing import Any

from ..context import PROVENANCE_HEAD_INIT, PROVENANCE_UNINITIALIZED, BuildContext
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
        ctx.fact("head", head.name)
        return head.describe(ctx, **options)

    def run(self, ctx: BuildContext) -> None:
        head, options = selected_head(ctx)
        before = {id(p): ctx.report.provenance.get(n) for n, p in ctx.model.named_parameters()}
        ctx.model = head.wrap(ctx.model, ctx, **options)
        ctx.fact("head", head.name)
        ctx.note(f"wrapped in head {head.name!r} -> {type(ctx.model).__name__}")
        remap_provenance(ctx, before)


def remap_provenance(ctx: BuildContext, before: dict[int, str | None]) -> None:
    """Re-key the provenance map by the wrapped model's names (a head renames every parameter).

    Parameters are matched by identity; the ones the head created are ``head_init``
    (``uninitialized`` while still on the meta device); ones the head dropped (an LM
    head under a reward head) leave the map.
    """
    provenance: dict[str, str] = {}
    kept: set[int] = set()
    for name, p in ctx.model.named_parameters():
        if id(p) in before:
            kept.add(id(p))
            source = before[id(p)]
        else:
            source = PROVENANCE_UNINITIALIZED if p.is_meta else PROVENANCE_HEAD_INIT
        if source is not None:
            provenance[name] = source
    dropped = len([i for i in before if i not in kept])
    ctx.report.provenance.clear()
    ctx.report.provenance.update(provenance)
    if dropped:
        ctx.note(f"the head left out {dropped} parameter tensor(s) of the model it wraps")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [HeadStage()]
