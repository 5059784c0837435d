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

import warnings
from typing import Any

from .builder import ModelBuilder
from .dsconfig import zero_stage_of


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


def create_critic_model(
    model_name_or_path: str,
    tokenizer: Any,
    ds_config: dict[str, Any] | None,
    num_padding_at_beginning: int = 0,
    rlhf_training: bool = False,
    dropout: float | None = None,
    zero_stage: int = 0,
    compute_fp32_loss: bool = False,
) -> Any:
    """DeepSpeed-Chat's ``create_critic_model``: ``AutoModel`` plus the reward head.

    Without ``rlhf_training`` (step 2) the base is the pretrained model and ``v_head``
    is new. With it (step 3) the whole reward model is loaded from the step-2 output
    through the checkpoint stage: strictly, safetensors first, never unpickling code,
    and with no weight initialized only to be overwritten.

    ``zero_stage`` is accepted for the signature; whether ZeRO-3 is used is read
    from ``ds_config``, as ``create_hf_model`` does, and a disagreement is reported.
    """
    from transformers import AutoModel

    builder = _dschat_builder(AutoModel, model_name_or_path, tokenizer, ds_config, False, dropout).with_head(
        "reward", num_padding_at_beginning=num_padding_at_beginning, compute_fp32_loss=compute_fp32_loss
    )
    if rlhf_training:
        builder = builder.with_checkpoint(model_name_or_path)
    configured = zero_stage_of(dict(builder.ds_config) if builder.ds_config is not None else None)
    if (zero_stage == 3) != (configured == 3):
        warnings.warn(
            f"create_critic_model(zero_stage={zero_stage}) but the DeepSpeed config asks for ZeRO stage "
            f"{configured}; hfbuilder follows the config",
            stacklevel=2,
        )
    return builder.build()


__all__ = ["create_critic_model", "create_hf_model"]
