"""Drop-in replacements for DeepSpeed-Chat's model factories, built on :class:`ModelBuilder`.

Same signatures and same results as ``dschat.utils.model.model_utils``, without its
known faults:

- dropout reaches every dropout key of the config (GPT-2's ``*_pdrop`` too);
- ``HfDeepSpeedConfig`` lives for the build only, so a later plain build is not partitioned;
- ``pad_token_id`` is the tokenizer's EOS, not whatever ``config.eos_token_id`` says;
- a tokenizer without EOS is an error instead of ``pad_token_id = None``.

Like DeepSpeed-Chat, the vocabulary is resized to exactly ``8 * ceil(len(tokenizer) / 8)``,
shrinking a larger (padded) one; ``ModelBuilder`` keeps it by default.
"""

from __future__ import annotations

from typing import Any

from .builder import ModelBuilder


def _dschat_builder(
    model_class: Any,
    model_name_or_path: str,
    tokenizer: Any,
    ds_config: dict[str, Any] | None,
    rlhf_training: bool,
    dropout: float | None,
) -> ModelBuilder:
    builder = ModelBuilder(model_class, model_name_or_path, tokenizer).with_options(resize_allow_shrink=True)
    if dropout is not None:
        builder = builder.with_dropout(dropout)
    if ds_config is not None:
        builder = builder.with_deepspeed(ds_config)
    if rlhf_training:
        builder = builder.deferred_weights()
    return builder


def create_hf_model(
    model_class: Any,
    model_name_or_path: str,
    tokenizer: Any,
    ds_config: dict[str, Any] | None = None,
    rlhf_training: bool = False,
    dropout: float | None = None,
) -> Any:
    """DeepSpeed-Chat's ``create_hf_model``: config, dropout, ZeRO-3, load, EOS ids, resize to 8."""
    return _dschat_builder(model_class, model_name_or_path, tokenizer, ds_config, rlhf_training, dropout).build()


__all__ = ["create_hf_model"]
