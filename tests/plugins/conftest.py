"""Fixtures the plugin tests share."""

from __future__ import annotations

import pytest

#: The families the reward-head tests cover; OPT pads the first token (num_padding_at_beginning=1).
REWARD_FAMILIES = [("opt", 1), ("llama", 0), ("gpt_neox", 0)]


@pytest.fixture(scope="module")
def reward_models(model_dir, tokenizer_for):
    """family -> (reward model in eval mode, num_padding_at_beginning, path, tokenizer); one set per test module,
    so a module may change its models' weights without touching another's."""
    from transformers import AutoModel

    from hfbuilder import ModelBuilder

    out = {}
    for family, npb in REWARD_FAMILIES:
        path = model_dir(family)
        tok = tokenizer_for(path)
        model = ModelBuilder(AutoModel, path, tok).with_head("reward", num_padding_at_beginning=npb).build()
        out[family] = (model.eval(), npb, path, tok)
    return out
