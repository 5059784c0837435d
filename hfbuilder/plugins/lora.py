"""The ``lora`` stage: LoRA adapters through peft (``.with_lora(...)``).

peft's ``inject_adapter_in_model`` adds the adapters in place, so the model keeps
its class: a ``RewardModel`` is still one (``forward_value`` and all), and a causal
LM is still a ``PreTrainedModel``. DeepSpeed-Chat's own LoRA layers are replaced
by peft's; the mapping of its arguments is in docs/rlhf.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ..context import PROVENANCE_ADAPTER_INIT, BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage


@dataclass(frozen=True)
class LoraSettings(Settings):
    enabled: bool = setting(False, doc="add LoRA adapters (with_lora())")
    r: int = setting(8, min=1, max=1 << 16, doc="the adapters' rank")
    alpha: float = setting(1.0, min=0.0, doc="peft's lora_alpha; DeepSpeed-Chat's lora_scaling=1 by default")
    dropout: float = setting(0.0, min=0.0, max=1.0, doc="dropout on the adapters' input (peft's lora_dropout)")
    target_modules: str | tuple[str, ...] | None = setting(
        None, doc="peft's target_modules: module-name suffixes, a regex, all-linear; None: peft's default")
    only_optimize_lora: bool = setting(False, option="only_optimize_lora", doc="train only the adapters (and a head's own parameters)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0:
            raise BuilderInputError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise BuilderInputError("lora.target_modules must name at least one module, got an empty list")


def _outside_transformers(model: Any) -> set[int]:
    """Parameters of the wrapper around the transformers model (a head's ``v_head``)."""
    from transformers import PreTrainedModel

    inner = {id(p) for m in model.modules() if isinstance(m, PreTrainedModel) for p in m.parameters()}
    return {id(p) for p in model.parameters() if id(p) not in inner}


class LoraStage(Stage):
    """Injects LoRA adapters after the weights are final (after checkpoint and materialize).

    With ``only_optimize_lora`` only the adapters train, plus parameters that live
    outside the transformers model (a head such as ``v_head``), as DeepSpeed-Chat's
    step 2 keeps ``v_head.weight`` trainable. Without it, every parameter that was
    trainable stays trainable.
    """

    name = "lora"
    after = ("materialize", "checkpoint", "head", "resize")

    Settings = LoraSettings

    def enabled(self, settings: Any) -> bool:
        return settings(self.name).enabled

    def check(self, ctx: BuildContext) -> None:
        if importlib.util.find_spec("peft") is None:
            raise BuilderInputError("with_lora() needs peft: pip install 'hfbuilder[lora]'")

    def explain(self, ctx: BuildContext) -> list[str]:
        o = ctx.settings(self.name)
        targets = o.target_modules if o.target_modules is not None else "peft's default for the model type"
        train = "only LoRA (and head) parameters train" if o.only_optimize_lora else "all parameters train"
        return [f"peft LoRA r={o.r} alpha={o.alpha} dropout={o.dropout} on {targets}; {train}"]

    def run(self, ctx: BuildContext) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        o = ctx.settings(self.name)
        model = ctx.model
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        head_params = _outside_transformers(model)
        before = {id(p) for p in model.parameters()}
        targets = list(o.target_modules) if isinstance(o.target_modules, tuple) else o.target_modules
        config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=targets)
        try:
            model = inject_adapter_in_model(config, model)
        except ValueError as exc:
            raise BuilderInputError(f"peft could not add LoRA adapters: {exc}") from exc
        added = [(n, p) for n, p in model.named_parameters() if id(p) not in before]
        for p in model.parameters():
            if id(p) in before:
                keep = id(p) in head_params if o.only_optimize_lora else id(p) in trainable
                p.requires_grad_(keep and id(p) in trainable)
        ctx.model = model
        n_added = sum(p.numel() for _, p in added)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ctx.note(f"peft LoRA: {len(added)} adapter tensors ({n_added:,} parameters); {n_train:,} trainable")
        for name, _ in added:
            ctx.report.provenance[name] = PROVENANCE_ADAPTER_INIT


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [LoraStage()]
