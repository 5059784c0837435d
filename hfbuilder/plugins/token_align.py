"""The ``token_align`` stage: point the model's special ids at the tokenizer's EOS."""

from __future__ import annotations

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..stage import Stage


class TokenAlignStage(Stage):
    """``end_token_id`` and ``pad_token_id`` := the tokenizer's EOS (DeepSpeed-Chat's rule),
    on the config and on ``generation_config`` alike.

    DeepSpeed-Chat copies ``config.eos_token_id`` into ``pad_token_id``, which points at the
    wrong token whenever the config and the tokenizer disagree; hfbuilder takes the tokenizer's.
    """

    name = "token_align"
    after = ("load",)

    def check(self, ctx: BuildContext) -> None:
        if getattr(ctx.tokenizer, "eos_token_id", None) is None:
            raise BuilderInputError(
                f"the tokenizer {type(ctx.tokenizer).__name__} has no EOS token (eos_token_id is None); "
                "set tokenizer.eos_token before building (DeepSpeed-Chat uses it as end and pad token)"
            )

    def explain(self, ctx: BuildContext) -> list[str]:
        eos = ctx.tokenizer.eos_token_id
        lines = [f"end_token_id = pad_token_id = {eos} (tokenizer EOS {ctx.tokenizer.eos_token!r})"]
        cfg_eos = getattr(ctx.config, "eos_token_id", None)
        if cfg_eos is not None and cfg_eos != eos:
            lines.append(f"WARNING: config.eos_token_id is {cfg_eos}, the tokenizer's EOS is {eos}")
        tok_pad = getattr(ctx.tokenizer, "pad_token_id", None)
        if tok_pad is not None and tok_pad != eos:
            lines.append(f"note: tokenizer.pad_token_id is {tok_pad}; the model's pad_token_id will be {eos}")
        return lines

    def run(self, ctx: BuildContext) -> None:
        eos = ctx.tokenizer.eos_token_id
        config = ctx.model.config
        config.end_token_id = eos
        config.pad_token_id = eos
        generation = getattr(ctx.model, "generation_config", None)
        if generation is not None:
            generation.pad_token_id = eos  # generate() reads its pad id from here, not from config
        cfg_eos = getattr(ctx.model.config, "eos_token_id", None)
        if cfg_eos is not None and cfg_eos != eos:
            ctx.warn(f"config.eos_token_id is {cfg_eos} but the tokenizer's EOS is {eos}; pad/end use {eos}")
        ctx.note(f"end_token_id = pad_token_id = {eos} on config and generation_config")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [TokenAlignStage()]
