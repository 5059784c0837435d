"""The ``config`` stage: read the model's configuration (DeepSpeed-Chat step 1)."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .. import remote_code
from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage
from ..weights import FORMAT_JSON, FileInfo


@dataclass(frozen=True)
class ConfigSettings(Settings):
    config: Any = setting(None, option="config", doc="a transformers config to use instead of reading model_name_or_path "
                                    "(deep-copied; yours is never mutated)")
    kwargs: Mapping[str, Any] = setting(MappingProxyType({}), doc="keyword arguments for AutoConfig.from_pretrained")
    trust_remote_code: bool = setting(False, option="trust_remote_code", doc="let transformers run Python code shipped with the model "
                                                 "(auto_map); off unless you opt in")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.config is not None and not hasattr(self.config, "model_type"):
            raise BuilderInputError(f"config.config must be a transformers config, got {self.config!r}")
        if "trust_remote_code" in self.kwargs:
            raise BuilderInputError(
                "pass trust_remote_code as its own setting, not in config_kwargs: it governs every transformers "
                "call of the build, not only the config's"
            )


class ConfigStage(Stage):
    """``AutoConfig.from_pretrained``, or a deep copy of a config passed with ``with_config``.

    A config object the caller passed in is never mutated: later stages change a copy.
    """

    name = "config"
    Settings = ConfigSettings

    def explain(self, ctx: BuildContext) -> list[str]:
        # Reading the config reads no weights, so the dry run does the real work: later
        # stages explain themselves against the config the build will use.
        if ctx.settings("config").config is None:
            path = os.path.join(ctx.model_name_or_path, "config.json")
            if os.path.isfile(path):
                ctx.fact("files", [FileInfo.of(path, FORMAT_JSON).to_dict()])
        self.run(ctx)
        return []

    def run(self, ctx: BuildContext) -> None:
        settings = ctx.settings("config")
        given = settings.config
        if given is not None:
            ctx.config = copy.deepcopy(given)
            ctx.note(f"copied the given {type(given).__name__} (model_type={given.model_type!r})")
            ctx.fact("model_type", given.model_type)
            return
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig

        try:
            # Explicit, never None: None makes transformers ask on stdin whether to run the code.
            ctx.config = AutoConfig.from_pretrained(
                ctx.model_name_or_path, **settings.kwargs, trust_remote_code=settings.trust_remote_code
            )
        except (OSError, ValueError, StrictDataclassError) as exc:  # the last: a field of the wrong type
            refused = remote_code.refusal(ctx.model_name_or_path, exc)
            if refused is not None:
                raise refused from exc
            raise BuilderInputError(f"cannot read a model config from {ctx.model_name_or_path!r}: {exc}") from exc
        ctx.note(f"read {type(ctx.config).__name__} (model_type={ctx.config.model_type!r}) from {ctx.model_name_or_path}")
        ctx.fact("model_type", ctx.config.model_type)


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [ConfigStage()]
