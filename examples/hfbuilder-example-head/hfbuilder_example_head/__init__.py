"""A multi-objective reward head: one score per objective (helpfulness, harmlessness...).

Everything a head plugin needs is here: a :class:`hfbuilder.Head` subclass and a
``hfbuilder_heads`` hook implementation. torch is imported only when a model is
built, so loading the plugin stays free.
"""

from __future__ import annotations

from typing import Any

import hfbuilder
from hfbuilder import BuilderInputError, Head


class MultiObjectiveRewardHead(Head):
    """``with_head("multi_objective_reward", objectives=("helpful", "harmless"))``."""

    name = "multi_objective_reward"

    def check(self, ctx: Any, **options: Any) -> None:
        unknown = sorted(set(options) - {"objectives"})
        if unknown:
            raise BuilderInputError(f"head {self.name!r} has no option(s) {unknown}; it takes ['objectives']")
        objectives = options.get("objectives", ("reward",))
        if isinstance(objectives, str) or not objectives or not all(isinstance(o, str) and o for o in objectives):
            raise BuilderInputError(f"objectives must be a non-empty sequence of names, got {objectives!r}")
        if getattr(ctx.tokenizer, "pad_token_id", None) is None:
            raise BuilderInputError(f"head {self.name!r} pools the last non-pad token; the tokenizer has no pad token")

    def describe(self, ctx: Any, **options: Any) -> list[str]:
        objectives = tuple(options.get("objectives", ("reward",)))
        return [f"score {len(objectives)} objectives {objectives} at the last non-pad token"]

    def wrap(self, model: Any, ctx: Any, **options: Any) -> Any:
        from .model import MultiObjectiveRewardModel

        return MultiObjectiveRewardModel(
            model, tuple(options.get("objectives", ("reward",))), pad_token_id=ctx.tokenizer.pad_token_id
        )


@hfbuilder.hookimpl
def hfbuilder_heads() -> list[Head]:
    return [MultiObjectiveRewardHead()]
