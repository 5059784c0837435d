"""What ``ModelBuilder.explain()`` returns: the plan, stage by stage, before any weight is read.

Each stage's section holds the lines its ``explain(ctx)`` returned (and any ``ctx.note``),
the facts it recorded with ``ctx.fact`` and the warnings it raised with ``ctx.warn``.
The explanation sums a few facts that any stage may record:

``parameters``
    how many parameters the model has when the stage has made it (the load stage);
``parameters_added``
    how many a stage adds (negative when it removes some: a shrinking resize);
``dtype`` / ``device``
    the parameter dtype and device (the last stage that says wins);
``files``
    the files the stage will read, each ``{"path", "format", "bytes"}``.

From these it estimates memory: parameters x dtype bytes, and per rank under ZeRO-3.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .weights import DTYPE_BYTES


@dataclass
class StageExplanation:
    """One stage of the plan: what it will do, its facts and warnings, and an error if it would fail."""

    name: str
    provider: str
    lines: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Memory:
    """Expected parameter memory: ``parameters x bytes_per_parameter``, split over ranks under ZeRO-3."""

    parameters: int
    dtype: str
    bytes_per_parameter: int
    total_bytes: int
    zero3: bool
    world_size: int
    per_rank_bytes: int

    def format(self) -> str:
        text = (
            f"{self.parameters:,} parameters x {self.bytes_per_parameter} bytes ({self.dtype}) = "
            f"{human_bytes(self.total_bytes)}"
        )
        if self.zero3:
            text += f"; ZeRO-3 over {self.world_size} rank(s): {human_bytes(self.per_rank_bytes)} per rank"
        return text


@dataclass
class Explanation:
    """The dry run of a build. ``str()`` is for a person; ``to_json()`` for a program."""

    model_class: str
    model_name_or_path: str
    plan: list[str]
    stages: list[StageExplanation]
    zero3: bool
    invariants: str
    memory: Memory | None = None
    #: Promises about where parameters come from, known before the build (``ctx.expect``, option ``expect``).
    expectations: list[str] = field(default_factory=list)
    #: The exceptions behind ``errors``, for callers that want to raise them (not serialized).
    exceptions: list[BaseException] = field(default_factory=list, repr=False, compare=False)

    @property
    def warnings(self) -> list[str]:
        return [f"{s.name}: {w}" for s in self.stages for w in s.warnings]

    @property
    def errors(self) -> list[str]:
        return [f"{s.name}: {s.error}" for s in self.stages if s.error]

    @property
    def ok(self) -> bool:
        """False when the build would fail a stage's check (see ``errors``)."""
        return not self.errors

    @property
    def files(self) -> list[dict[str, Any]]:
        return [f for s in self.stages for f in s.facts.get("files", [])]

    def stage(self, name: str) -> StageExplanation:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in this plan; stages: {self.plan}")

    def fact(self, key: str, default: Any = None) -> Any:
        """The last value any stage recorded for ``key`` (later stages refine earlier ones)."""
        value = default
        for s in self.stages:
            if key in s.facts:
                value = s.facts[key]
        return value

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("exceptions", None)
        data["warnings"] = self.warnings
        data["errors"] = self.errors
        data["files"] = self.files
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def format(self) -> str:
        lines = [f"plan: {self.model_class} from {self.model_name_or_path} ({len(self.plan)} stages)"]
        for i, s in enumerate(self.stages, 1):
            lines.append(f"{i}. {s.name}  [{s.provider}]")
            lines.extend(f"   - {line}" for line in s.lines)
            for f in s.facts.get("files", []):
                size = f", {human_bytes(f['bytes'])}" if f.get("bytes") is not None else ""
                lines.append(f"   reads {f['path']} ({f['format']}{size})")
            lines.extend(f"   WARNING: {w}" for w in s.warnings)
            if s.error:
                lines.append(f"   ERROR: {s.error}")
        lines.append(f"after the build: provenance map and invariants (invariants={self.invariants!r})")
        lines.extend(f"   expects {e}" for e in self.expectations)
        if self.memory is not None:
            lines.append(f"memory: {self.memory.format()}")
        if self.errors:
            lines.append(f"the build would fail: {len(self.errors)} error(s)")
        elif self.warnings:
            lines.append(f"{len(self.warnings)} warning(s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def human_bytes(n: float) -> str:
    """``28803`` -> ``"28.1 KiB"``."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def default_world_size() -> int:
    """The world size a ZeRO-3 build would see: torch.distributed's if up, else ``$WORLD_SIZE``, else 1."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def estimate_memory(stages: list[StageExplanation], zero3: bool, world_size: int) -> Memory | None:
    """Parameter memory from the stages' ``parameters``, ``parameters_added`` and ``dtype`` facts."""
    total: int | None = None
    dtype: str | None = None
    for s in stages:
        if "parameters" in s.facts:
            total = int(s.facts["parameters"])
        if "parameters_added" in s.facts and total is not None:
            total += int(s.facts["parameters_added"])
        if s.facts.get("dtype"):
            dtype = str(s.facts["dtype"]).removeprefix("torch.")
    if total is None or dtype not in DTYPE_BYTES:
        return None
    size = DTYPE_BYTES[dtype]
    ranks = world_size if zero3 else 1
    return Memory(total, dtype, size, total * size, zero3, ranks, math.ceil(total / ranks) * size)


__all__ = ["Explanation", "Memory", "StageExplanation", "default_world_size", "estimate_memory", "human_bytes"]
