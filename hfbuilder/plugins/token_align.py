"""The ``token_align`` stage: point the model's special ids at the tokenizer's EOS."""

from __future__ import annotations

import os
from typing import Any

from ..context import BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..stage import Stage
from ..weights import read_json


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
        tok = ctx.tokenizer
        generation = _generation_ids(ctx) if not ctx.settings("load").deferred else None
        sources = {
            "tokenizer": {"eos": eos, "pad": getattr(tok, "pad_token_id", None), "bos": getattr(tok, "bos_token_id", None)},
            "config": {k: getattr(ctx.config, f"{k}_token_id", None) for k in ("eos", "pad", "bos")},
        }
        if generation is not None:
            sources["generation_config"] = {k: generation.get(f"{k}_token_id") for k in ("eos", "pad", "bos")}
        agree = all(_has(ids["eos"], eos) for ids in sources.values())
        ctx.fact("token_ids", sources)
        ctx.fact("eos_agree", agree)
        ctx.fact("end_token_id", eos)
        ctx.fact("pad_token_id", eos)

        def row(key: str) -> str:
            return ", ".join(f"{where} {ids[key]}" for where, ids in sources.items())

        lines = [
            f"eos ids {'agree' if agree else 'DISAGREE'}: {row('eos')}",
            f"pad ids: {row('pad')} -> {eos} on config and generation_config",
            f"set end_token_id = pad_token_id = {eos} (tokenizer EOS {tok.eos_token!r})",
        ]
        _warn_disagreement(ctx, eos, getattr(ctx.config, "eos_token_id", None), (generation or {}).get("eos_token_id"))
        return lines

    def run(self, ctx: BuildContext) -> None:
        eos = ctx.tokenizer.eos_token_id
        config = ctx.model.config
        config.end_token_id = eos
        config.pad_token_id = eos
        generation = getattr(ctx.model, "generation_config", None)
        if generation is not None:
            generation.pad_token_id = eos  # generate() reads its pad id from here, not from config
        _warn_disagreement(
            ctx, eos, getattr(config, "eos_token_id", None), getattr(generation, "eos_token_id", None)
        )
        ctx.fact("end_token_id", config.end_token_id)
        ctx.fact("pad_token_id", config.pad_token_id)
        ctx.note(f"end_token_id = pad_token_id = {eos} on config and generation_config")


def _has(value: Any, token_id: int) -> bool:
    """An eos id setting (an int, or a list as in Llama 3's generation_config) includes ``token_id``."""
    return token_id in value if isinstance(value, (list, tuple)) else value == token_id


def _warn_disagreement(ctx: BuildContext, eos: int, cfg_eos: Any, generation_eos: Any) -> None:
    if cfg_eos is not None and not _has(cfg_eos, eos):
        ctx.warn(f"config.eos_token_id is {cfg_eos} but the tokenizer's EOS is {eos}; pad/end use {eos}")
    if generation_eos is not None and not _has(generation_eos, eos):
        ctx.warn(
            f"generation_config.eos_token_id is {generation_eos} but the tokenizer's EOS is {eos}: "
            "generate() will not stop at the tokenizer's EOS"
        )


def _generation_ids(ctx: BuildContext) -> dict[str, Any] | None:
    """generation_config.json beside the weights, which from_pretrained will load; None if absent."""
    path = os.path.join(ctx.model_name_or_path, "generation_config.json")
    return read_json(path) if os.path.isdir(ctx.model_name_or_path) else None


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [TokenAlignStage()]
