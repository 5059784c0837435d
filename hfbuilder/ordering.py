"""Turn the registered stages and their after/before/replaces constraints into one plan.

Registration order (pluggy's LIFO) is *not* stage order. Order comes from the
declared constraints, resolved with :class:`graphlib.TopologicalSorter`; ties are
broken by registration sequence (built-ins first, in their declared order), so
``plan()`` is deterministic.
"""

from __future__ import annotations

import graphlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import StageOrderError
from .stage import Stage


@dataclass
class Entry:
    """One registered stage and who provided it."""

    stage: Stage
    provider: str
    seq: int
    #: Name of the stage this entry replaces, or None for a plain stage.
    target: str | None = None
    after: set[str] = field(default_factory=set)
    before: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.after = set(self.stage.after)
        self.before = set(self.stage.before)

    @property
    def name(self) -> str:
        return self.stage.name

    def label(self) -> str:
        return f"{self.name!r} (from {self.provider})"


def resolve(
    entries: Iterable[Entry],
    removed: Iterable[str] = (),
    settings: Any = None,
) -> list[Entry]:
    """Return the entries that run, in order. Raises :class:`StageOrderError`.

    ``settings`` (the build's settings lookup, ``settings("load")``) goes to each stage's
    ``enabled``; None keeps every stage whose ``enabled`` does not need it.
    """
    plain: dict[str, Entry] = {}
    replacers: list[Entry] = []
    for e in entries:
        if e.target is None:
            if e.name in plain:
                raise StageOrderError(
                    f"two plugins provide stage {e.name!r}: {plain[e.name].provider} and {e.provider}; "
                    f"use replaces={e.name!r} (or .replace_stage) to take its place"
                )
            plain[e.name] = e
        else:
            replacers.append(e)

    # Replacements, possibly chained (a stage replacing a replacement).
    alias: dict[str, str] = {}
    claimed: dict[str, Entry] = {}
    pending = list(replacers)
    while pending:
        progressed = False
        for r in list(pending):
            if r.target in claimed:
                raise StageOrderError(
                    f"stages {claimed[r.target].label()} and {r.label()} both replace stage {r.target!r}"
                )
            target = r.target
            if target not in plain:
                continue
            old = plain.pop(target)
            if r.name != target and r.name in plain:
                raise StageOrderError(
                    f"{r.label()} replaces {old.label()} but stage {r.name!r} already exists "
                    f"(from {plain[r.name].provider})"
                )
            r.after |= old.after
            r.before |= old.before
            r.seq = old.seq
            plain[r.name] = r
            claimed[r.target] = r
            if r.name != target:
                alias[target] = r.name
            pending.remove(r)
            progressed = True
        if not progressed:
            r = pending[0]
            raise StageOrderError(
                f"{r.label()} replaces unknown stage {r.target!r}; known stages: {sorted(plain)}"
            )

    def canon(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for e in plain.values():
        e.after = {canon(n) for n in e.after} - {e.name}
        e.before = {canon(n) for n in e.before} - {e.name}

    known = set(plain)
    for name in removed:
        c = canon(name)
        if c not in plain:
            raise StageOrderError(f"cannot remove unknown stage {name!r}; known stages: {sorted(known)}")
        del plain[c]

    for e in list(plain.values()):
        if settings is not None and not e.stage.enabled(settings):
            del plain[e.name]

    for e in plain.values():
        for rel in ("after", "before"):
            for ref in sorted(getattr(e, rel)):
                if ref not in known:
                    raise StageOrderError(
                        f"stage {e.label()} has {rel}={ref!r}, which is not a known stage; "
                        f"known stages: {sorted(known)}"
                    )

    graph: dict[str, set[str]] = {name: set() for name in plain}
    for e in plain.values():
        graph[e.name] |= {n for n in e.after if n in plain}
        for n in e.before:
            if n in plain:
                graph[n].add(e.name)

    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        labels = " -> ".join(plain[n].label() for n in cycle)
        raise StageOrderError(f"stage order has a cycle: {labels}") from None

    order: list[Entry] = []
    ready: list[tuple[int, str]] = []
    while sorter.is_active():
        for n in sorter.get_ready():
            heapq.heappush(ready, (plain[n].seq, n))
        seq, n = heapq.heappop(ready)
        order.append(plain[n])
        sorter.done(n)
    return order
