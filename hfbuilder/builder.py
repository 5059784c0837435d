"""ModelBuilder: a fluent, immutable description of a model build, and the code that runs it."""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from .context import BuildContext, BuildReport, StageRecord, zero_stage_of
from .errors import BuilderInputError, HFBuilderError, UnknownHeadError, blame_stage
from .explain import Explanation, StageExplanation, default_world_size, estimate_memory
from .locking import serialized
from .manager import Plugins
from .ordering import Entry, resolve
from .stage import Stage
from .verify import carry_provenance, finish_build, invariant_mode, option_expectations, parameter_ids


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


def _stage_instance(stage: Any, method: str) -> Stage:
    if inspect.isclass(stage) and issubclass(stage, Stage):
        stage = stage()
    if not isinstance(stage, Stage):
        raise BuilderInputError(f"{method}() takes a hfbuilder.Stage subclass or instance, got {stage!r}")
    if not isinstance(stage.name, str) or not stage.name:
        raise BuilderInputError(f"{method}(): stage {stage!r} has no name")
    return stage


def load_ds_config(ds_config: Any) -> dict[str, Any]:
    """A DeepSpeed config as a dict: accepts a dict or the path of a JSON file."""
    if isinstance(ds_config, Mapping):
        return json.loads(json.dumps(dict(ds_config)))  # deep copy; also proves it is plain data
    if isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        if not os.path.isfile(path):
            raise BuilderInputError(f"DeepSpeed config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise BuilderInputError(f"DeepSpeed config file {path!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BuilderInputError(f"DeepSpeed config file {path!r} must hold a JSON object")
        return data
    raise BuilderInputError(f"a DeepSpeed config must be a dict or a JSON file path, got {type(ds_config).__name__}")


def check_probability(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BuilderInputError(f"{what} must be a number in [0, 1], got {value!r}")
    p = float(value)
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise BuilderInputError(f"{what} must be a number in [0, 1], got {value!r}")
    return p


@dataclass(frozen=True)
class ModelBuilder:
    """Describes how to build a Hugging Face model; ``build()`` makes it.

    Every ``with_*``/``without_*`` method returns a new builder and leaves this one
    unchanged, so one base builder can derive the actor, reference and critic.
    """

    model_class: Any
    model_name_or_path: str
    tokenizer: Any
    ds_config: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    plugins: tuple[Any, ...] = ()
    added_stages: tuple[Stage, ...] = ()
    replaced_stages: tuple[Stage, ...] = ()
    removed_stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (hasattr(self.model_class, "from_pretrained") and hasattr(self.model_class, "from_config")):
            raise BuilderInputError(
                f"model_class must be a transformers model or auto class (with from_pretrained and "
                f"from_config), got {self.model_class!r}"
            )
        if not isinstance(self.model_name_or_path, (str, os.PathLike)) or not os.fspath(self.model_name_or_path):
            raise BuilderInputError(f"model_name_or_path must be a non-empty path or name, got {self.model_name_or_path!r}")
        object.__setattr__(self, "model_name_or_path", os.fspath(self.model_name_or_path))
        if self.tokenizer is None:
            raise BuilderInputError("tokenizer is None; pass the tokenizer the model will be trained with")
        if not isinstance(self.options, MappingProxyType):
            object.__setattr__(self, "options", _frozen(self.options))

    # -- settings -------------------------------------------------------------------

    def with_options(self, **options: Any) -> ModelBuilder:
        """Set free-form options that stages (yours included) read from ``ctx.options``."""
        return replace(self, options=_frozen({**self.options, **options}))

    def without_options(self, *names: str) -> ModelBuilder:
        """Drop options, so the stages fall back to their defaults."""
        return replace(self, options=_frozen({k: v for k, v in self.options.items() if k not in names}))

    def with_dropout(self, p: float) -> ModelBuilder:
        """Set every dropout probability the model's config has to ``p``."""
        return self.with_options(dropout=check_probability(p, "dropout"))

    def with_deepspeed(self, ds_config: Mapping[str, Any] | str | os.PathLike[str]) -> ModelBuilder:
        """Use this DeepSpeed config; ZeRO-3 integration is on iff ``zero_optimization.stage == 3``."""
        return replace(self, ds_config=_frozen(load_ds_config(ds_config)))

    def with_zero3(self, ds_config: Mapping[str, Any] | str | os.PathLike[str]) -> ModelBuilder:
        """Like :meth:`with_deepspeed`, but the config must ask for ZeRO stage 3."""
        cfg = load_ds_config(ds_config)
        stage = zero_stage_of(cfg)
        if stage != 3:
            found = "no zero_optimization.stage" if stage is None else f"zero_optimization.stage == {stage}"
            raise BuilderInputError(f"with_zero3() needs a ZeRO stage 3 DeepSpeed config; found {found}")
        return replace(self, ds_config=_frozen(cfg))

    def deferred_weights(self) -> ModelBuilder:
        """Build the architecture without reading pretrained weights (DeepSpeed-Chat's ``rlhf_training``)."""
        return self.with_options(deferred=True)

    def with_dtype(self, dtype: Any) -> ModelBuilder:
        """Load the weights in this dtype (a ``torch.dtype``, its name, or ``"auto"``)."""
        if not isinstance(dtype, str):
            dtype = str(dtype).removeprefix("torch.")
        if dtype not in ("auto", "float32", "float16", "bfloat16", "float64"):
            raise BuilderInputError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
        return self.with_options(dtype=dtype)

    def on_device(self, device: Any) -> ModelBuilder:
        """Load the weights straight onto ``device`` (``"cuda"``, ``"cuda:1"``, ``"cpu"``...)."""
        text = str(device)
        if not text or text.split(":")[0] not in ("cpu", "cuda", "xpu", "mps", "npu", "hpu", "meta"):
            raise BuilderInputError(f"unknown device {device!r}")
        return self.with_options(device=text)

    def with_head(self, name: str, **options: Any) -> ModelBuilder:
        """Wrap the built model in the head called ``name`` (e.g. ``"reward"``)."""
        if not isinstance(name, str) or not name:
            raise UnknownHeadError(f"with_head() needs a head name, got {name!r}")
        return self.with_options(head=name, head_options=_frozen(options))

    def with_checkpoint(self, path: str | os.PathLike[str] | None = None, *, strict: bool = True) -> ModelBuilder:
        """Load the whole (wrapped) model's weights from ``path`` strictly; implies deferred weights.

        ``strict=False`` turns missing and unexpected keys into warnings; what is
        missing is then initialized and named in the report.
        """
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise BuilderInputError(f"checkpoint path must be a path, got {path!r}")
        if not isinstance(strict, bool):
            raise BuilderInputError(f"with_checkpoint(strict=...) must be True or False, got {strict!r}")
        return self.with_options(
            checkpoint=os.fspath(path) if path is not None else self.model_name_or_path,
            checkpoint_strict=strict,
            deferred=True,
        )

    def with_fp32_loss(self) -> ModelBuilder:
        """Compute the loss in fp32 (DeepSpeed-Chat's ``causal_lm_model_to_fp32_loss``)."""
        return self.with_options(fp32_loss=True)

    def with_lora(
        self,
        r: int = 8,
        alpha: float = 1.0,
        dropout: float = 0.0,
        target_modules: str | list[str] | None = None,
        only_optimize_lora: bool = False,
    ) -> ModelBuilder:
        """Add LoRA adapters through peft.

        ``alpha`` defaults to DeepSpeed-Chat's ``lora_scaling=1``; ``target_modules``
        is peft's (module-name suffixes, a regex, ``"all-linear"``, or None for peft's
        default for the model type).
        """
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise BuilderInputError(f"LoRA rank r must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise BuilderInputError(f"LoRA alpha must be a positive number, got {alpha!r}")
        if target_modules is not None and not isinstance(target_modules, str):
            try:
                target_modules = list(target_modules)
            except TypeError:
                raise BuilderInputError(f"target_modules must be a str or a list of str, got {target_modules!r}") from None
            if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
                raise BuilderInputError(f"target_modules must hold module names, got {target_modules!r}")
        if not isinstance(only_optimize_lora, bool):
            raise BuilderInputError(f"only_optimize_lora must be True or False, got {only_optimize_lora!r}")
        lora = {
            "r": r,
            "alpha": alpha,
            "dropout": check_probability(dropout, "LoRA dropout"),
            "target_modules": tuple(target_modules) if isinstance(target_modules, list) else target_modules,
            "only_optimize_lora": only_optimize_lora,
        }
        return self.with_options(lora=_frozen(lora))

    def frozen(self) -> ModelBuilder:
        """Return the model in eval mode with ``requires_grad=False`` (reference, reward_eval)."""
        return self.with_options(freeze=True)

    # -- plugins and stages -----------------------------------------------------

    def with_plugin(self, plugin: Any) -> ModelBuilder:
        """Register a pluggy plugin (object or module) for this builder only."""
        if plugin is None:
            raise BuilderInputError("with_plugin(None): pass a plugin object or module")
        if isinstance(plugin, (str, bytes, os.PathLike)):
            # pluggy would register the string itself: an object with no hooks, silently ignored.
            raise BuilderInputError(
                f"with_plugin({plugin!r}) takes a plugin object or module, not its name; "
                f"pass importlib.import_module({plugin!r}) (the CLI's --plugin imports it for you)"
            )
        return replace(self, plugins=(*self.plugins, plugin))

    def with_stage(self, stage: Stage | type[Stage]) -> ModelBuilder:
        """Add a stage for this builder only; its ``after``/``before`` place it in the plan."""
        return replace(self, added_stages=(*self.added_stages, _stage_instance(stage, "with_stage")))

    def replace_stage(self, stage: Stage | type[Stage]) -> ModelBuilder:
        """Put ``stage`` in the place of ``stage.replaces`` (or of the stage called ``stage.name``)."""
        return replace(self, replaced_stages=(*self.replaced_stages, _stage_instance(stage, "replace_stage")))

    def without_stage(self, name: str) -> ModelBuilder:
        """Remove the stage called ``name`` (or the stage that replaced it) from the plan."""
        if not isinstance(name, str) or not name:
            raise BuilderInputError(f"without_stage() needs a stage name, got {name!r}")
        return replace(self, removed_stages=(*self.removed_stages, name))

    def for_phase(self, name: str, **options: Any) -> ModelBuilder:
        """Apply the RLHF phase called ``name`` (sft, reward, actor, reference, critic, reward_eval)."""
        phases = self._plugins().phases()
        if name not in phases:
            raise BuilderInputError(f"unknown phase {name!r}; known phases: {sorted(phases)}")
        return phases[name][0].apply(self, **options)

    # -- running ------------------------------------------------------------------

    def _plugins(self) -> Plugins:
        return Plugins(self.plugins)

    def _entries(self, plugins: Plugins) -> list[Entry]:
        entries = plugins.stage_entries()
        seq = len(entries)
        for stage in self.added_stages:
            entries.append(Entry(stage, "ModelBuilder.with_stage", seq, target=stage.replaces))
            seq += 1
        for stage in self.replaced_stages:
            entries.append(Entry(stage, "ModelBuilder.replace_stage", seq, target=stage.replaces or stage.name))
            seq += 1
        return entries

    def _context(self, plugins: Plugins, order: list[Entry]) -> BuildContext:
        heads = plugins.heads()
        ctx = BuildContext(
            model_class=self.model_class,
            model_name_or_path=self.model_name_or_path,
            tokenizer=self.tokenizer,
            ds_config=dict(self.ds_config) if self.ds_config is not None else None,
            options=dict(self.options),
            heads={name: head for name, (head, _) in heads.items()},
            dropout_keys=plugins.dropout_keys(),
            providers={e.name: e.provider for e in order},
        )
        ctx.report.plan = [e.name for e in order]
        head = ctx.options.get("head")
        if head is not None and head not in ctx.heads:
            raise UnknownHeadError(f"unknown head {head!r}; known heads: {sorted(ctx.heads) or 'none'}")
        invariant_mode(ctx.options)
        ctx.report.expectations.extend(option_expectations(ctx.options))
        return ctx

    def _resolve(self) -> tuple[Plugins, list[Entry]]:
        plugins = self._plugins()
        return plugins, resolve(self._entries(plugins), self.removed_stages, self.options)

    def plan(self) -> list[str]:
        """The names of the stages ``build()`` will run, in order. Reads no weights."""
        return [e.name for e in self._resolve()[1]]

    @serialized
    def explain(self, world_size: int | None = None) -> Explanation:
        """A dry run: what each stage of the plan will do, reading config files but no weights.

        Every stage's ``check`` runs first; a failing check does not raise but shows up in
        ``Explanation.errors`` (``ok`` is False), so one call lists every problem. A plan that
        cannot be resolved (unknown head, stage order) raises as in :meth:`build`.
        ``world_size`` (default: torch.distributed's, else ``$WORLD_SIZE``, else 1) splits
        the memory estimate under ZeRO-3.
        """
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
            raise BuilderInputError(f"world_size must be a positive int, got {world_size!r}")
        plugins, order = self._resolve()
        ctx = self._context(plugins, order)
        ctx.dry_run = True
        failed: dict[str, HFBuilderError] = {}
        stages: list[StageExplanation] = []
        try:
            for entry in order:
                ctx.current_stage = entry.name
                try:
                    _guard(entry, "check", entry.stage.check, ctx)
                except HFBuilderError as exc:
                    failed[entry.name] = exc
            stopped: str | None = None
            for entry in order:
                ctx.current_stage = entry.name
                record = StageRecord(entry.name, entry.provider)
                ctx.report.stages.append(record)
                seen = len(ctx.report.warnings)
                lines: list[str] = []
                if stopped is None:
                    try:
                        lines = list(_guard(entry, "explain", entry.stage.explain, ctx) or [])
                    except HFBuilderError as exc:
                        failed.setdefault(entry.name, exc)
                        stopped = entry.name
                else:
                    lines = [f"not explained: stage {stopped!r} could not be explained"]
                error = failed.get(entry.name)
                stages.append(StageExplanation(
                    entry.name, entry.provider, record.actions + [str(x) for x in lines], record.facts,
                    ctx.report.warnings[seen:], str(error) if error is not None else None,
                ))
                if stopped is None:
                    after = _after_stage(plugins, entry, ctx)
                    if after is not None:
                        stages.append(StageExplanation(after.name, after.provider, after.actions, after.facts, [], None))
        finally:
            ctx.current_stage = None
            ctx.close()
        return Explanation(
            model_class=getattr(self.model_class, "__name__", repr(self.model_class)),
            model_name_or_path=self.model_name_or_path,
            plan=[e.name for e in order],
            stages=stages,
            zero3=ctx.zero3,
            invariants=invariant_mode(ctx.options),
            expectations=[f"{e.pattern!r} from {e.source} ({e.by})" for e in ctx.report.expectations],
            memory=estimate_memory(stages, ctx.zero3, world_size or default_world_size()),
            exceptions=list(failed.values()),
        )

    def build(self) -> Any:
        """Build and return the model (a ``torch.nn.Module``)."""
        return self.build_with_report()[0]

    @serialized
    def build_with_report(self) -> tuple[Any, BuildReport]:
        """Build the model and return it with a :class:`BuildReport`.

        The report has each stage's time, memory, actions and facts, the provenance of every
        parameter, and the invariants checked after the last stage (see :mod:`hfbuilder.verify`).
        """
        plugins, order = self._resolve()
        ctx = self._context(plugins, order)
        start = time.perf_counter()
        try:
            for entry in order:
                ctx.current_stage = entry.name
                _guard(entry, "check", entry.stage.check, ctx)
            for entry in order:
                ctx.current_stage = entry.name
                ctx.report.stages.append(StageRecord(entry.name, entry.provider))
                before = parameter_ids(ctx.model)
                _guard(entry, "run", plugins.run_stage, entry.stage, ctx)
                carry_provenance(ctx, before)
                _after_stage(plugins, entry, ctx)
            ctx.current_stage = None
            if ctx.model is not None:
                finish_build(ctx)
        finally:
            ctx.current_stage = None
            ctx.close()
        ctx.report.total_seconds = time.perf_counter() - start
        if ctx.model is None:
            raise HFBuilderError(f"the build finished without a model: no stage set ctx.model (plan: {ctx.report.plan})")
        return ctx.model, ctx.report


def _after_stage(plugins: Plugins, entry: Entry, ctx: BuildContext) -> StageRecord | None:
    """Run the ``hfbuilder_after_stage`` implementations as a report row of their own, if any acted."""
    name = f"after:{entry.name}"
    record = StageRecord(name, "")
    ctx.report.stages.append(record)
    ctx.current_stage = name
    start = time.perf_counter()
    done = plugins.after_stage(entry.stage, ctx)
    record.seconds = time.perf_counter() - start
    ctx.current_stage = entry.name
    if not done:
        ctx.report.stages.remove(record)
        return None
    record.provider = ", ".join(plugin for plugin, _ in done)
    record.actions.extend(line for _, lines in done for line in lines)
    return record


def _guard(entry: Entry, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        blamed = blame_stage(exc, entry.name, entry.provider, what)
        if blamed is exc:
            raise
        raise blamed from exc


__all__ = ["ModelBuilder"]
