"""The ``fp32_loss`` stage: compute the training loss in fp32 (``.with_fp32_loss()``).

DeepSpeed-Chat's ``causal_lm_model_to_fp32_loss``: in fp16/bf16 training, the
cross-entropy over a large vocabulary loses precision. The model's forward runs
as before without ``labels``; the shifted cross-entropy is then computed on the
logits cast to fp32. On a ``RewardModel`` the same option turns on its
``compute_fp32_loss``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage


@dataclass(frozen=True)
class Fp32LossSettings(Settings):
    enabled: bool = setting(False, option="fp32_loss", doc="compute the loss in fp32 (with_fp32_loss())")


def fp32_loss_forward(model: Any) -> Any:
    """A forward for ``model`` that takes ``labels`` and returns an fp32 loss; it keeps the original signature."""
    import torch

    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, labels: Any = None, **kwargs: Any) -> Any:
        output = original(*args, labels=None, **kwargs)
        if labels is None:
            return output
        return_dict = isinstance(output, dict)  # ModelOutput is an OrderedDict
        logits = output.logits if return_dict else output[0]
        labels = labels.to(logits.device)
        shift_logits = logits[..., :-1, :].float().contiguous()
        shift_labels = labels[..., 1:].contiguous()
        batch_size, seq_length, vocab_size = shift_logits.shape
        loss = torch.nn.CrossEntropyLoss()(
            shift_logits.view(batch_size * seq_length, vocab_size), shift_labels.view(batch_size * seq_length)
        )
        if not return_dict:
            return (loss, *output)
        output.loss = loss
        return output

    forward.__original_forward__ = original  # type: ignore[attr-defined]
    return forward


class Fp32LossStage(Stage):
    """Runs after the head and LoRA, so the forward it wraps is the final one."""

    name = "fp32_loss"
    after = ("head", "checkpoint", "materialize", "lora")

    Settings = Fp32LossSettings

    def enabled(self, settings: Any) -> bool:
        return settings(self.name).enabled

    def explain(self, ctx: BuildContext) -> list[str]:
        return ["compute the loss in fp32 (DeepSpeed-Chat's causal_lm_model_to_fp32_loss)"]

    def run(self, ctx: BuildContext) -> None:
        model = ctx.model
        if hasattr(model, "compute_fp32_loss"):
            model.compute_fp32_loss = True
            ctx.note(f"{type(model).__name__}.compute_fp32_loss = True")
            return
        get_out = getattr(model, "get_output_embeddings", None)
        if get_out is None or get_out() is None:
            raise BuilderInputError(
                f"with_fp32_loss() applies to causal LMs and reward models; {type(model).__name__} has neither "
                "an LM head nor compute_fp32_loss"
            )
        model.forward = fp32_loss_forward(model)
        ctx.note(f"{type(model).__name__}.forward computes its shifted cross-entropy in fp32")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [Fp32LossStage()]
