"""The ``reward`` head: wrap the model in DeepSpeed-Chat's :class:`RewardModel`.

``ModelBuilder(AutoModel, path, tok).with_head("reward", num_padding_at_beginning=1)``
gives DeepSpeed-Chat's critic/reward model. The head is registered through
``hfbuilder_heads`` exactly as a third-party head would be.

``RewardModel`` itself lives in :mod:`hfbuilder.plugins.reward_model` (it needs
torch at import time) and is re-exported here lazily, so registering the head
stays free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..stage import Head

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .reward_model import RewardModel

#: Options ``with_head("reward", ...)`` takes, with their defaults (DeepSpeed-Chat's).
REWARD_OPTIONS: dict[str, Any] = {"num_padding_at_beginning": 0, "compute_fp32_loss": False}


def new_value_head(base: nn.Module, ctx: BuildContext, bias: bool = False) -> nn.Module:
    """``Linear(dim, 1, bias=bias)`` in the base model's dtype and on its device.

    DeepSpeed-Chat's head has no bias; one is added when the checkpoint's head has one
    (TRL, LLaMA-Factory, ``*ForTokenClassification``), as the ``reward_layout`` stage found.

    On a deferred build the base is on the meta device, so the head is too and
    costs nothing until the checkpoint or the ``materialize`` stage fills it. Under
    ZeRO-3 it is made inside ``deepspeed.zero.Init`` so it is partitioned like the
    rest of the model; the zero plugin makes the ranks agree on its initial values.
    """
    from torch import nn

    from .reward_model import value_head_dim

    dim = value_head_dim(base.config)
    if ctx.zero3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ctx.ds_config):
            return nn.Linear(dim, 1, bias=bias)
    ref = next(base.parameters(), None)
    return nn.Linear(dim, 1, bias=bias, device=ref.device if ref is not None else None,
                     dtype=ref.dtype if ref is not None else None)


class RewardHead(Head):
    """DeepSpeed-Chat's reward/critic head; options ``num_padding_at_beginning`` and ``compute_fp32_loss``."""

    name = "reward"

    def check(self, ctx: BuildContext, **options: Any) -> None:
        unknown = sorted(set(options) - set(REWARD_OPTIONS))
        if unknown:
            raise BuilderInputError(f"head 'reward' has no option(s) {unknown}; it takes {sorted(REWARD_OPTIONS)}")
        npb = options.get("num_padding_at_beginning", 0)
        if isinstance(npb, bool) or not isinstance(npb, int) or npb < 0:
            raise BuilderInputError(f"num_padding_at_beginning must be an int >= 0, got {npb!r}")
        fp32 = options.get("compute_fp32_loss", False)
        if not isinstance(fp32, bool):
            raise BuilderInputError(f"compute_fp32_loss must be True or False, got {fp32!r}")
        if getattr(ctx.tokenizer, "pad_token_id", None) is None:
            raise BuilderInputError(
                f"the reward head finds the end of each sequence by its pad token, and the tokenizer "
                f"{type(ctx.tokenizer).__name__} has none; set tokenizer.pad_token (DeepSpeed-Chat uses the EOS token)"
            )

    def describe(self, ctx: BuildContext, **options: Any) -> list[str]:
        opts = {**REWARD_OPTIONS, **options}
        skip = opts["num_padding_at_beginning"]
        which = "first pad token" if skip == 0 else f"pad token after the first {skip} (which lead the sequence)"
        lines = [
            f"wrap in RewardModel: v_head Linear(hidden, 1) scoring the token before the "
            f"{which} (pad id {ctx.tokenizer.pad_token_id})",
            f"pairwise loss in {'fp32' if opts['compute_fp32_loss'] else 'the model dtype'}",
        ]
        if _checkpoint_head_bias(ctx):
            lines.append("v_head has a bias, as the checkpoint's head does")
        if ctx.model is not None:  # the architecture on the meta device: count what the head adds and drops
            from .reward_model import base_for_reward, value_head_dim

            base = base_for_reward(ctx.model)  # a causal LM without a findable base fails here, before the build
            dropped = sum(p.numel() for p in ctx.model.parameters()) - sum(p.numel() for p in base.parameters())
            ctx.fact("parameters_added", value_head_dim(base.config) + _checkpoint_head_bias(ctx) - dropped)
            if dropped:
                lines.append(f"uses {type(base).__name__} inside {type(ctx.model).__name__}: its LM head "
                             f"({dropped:,} parameters) is left out")
        return lines

    def wrap(self, model: nn.Module, ctx: BuildContext, **options: Any) -> RewardModel:
        from .reward_model import RewardModel, base_for_reward

        opts = {**REWARD_OPTIONS, **options}
        base = base_for_reward(model)
        if base is not model:
            ctx.note(f"using {type(base).__name__} inside {type(model).__name__}: its LM head is not scored")
        head = new_value_head(base, ctx, bias=_checkpoint_head_bias(ctx))
        return RewardModel(base, ctx.tokenizer, v_head=head, **opts)


def _checkpoint_head_bias(ctx: BuildContext) -> bool:
    """Whether the checkpoint's head has a bias, as the ``reward_layout`` stage found (False without it)."""
    resolved = ctx.reward_layout
    return resolved is not None and resolved.key_map.bias is not None


def __getattr__(name: str) -> Any:
    if name == "RewardModel":
        from .reward_model import RewardModel

        return RewardModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def hfbuilder_heads() -> list[Head]:
    return [RewardHead()]


__all__ = ["REWARD_OPTIONS", "RewardHead", "RewardModel", "new_value_head"]
