"""The ``head`` stage: wrap the model in the head chosen with ``.with_head(name, **options)``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..context import PROVENANCE_HEAD_INIT, PROVENANCE_UNINITIALIZED, BuildContext
from ..errors import UnknownHeadError
from ..hookspecs import hookimpl
from ..settings import Settings, closest_first, setting
from ..stage import Head, Stage


@dataclass(frozen=True)
class HeadSettings(Settings):
    name: str | None = setting(None, option="head", doc="wrap the model in this head (with_head), e.g. reward")
    options: Mapping[str, Any] = setting(MappingProxyType({}), doc="the head's own options, checked by the head")


def selected_head(ctx: BuildContext) -> tuple[Head, dict[str, Any]]:
    settings = ctx.settings("head")
    if settings.name not in ctx.heads:
        raise UnknownHeadError(
            f"unknown head {settings.name!r}; known heads, closest first: "
            f"{closest_first(settings.name, ctx.heads) or 'none'}"
        )
    return ctx.heads[settings.name], dict(settings.options)


class HeadStage(Stage):
    """Runs after ``resize``; in the plan only when a head was chosen."""

    name = "head"
    after = ("resize",)
    Settings = HeadSettings

    def enabled(self, settings: Any) -> bool:
        return settings(self.name).name is not None

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
