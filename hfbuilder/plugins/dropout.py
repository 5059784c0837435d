"""The ``dropout`` stage: one probability for every dropout the model has."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage

#: Config keys that hold a dropout probability, across the families hfbuilder tests.
#: DeepSpeed-Chat sets only the first four, which misses GPT-2's ``*_pdrop``.
DROPOUT_KEYS: tuple[str, ...] = (
    "dropout",  # OPT
    "attention_dropout",  # OPT, Llama, Qwen2, GPT-NeoX
    "hidden_dropout",  # GPT-NeoX
    "activation_dropout",  # OPT
    "resid_pdrop",  # GPT-2
    "embd_pdrop",  # GPT-2
    "attn_pdrop",  # GPT-2
    "summary_first_dropout",  # GPT-2 double-heads / sequence summary
    "classifier_dropout",  # GPT-NeoX, Llama token classification heads
    "hidden_dropout_prob",  # BERT-style configs
    "attention_probs_dropout_prob",  # BERT-style configs
)

_DROPOUT_MARKERS = ("dropout", "pdrop", "drop_prob")


def dropout_like_keys(config) -> list[str]:
    """Every config key whose name says it is a dropout probability."""
    return sorted(
        k
        for k, v in config.to_dict().items()
        if any(m in k for m in _DROPOUT_MARKERS) and (v is None or isinstance(v, (int, float))) and not isinstance(v, bool)
    )


def split_keys(config, known: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(keys the stage will set, dropout-looking keys it does not know)."""
    present = [k for k in known if hasattr(config, k)]
    unknown = [k for k in dropout_like_keys(config) if k not in known]
    return present, unknown


@dataclass(frozen=True)
class DropoutSettings(Settings):
    p: float | None = setting(None, option="dropout", min=0.0, max=1.0,
                              doc="one probability for every dropout key the config has; None keeps the config's")


def _probability(value: Any) -> bool:
    """None (unset) or a finite number in [0, 1]."""
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


class DropoutStage(Stage):
    """Sets every known dropout key the config has to the ``dropout`` setting."""

    name = "dropout"
    Settings = DropoutSettings
    after = ("config",)

    def _plan(self, ctx: BuildContext) -> tuple[float | None, list[str], list[str]]:
        """(p, keys to set, dropout-like keys not covered), with the facts and warnings both runs share."""
        p = ctx.settings(self.name).p
        present, unknown = split_keys(ctx.config, ctx.dropout_keys)
        kept = unknown if p is not None else [*present, *unknown]
        bad = {k: getattr(ctx.config, k) for k in kept if not _probability(getattr(ctx.config, k))}
        if bad:
            raise BuilderInputError(
                f"the {ctx.config.model_type!r} config holds dropout values that are not probabilities in [0, 1]: "
                f"{bad}; fix config.json or set them with with_dropout()"
            )
        if p is None:
            return None, [], []
        ctx.fact("dropout", p)
        ctx.fact("dropout_keys_set", present)
        ctx.fact("dropout_not_covered", unknown)
        if not present:
            ctx.warn(
                f"dropout={p} was requested but the {ctx.config.model_type!r} config has none of the known "
                f"dropout keys {list(ctx.dropout_keys)}; add its keys with the hfbuilder_dropout_keys hook"
            )
        if unknown:
            ctx.warn(f"{ctx.config.model_type!r} config has dropout-like keys hfbuilder does not set: {unknown}")
        return p, present, unknown

    def explain(self, ctx: BuildContext) -> list[str]:
        p, present, unknown = self._plan(ctx)
        if p is None:
            return ["no dropout requested: the config's values are kept"]
        lines = [f"set {k}: {getattr(ctx.config, k)!r} -> {p}" for k in present]
        lines.extend(f"not covered: {k} = {getattr(ctx.config, k)!r}" for k in unknown)
        return lines

    def run(self, ctx: BuildContext) -> None:
        p, present, _ = self._plan(ctx)
        if p is None:
            ctx.note("no dropout requested")
            return
        for key in present:
            ctx.note(f"{key}: {getattr(ctx.config, key)!r} -> {p}")
            setattr(ctx.config, key, p)


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [DropoutStage()]


@hookimpl
def hfbuilder_dropout_keys() -> list[str]:
    return list(DROPOUT_KEYS)
