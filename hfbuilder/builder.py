"""ModelBuilder: a fluent, immutable description of a model build.

It holds what to build (model class, path, tokenizer, DeepSpeed config), which plugins and
stages take part, and each stage's settings. ``build()`` and ``explain()`` hand the resolved plan
to :mod:`hfbuilder.runner`; every per-stage rule lives in the stage's own ``Settings``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from . import runner
from .context import BuildContext, BuildReport
from .dsconfig import load_ds_config, zero_stage_of
from .errors import BuilderInputError, UnknownHeadError
from .explain import Explanation
from .locking import serialized
from .manager import Plugins, settings_catalog
from .ordering import Entry, resolve
from .settings import Catalog, closest_first, default_of, freeze, thaw
from .stage import Stage
from .verify import option_expectations

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _stage_instance(stage: Any, method: str) -> Stage:
    if inspect.isclass(stage) and issubclass(stage, Stage):
        stage = stage()
    if not isinstance(stage, Stage):
        raise BuilderInputError(f"{method}() takes a hfbuilder.Stage subclass or instance, got {stage!r}")
    if not isinstance(stage.name, str) or not stage.name:
        raise BuilderInputError(f"{method}(): stage {stage!r} has no name")
    return stage


@dataclass(frozen=True)
class ModelBuilder:
    """Describes how to build a Hugging Face model; ``build()`` makes it.

    Every ``with_*``/``without_*``/``configure`` method returns a new builder and leaves this one
    unchanged, so one base builder can derive the actor, reference and critic.
    """

    model_class: Any
    model_name_or_path: str
    tokenizer: Any
    ds_config: Mapping[str, Any] | None = None
    #: stage name -> the fields set for it (checked, normalized); the rest are the stage's defaults.
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    plugins: tuple[Any, ...] = ()
    added_stages: tuple[Stage, ...] = ()
    replaced_stages: tuple[Stage, ...] = ()
    removed_stages: tuple[str, ...] = ()
    # The plugin manager and settings catalog of this builder, made on first use and handed on to
    # derived builders while their plugins and stages stay the same.
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
        if self.ds_config is not None and not isinstance(self.ds_config, MappingProxyType):
            object.__setattr__(self, "ds_config", load_ds_config(self.ds_config))
        if not isinstance(self.settings, MappingProxyType):
            object.__setattr__(self, "settings", freeze(self.settings))

    def _derive(self, **changes: Any) -> ModelBuilder:
        """A new builder; the plugin cache goes along unless the plugins or stages change."""
        keep = not ({"plugins", "added_stages", "replaced_stages"} & set(changes))
        return replace(self, **changes, _cache=self._cache if keep else {})

    # -- settings -------------------------------------------------------------------

    def configure(self, stage: str, **fields: Any) -> ModelBuilder:
        """Set fields of the settings of the stage called ``stage`` (``configure("resize", multiple=16)``).

        The stage's ``Settings`` checks the values; an unknown stage or field raises
        :class:`BuilderInputError` listing the valid names, closest first.
        """
        catalog = self._catalog()
        current = dict(self.settings.get(stage, {}))
        current.update(fields)
        made = catalog.make(stage, current)
        normalized = {name: getattr(made, name) for name in current}
        return self._derive(settings=freeze({**self.settings, stage: normalized}))

    def with_options(self, **options: Any) -> ModelBuilder:
        """Set settings by flat name: ``dropout``, ``resize_multiple``, ``checkpoint_strict``...

        Each name resolves to the one stage that declares it (a field's ``option`` name, its
        own name, or ``<stage>_<field>``); a stage's name with a mapping configures that stage.
        Unknown or ambiguous names raise :class:`BuilderInputError`. See ``hfbuilder settings``.
        """
        builder = self
        for name, value in options.items():
            stage, fields_ = builder._flat(name, value)
            builder = builder.configure(stage, **fields_)
        return builder

    def _flat(self, name: str, value: Any) -> tuple[str, dict[str, Any]]:
        catalog = self._catalog()
        if name in catalog.classes and name not in catalog.option_names() and (value is None or isinstance(value, Mapping)):
            cls = catalog.classes[name]
            declared = {f.name for f in fields(cls)}
            if value is None:  # back to the stage's defaults
                return name, {f.name: default_of(f) for f in fields(cls) if f.name in self.settings.get(name, {})}
            given = dict(value)
            if "enabled" in declared and "enabled" not in given:
                given["enabled"] = True  # lora={...} asks for LoRA
            return name, given
        stage, field_name = catalog.resolve_flat(name)
        return stage, {field_name: value}

    def without_options(self, *names: str) -> ModelBuilder:
        """Put settings named as in :meth:`with_options` back to their stages' defaults."""
        catalog = self._catalog()
        settings = {stage: dict(values) for stage, values in self.settings.items()}
        for name in names:
            if name in catalog.classes and name not in catalog.option_names():
                settings.pop(name, None)
                continue
            stage, field_name = catalog.resolve_flat(name)
            settings.get(stage, {}).pop(field_name, None)
        return self._derive(settings=freeze({k: v for k, v in settings.items() if v}))

    @property
    def options(self) -> Mapping[str, Any]:
        """Every setting this builder sets, by flat name (read-only): ``{"dropout": 0.0}``."""
        catalog = self._catalog()
        return MappingProxyType({
            catalog.flat_name(stage, name): value
            for stage, values in self.settings.items()
            for name, value in values.items()
        })

    def with_dropout(self, p: float) -> ModelBuilder:
        """Set every dropout probability the model's config has to ``p``."""
        if p is None:
            raise BuilderInputError("with_dropout(None): pass a probability; without_options('dropout') keeps the config's")
        return self.configure("dropout", p=p)

    def with_deepspeed(self, ds_config: Mapping[str, Any] | str | os.PathLike[str]) -> ModelBuilder:
        """Use this DeepSpeed config; ZeRO-3 integration is on iff ``zero_optimization.stage == 3``."""
        return self._derive(ds_config=load_ds_config(ds_config))

    def with_zero3(self, ds_config: Mapping[str, Any] | str | os.PathLike[str]) -> ModelBuilder:
        """Like :meth:`with_deepspeed`, but the config must ask for ZeRO stage 3."""
        cfg = load_ds_config(ds_config)
        stage = zero_stage_of(cfg)
        if stage != 3:
            found = "no zero_optimization.stage" if stage is None else f"zero_optimization.stage == {stage}"
            raise BuilderInputError(f"with_zero3() needs a ZeRO stage 3 DeepSpeed config; found {found}")
        return self._derive(ds_config=cfg)

    def deferred_weights(self) -> ModelBuilder:
        """Build the architecture without reading pretrained weights (DeepSpeed-Chat's ``rlhf_training``)."""
        return self.configure("load", deferred=True)

    def with_dtype(self, dtype: Any) -> ModelBuilder:
        """Load the weights in this dtype (a ``torch.dtype``, its name, or ``"auto"``)."""
        return self.configure("load", dtype=dtype)

    def on_device(self, device: Any) -> ModelBuilder:
        """Load the weights straight onto ``device`` (``"cuda"``, ``"cuda:1"``, ``"cpu"``...)."""
        return self.configure("load", device=str(device))

    def with_loader(self, loader: str, *, io: str | None = None) -> ModelBuilder:
        """Read weights with ``loader``: ``"auto"`` (the default), ``"safetensors"``, ``"instanttensor"``
        or ``"transformers"``.

        instanttensor (``pip install 'hfbuilder[fast]'``) reads safetensors onto CUDA devices with
        pinned, pipelined copies; ``auto`` uses it when it is installed and the device is CUDA, and
        safetensors otherwise (on the CPU: the model assigned views of the memory-mapped files).
        ``transformers`` leaves every read of a plain build to ``from_pretrained``.
        ``io`` is instanttensor's reads' path: ``"buffered"``, ``"direct"`` or ``"auto"`` (see ``load.io``).
        """
        fields_: dict[str, Any] = {"loader": loader}
        if io is not None:
            fields_["io"] = io
        return self.configure("load", **fields_)

    def with_head(self, name: str, **options: Any) -> ModelBuilder:
        """Wrap the built model in the head called ``name`` (e.g. ``"reward"``)."""
        if not isinstance(name, str) or not name:
            raise UnknownHeadError(f"with_head() needs a head name, got {name!r}")
        return self.configure("head", name=name, options=options)

    def with_checkpoint(
        self, path: str | os.PathLike[str] | None = None, *, strict: bool = True, layout: str | None = None
    ) -> ModelBuilder:
        """Load the whole (wrapped) model's weights from ``path`` strictly; implies deferred weights.

        ``path`` defaults to ``model_name_or_path``. ``strict=False`` turns missing and
        unexpected keys into warnings; what is missing is then initialized and named in the report.
        ``layout``: the reward checkpoint's framework (``"openrlhf"``, ``"trl"``...:
        :mod:`hfbuilder.layouts`), ``"auto"`` to detect it; None leaves the setting as it is.
        """
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise BuilderInputError(f"checkpoint path must be a path, got {path!r}")
        chosen = os.fspath(path) if path is not None else self.model_name_or_path
        builder = self.configure("checkpoint", path=chosen, strict=strict).configure("load", deferred=True)
        return builder if layout is None else builder.configure("reward_layout", layout=layout)

    def with_fp32_loss(self) -> ModelBuilder:
        """Compute the loss in fp32 (DeepSpeed-Chat's ``causal_lm_model_to_fp32_loss``)."""
        return self.configure("fp32_loss", enabled=True)

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
        return self.configure("lora", enabled=True, r=r, alpha=alpha, dropout=dropout,
                              target_modules=target_modules, only_optimize_lora=only_optimize_lora)

    def frozen(self) -> ModelBuilder:
        """Return the model in eval mode with ``requires_grad=False`` (reference, reward_eval)."""
        return self.configure("freeze", enabled=True)

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
        return self._derive(plugins=(*self.plugins, plugin))

    def with_stage(self, stage: Stage | type[Stage]) -> ModelBuilder:
        """Add a stage for this builder only; its ``after``/``before`` place it in the plan."""
        return self._derive(added_stages=(*self.added_stages, _stage_instance(stage, "with_stage")))

    def replace_stage(self, stage: Stage | type[Stage]) -> ModelBuilder:
        """Put ``stage`` in the place of ``stage.replaces`` (or of the stage called ``stage.name``)."""
        return self._derive(replaced_stages=(*self.replaced_stages, _stage_instance(stage, "replace_stage")))

    def without_stage(self, name: str) -> ModelBuilder:
        """Remove the stage called ``name`` (or the stage that replaced it) from the plan."""
        if not isinstance(name, str) or not name:
            raise BuilderInputError(f"without_stage() needs a stage name, got {name!r}")
        return self._derive(removed_stages=(*self.removed_stages, name))

    def for_phase(self, name: str, **parameters: Any) -> ModelBuilder:
        """Apply the RLHF phase called ``name`` (sft, reward, actor, reference, critic, reward_eval).

        A phase is data (:class:`~hfbuilder.Phase`): settings per stage, a head, whether the whole
        model comes from a checkpoint, and the keywords it takes.
        """
        phases = self._plugins().phases()
        if name not in phases:
            raise BuilderInputError(f"unknown phase {name!r}. Valid phases, closest first: {closest_first(name, phases)}")
        phase = phases[name][0]
        unknown = sorted(set(parameters) - set(phase.accepts()))
        if unknown:
            raise BuilderInputError(f"phase {name!r} has no option(s) {unknown}; it takes {phase.accepts()}")
        builder = self
        path = parameters.get("model_name_or_path")
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise BuilderInputError(f"model_name_or_path must be a path, got {path!r}")
            builder = builder._derive(model_name_or_path=os.fspath(path))
        for stage, values in phase.settings.items():
            builder = builder.configure(stage, **values)
        for key, value in parameters.items():
            if value is None or key in ("model_name_or_path", "checkpoint") or key in phase.head_options:
                continue
            if key == "lora":
                if not isinstance(value, Mapping):
                    raise BuilderInputError(f"lora must be a dict of with_lora() arguments, got {value!r}")
                builder = builder.with_lora(**value)
            else:
                builder = builder.with_options(**{key: value})
        if phase.head is not None:
            given = {k: parameters[k] for k in phase.head_options if k in parameters}
            builder = builder.with_head(phase.head, **{**phase.head_options, **given})
        if phase.checkpoint:
            builder = builder.with_checkpoint(parameters.get("checkpoint"))
        return builder

    # -- running ------------------------------------------------------------------

    def _plugins(self) -> Plugins:
        if "plugins" not in self._cache:
            self._cache["plugins"] = Plugins(self.plugins)
        return self._cache["plugins"]

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

    def _catalog(self) -> Catalog:
        if "catalog" not in self._cache:
            self._cache["catalog"] = settings_catalog(self._entries(self._plugins()))
        return self._cache["catalog"]

    def _stage_settings(self) -> dict[str, Any]:
        catalog = self._catalog()
        for stage in self.settings:
            catalog.settings_class(stage)  # a stage that left with its plugin is an error, not ignored
        return {stage: catalog.make(stage, self.settings.get(stage, {})) for stage in catalog.classes}

    def _resolve(self) -> tuple[Plugins, list[Entry], dict[str, Any]]:
        plugins = self._plugins()
        settings = self._stage_settings()
        return plugins, resolve(self._entries(plugins), self.removed_stages, settings.__getitem__), settings

    def _context(self, plugins: Plugins, order: list[Entry], settings: dict[str, Any]) -> BuildContext:
        heads = plugins.heads()
        ctx = BuildContext(
            model_class=self.model_class,
            model_name_or_path=self.model_name_or_path,
            tokenizer=self.tokenizer,
            ds_config=thaw(self.ds_config) if self.ds_config is not None else None,
            stage_settings=settings,
            heads={name: head for name, (head, _) in heads.items()},
            dropout_keys=plugins.dropout_keys(),
            providers={e.name: e.provider for e in order},
            hook=plugins.hook,
        )
        ctx.report.plan = [e.name for e in order]
        head = settings["head"].name if "head" in settings else None
        if head is not None and head not in ctx.heads:
            raise UnknownHeadError(
                f"unknown head {head!r}; known heads, closest first: {closest_first(head, ctx.heads) or 'none'}"
            )
        ctx.report.expectations.extend(option_expectations(settings["verify"]))
        return ctx

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
        plugins, order, settings = self._resolve()
        return runner.explain(plugins, order, self._context(plugins, order, settings), world_size)

    def build(self) -> Any:
        """Build and return the model (a ``torch.nn.Module``)."""
        return self.build_with_report()[0]

    @serialized
    def build_with_report(self) -> tuple[Any, BuildReport]:
        """Build the model and return it with a :class:`BuildReport`.

        The report has each stage's time, memory, actions and facts, the provenance of every
        parameter, and the invariants checked after the last stage (see :mod:`hfbuilder.verify`).
        """
        plugins, order, settings = self._resolve()
        return runner.build(plugins, order, self._context(plugins, order, settings))


__all__ = ["ModelBuilder"]
