"""The ``freeze`` stage: a model that is only evaluated (the reference and reward models of step 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..context import BuildContext
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage


@dataclass(frozen=True)
class FreezeSettings(Settings):
    enabled: bool = setting(False, option="freeze", doc="requires_grad=False, eval mode, dropout p=0 (frozen())")


class FreezeStage(Stage):
    """``requires_grad=False`` everywhere, eval mode, and every dropout module at ``p=0``.

    Setting ``p=0`` as well as eval mode matters because ``deepspeed.initialize`` and
    training loops call ``.train()`` on every engine they hold. Runs last, after any
    stage that adds parameters (LoRA included), so nothing it adds stays trainable.
    """

    name = "freeze"
    after = ("materialize", "checkpoint", "head", "lora", "fp32_loss")

    Settings = FreezeSettings

    def enabled(self, settings: Any) -> bool:
        return settings(self.name).enabled

    def explain(self, ctx: BuildContext) -> list[str]:
        return ["freeze: requires_grad=False on every parameter, eval mode, dropout p=0"]

    def run(self, ctx: BuildContext) -> None:
        from torch import nn

        model = ctx.model
        n_params = 0
        for p in model.parameters():
            p.requires_grad_(False)
            n_params += 1
        kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
        dropouts = 0
        for module in model.modules():
            if isinstance(module, kinds) and module.p != 0.0:
                module.p = 0.0
                dropouts += 1
        model.eval()
        ctx.note(f"froze {n_params} parameter tensors; eval mode; {dropouts} dropout module(s) set to p=0")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [FreezeStage()]
