"""The default way to run a stage: call ``stage.run(ctx)``.

It is ``trylast``, like pytest's default implementations, so a plugin can take over
running any stage by implementing ``hfbuilder_run_stage`` and returning non-None.
"""

from __future__ import annotations

from ..context import BuildContext
from ..hookspecs import hookimpl
from ..stage import Stage


@hookimpl(trylast=True)
def hfbuilder_run_stage(stage: Stage, ctx: BuildContext) -> bool:
    stage.run(ctx)
    return True
