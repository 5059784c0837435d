"""One error hierarchy.

Every error hfbuilder raises derives from :class:`HFBuilderError`. Errors caused by
the caller's input also derive from :class:`ValueError`, so code that already
catches ``ValueError`` around model construction keeps working.
"""

from __future__ import annotations

from typing import Any


class HFBuilderError(Exception):
    """Base of every error raised by hfbuilder."""


class BuilderInputError(HFBuilderError, ValueError):
    """A value the caller passed (option, path, config, tokenizer) is invalid."""


class PluginError(HFBuilderError):
    """A plugin failed to load, returned something invalid, or raised in a hook.

    The message names the plugin (and, for entry points, the entry point).
    """


class StageOrderError(PluginError):
    """The stages' ``after``/``before``/``replaces`` constraints cannot be satisfied.

    Raised for cycles, references to unknown stages and duplicate stage names; the
    message names the stages involved and the plugins that provided them.
    """


class UnknownHeadError(HFBuilderError, ValueError):
    """``with_head`` named a head that no registered plugin provides."""


class StageError(HFBuilderError):
    """A stage raised while the model was being built; the message names the stage."""


class CheckpointError(HFBuilderError):
    """A checkpoint is missing, unsafe, or does not match the model (strict keys)."""


class InvariantError(HFBuilderError):
    """A post-build invariant failed (NaN/inf weights, a tensor left uninitialized).

    ``report`` is the build's :class:`~hfbuilder.BuildReport`, with the provenance map and
    every invariant's result, so the caller can see which tensors broke it.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class InvariantWarning(UserWarning):
    """A post-build invariant failed under ``.with_options(invariants="warn")``."""


class DistributedSetupError(HFBuilderError, RuntimeError):
    """ZeRO-3 was requested but torch.distributed is neither initialized nor configurable."""


def blame_stage(exc: Exception, stage: str, provider: str, what: str) -> Exception:
    """``exc`` naming the stage that raised it (in ``check``, ``explain`` or ``run``) and its plugin.

    An hfbuilder error keeps its type, so its exit code, with its message prefixed; a
    :class:`PluginError` already names its plugin. Anything else becomes a :class:`StageError`,
    for the caller to raise ``from exc``.
    """
    where = f"stage {stage!r} (from {provider})"
    if isinstance(exc, PluginError):
        return exc
    if isinstance(exc, HFBuilderError):
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(where):
            exc.args = (f"{where} in {what}: {exc.args[0]}", *exc.args[1:])
        return exc
    return StageError(f"{where} failed in {what}: {type(exc).__name__}: {exc}")


__all__ = [
    "BuilderInputError",
    "CheckpointError",
    "DistributedSetupError",
    "HFBuilderError",
    "InvariantError",
    "InvariantWarning",
    "PluginError",
    "StageError",
    "StageOrderError",
    "UnknownHeadError",
]
