"""DeepSpeed-Chat's ``create_hf_model`` six steps, written directly with transformers.

The reference the equality tests compare against. It deliberately keeps
DeepSpeed-Chat's behaviour (four dropout keys, pad := config.eos_token_id, resize to
exactly the next multiple of 8, shrinking if needed).
"""

from __future__ import annotations

import math

DSCHAT_DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout")


def dschat_create_hf_model(model_class, path, tokenizer, dropout=None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        for key in DSCHAT_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, dropout)
    model = model_class.from_pretrained(path, config=config)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model
