"""The ``config`` stage: read the model's configuration (DeepSpeed-Chat step 1)."""

from __future__ import annotations

import copy
import os

from .. import remote_code
from ..context import BuildContext
from ..errors import BuilderInputError
from ..files import FORMAT_JSON, FileInfo
from ..hookspecs import hookimpl
from ..stage import Stage


class ConfigStage(Stage):
    """``AutoConfig.from_pretrained``, or a deep copy of a config passed with ``with_config``.

    A config object the caller passed in is never mutated: later stages change a copy.
    """

    name = "config"

    def explain(self, ctx: BuildContext) -> list[str]:
        # Reading the config reads no weights, so the dry run does the real work: later
        # stages explain themselves against the config the build will use.
        if ctx.options.get("config") is None:
            path = os.path.join(ctx.model_name_or_path, "config.json")
            if os.path.isfile(path):
                ctx.fact("files", [FileInfo.of(path, FORMAT_JSON).to_dict()])
        self.run(ctx)
        return []

    def run(self, ctx: BuildContext) -> None:
        given = ctx.options.get("config")
        if given is not None:
            ctx.config = copy.deepcopy(given)
            ctx.note(f"copied the given {type(given).__name__} (model_type={given.model_type!r})")
            ctx.fact("model_type", given.model_type)
            return
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig

        kwargs = dict(ctx.options.get("config_kwargs", {}))
        if remote_code.OPTION in kwargs:
            raise BuilderInputError(
                f"pass {remote_code.OPTION} as its own option, not in config_kwargs: it governs every "
                "transformers call of the build, not only the config's"
            )
        # Explicit, never None: None makes transformers ask on stdin whether to run the code.
        kwargs[remote_code.OPTION] = remote_code.trusted(ctx.options.get(remote_code.OPTION))
        try:
            ctx.config = AutoConfig.from_pretrained(ctx.model_name_or_path, **kwargs)
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
