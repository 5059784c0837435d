"""The shared state of one build, and the report it leaves behind."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .dsconfig import zero_stage_of
from .errors import BuilderInputError

log = logging.getLogger("hfbuilder")

#: Where a parameter's values came from (the report's provenance map).
PROVENANCE_PRETRAINED = "pretrained"  # from_pretrained read it from model_name_or_path
PROVENANCE_CHECKPOINT = "checkpoint"  # the checkpoint stage loaded it
PROVENANCE_RESIZED = "resized"  # rows added by the resize stage
PROVENANCE_HEAD_INIT = "head_init"  # a head created it and initialized it
PROVENANCE_INITIALIZED = "initialized"  # the model's own _init_weights (no weights to load)
PROVENANCE_UNINITIALIZED = "uninitialized"  # deferred, nothing filled it yet
PROVENANCE_ADAPTER_INIT = "adapter_init"  # a LoRA adapter the lora stage added (peft's init)

#: Every origin a provenance entry can start with.
PROVENANCE_ORIGINS: frozenset[str] = frozenset({
    PROVENANCE_PRETRAINED, PROVENANCE_CHECKPOINT, PROVENANCE_HEAD_INIT, PROVENANCE_INITIALIZED,
    PROVENANCE_UNINITIALIZED, PROVENANCE_ADAPTER_INIT,
})


def provenance_origin(value: str) -> str:
    """The source a provenance entry starts from: ``"pretrained+resized[45:48]"`` -> ``"pretrained"``.

    An entry is ``origin`` optionally followed by ``+modifier`` parts (a resize adds
    ``+resized[old:new]``), so a stage that changes part of a tensor keeps its origin.
    """
    return value.split("+", 1)[0]


@dataclass
class StageRecord:
    """What one stage did: its timing, memory and actions."""

    name: str
    provider: str
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    rss_delta_mib: float | None = None
    peak_cuda_mib: float | None = None
    actions: list[str] = field(default_factory=list)
    #: Machine-readable results (``ctx.fact``), the same keys in ``explain()`` and ``build()``.
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Expectation:
    """A promise that parameters matching ``pattern`` (fnmatch) come from ``source``."""

    pattern: str
    source: str
    by: str


@dataclass
class InvariantResult:
    """One post-build invariant: its name, whether it held, and what broke it."""

    name: str
    passed: bool
    details: list[str] = field(default_factory=list)


@dataclass
class BuildReport:
    """Everything a build can tell afterwards: per-stage records, provenance, warnings."""

    plan: list[str] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    #: What stages promised about provenance (``ctx.expect``); the invariants check them.
    expectations: list[Expectation] = field(default_factory=list)
    invariants: list[InvariantResult] = field(default_factory=list)
    #: Wall time of the post-build pass (provenance completion and invariants).
    verify_seconds: float = 0.0

    def stage(self, name: str) -> StageRecord:
        for rec in self.stages:
            if rec.name == name:
                return rec
        raise KeyError(f"no stage {name!r} in this report; stages: {[r.name for r in self.stages]}")

    def provenance_summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for source in self.provenance.values():
            counts[source] = counts.get(source, 0) + 1
        return counts

    def failed_invariants(self) -> list[InvariantResult]:
        return [r for r in self.invariants if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def format(self) -> str:
        """A table for a person: one line per stage, then the actions."""
        lines = [f"{'stage':<14}{'seconds':>9}{'peak RSS MiB':>14}  provider"]
        for rec in self.stages:
            rss = f"{rec.peak_rss_mib:.0f}" if rec.peak_rss_mib is not None else "-"
            lines.append(f"{rec.name:<14}{rec.seconds:>9.3f}{rss:>14}  {rec.provider}")
            lines.extend(f"    - {a}" for a in rec.actions)
        lines.append(f"total {self.total_seconds:.3f} s (invariants {self.verify_seconds:.3f} s)")
        if self.provenance:
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(self.provenance_summary().items()))
            lines.append(f"weights: {summary}")
        for inv in self.invariants:
            lines.append(f"invariant {inv.name}: {'ok' if inv.passed else 'FAILED'}")
            lines.extend(f"    - {d}" for d in inv.details)
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


@dataclass
class BuildContext:
    """The state that stages read and write during one build.

    Settings come from ``ctx.settings(stage_name)``. ``config`` is set by the config stage and
    ``model`` by the load stage. The fields below ``model`` are what stages hand each other: each
    says who writes it and who reads it, so a stage that replaces another knows what to keep.
    """

    model_class: Any
    model_name_or_path: str
    tokenizer: Any
    #: The DeepSpeed config, a plain dict copy owned by this build (None without DeepSpeed).
    ds_config: dict[str, Any] | None = None
    #: stage name -> that stage's settings instance, for every registered stage.
    stage_settings: Mapping[str, Any] = field(default_factory=dict)
    config: Any = None
    model: Any = None
    report: BuildReport = field(default_factory=BuildReport)
    #: name -> Head, from every registered plugin.
    heads: dict[str, Any] = field(default_factory=dict)
    #: every config key that holds a dropout probability, from ``hfbuilder_dropout_keys``.
    dropout_keys: tuple[str, ...] = ()
    #: providers by stage name, for messages.
    providers: dict[str, str] = field(default_factory=dict)
    #: This build's pluggy hook relay, for plugins that call hooks they own (pytest's ``config.hook``).
    hook: Any = None
    #: The dtype name the floating weights are built in (``"bfloat16"``..., ``"auto"``: as stored, None:
    #: the config's). Written by the load stage (the DeepSpeed config's under ZeRO-3); read by the
    #: checkpoint stage when it converts tensors.
    dtype: str | None = None
    #: True while ZeRO-3 partitioning is active in this build (written by the zero stage); the zero
    #: plugin's ``hfbuilder_after_stage`` partitions what each later stage leaves unpartitioned.
    partitioning: bool = False
    #: True when the parameters exist but hold no values yet: built partitioned, without init, for a
    #: strict checkpoint that fills every one. Written by the load stage; the resize stage then does not
    #: average rows that hold nothing.
    values_undefined: bool = False
    #: ``(parameter, old_rows, new_rows)`` for each matrix the resize stage grew while its values were
    #: deferred (meta device). Written by the resize stage; the checkpoint stage accepts a checkpoint
    #: holding the old row count for these and leaves the new rows to ``rows_to_fill``.
    resized_rows: list[tuple[Any, int, int]] = field(default_factory=list)
    #: Rows that still need values: parameter name -> ``(start, stop)``. Written by the checkpoint
    #: stage (grown rows the checkpoint lacks); the materialize stage fills them as resize would
    #: (their mean with the resize stage's ``mean_resizing``, else the model's init std) and empties it.
    rows_to_fill: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: A read of the checkpoint's tensors onto the device (:class:`hfbuilder.loaders.Read`), started by the
    #: load stage before it builds the architecture so that reading overlaps building; the checkpoint
    #: stage takes its tensors (None: the checkpoint stage reads them itself).
    weights_read: Any = None
    #: Parameters a stage read and found finite as it loaded them (a load backend sums each tensor as it
    #: arrives, while the next ones are copied): name -> (the parameter, its data pointer then).
    #: Written by ``load`` and ``checkpoint``; the post-build ``finite`` invariant does not read such a
    #: parameter again while it is the same object on the same memory and its provenance shows no later
    #: change (``+``).
    read_finite: dict[str, tuple[Any, int]] = field(default_factory=dict)
    #: The checkpoint stage's key plan (:class:`hfbuilder.weights.LoadPlan`), for later stages and tools.
    load_plan: Any = None
    #: The reward checkpoint's layout (:class:`hfbuilder.layouts.Resolved`), decided once by the
    #: ``reward_layout`` stage; the reward head reads whether it has a bias, the checkpoint stage
    #: reads it through the layout's key map.
    reward_layout: Any = None
    current_stage: str | None = None
    #: True inside ``ModelBuilder.explain()``: stages describe, read no weights, and
    #: ``warn`` records without emitting. ``model`` is then the architecture on the meta device.
    dry_run: bool = False
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def settings(self, stage: str) -> Any:
        """The settings of the stage called ``stage`` (its ``Stage.Settings`` instance), planned or not."""
        try:
            return self.stage_settings[stage]
        except KeyError:
            from .settings import closest_first

            raise BuilderInputError(
                f"no stage {stage!r} declares settings. Valid stages, closest first: "
                f"{closest_first(stage, self.stage_settings)}"
            ) from None

    @property
    def zero3(self) -> bool:
        """True when the DeepSpeed config asks for ZeRO stage 3 (DeepSpeed-Chat's rule)."""
        return zero_stage_of(self.ds_config) == 3

    def note(self, message: str) -> None:
        """Record what the running stage did; shows up in the report and the debug log."""
        log.debug("%s: %s", self.current_stage, message)
        if self.report.stages and self.report.stages[-1].name == self.current_stage:
            self.report.stages[-1].actions.append(message)

    def fact(self, key: str, value: Any) -> None:
        """Record a machine-readable result of the running stage (JSON-able ``value``).

        Use the same key in ``explain`` and ``run``: tests and tools compare the two.
        """
        if self.report.stages and self.report.stages[-1].name == self.current_stage:
            self.report.stages[-1].facts[key] = value

    def warn(self, message: str, category: type[Warning] = UserWarning) -> None:
        """Warn the user (``warnings.warn``) and keep the warning in the report.

        In a dry run (``explain()``) the warning is only recorded: the explanation shows it.
        """
        self.report.warnings.append(message)
        if self.dry_run:
            log.debug("%s: warning: %s", self.current_stage, message)
            return
        warnings.warn(message, category, stacklevel=3)

    def expect(self, pattern: str, source: str, by: str | None = None) -> None:
        """Promise that the parameters matching ``pattern`` (fnmatch, final names) come from ``source``.

        After the build the invariants check the promise: for example a head that must be
        loaded from a checkpoint calls ``ctx.expect("v_head.*", PROVENANCE_CHECKPOINT)``, and a
        build that leaves ``v_head`` initialized at random fails instead of training on noise.
        """
        self.report.expectations.append(Expectation(pattern, source, by or f"stage {self.current_stage!r}"))

    def call_on_exit(self, callback: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``callback`` when the build ends, normally or by an exception (LIFO)."""
        self._exit.callback(callback, *args, **kwargs)

    def enter_context(self, cm: Any) -> Any:
        """Keep a context manager open until the build ends."""
        return self._exit.enter_context(cm)

    def close(self) -> None:
        self._exit.close()


__all__ = [
    "PROVENANCE_ADAPTER_INIT",
    "PROVENANCE_CHECKPOINT",
    "PROVENANCE_HEAD_INIT",
    "PROVENANCE_INITIALIZED",
    "PROVENANCE_ORIGINS",
    "PROVENANCE_PRETRAINED",
    "PROVENANCE_RESIZED",
    "PROVENANCE_UNINITIALIZED",
    "BuildContext",
    "BuildReport",
    "Expectation",
    "InvariantResult",
    "StageRecord",
    "provenance_origin",
]
