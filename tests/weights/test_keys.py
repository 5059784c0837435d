"""The one key map: transformers' renamings, the base-model prefix rule, wrapped models, conversions."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hfbuilder.testing import make_config
from hfbuilder.weights import map_keys


def _meta(family_or_config, cls=tf.AutoModelForCausalLM):
    config = make_config(family_or_config) if isinstance(family_or_config, str) else family_or_config
    with torch.device("meta"):
        return cls.from_config(config)


class Wrapper(torch.nn.Module):
    """A DeepSpeed-Chat-style wrapper: a transformers model under a prefix, and a head outside it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.v_head = torch.nn.Linear(16, 1, bias=False, device="meta")


def test_legacy_names_are_renamed_as_transformers_renames():
    model = _meta("gpt_neox")  # transformers 5 loads GPT-NeoX's embed_out as lm_head
    keymap = map_keys(model, ["embed_out.weight", "gpt_neox.embed_in.weight", "nonsense.weight"])
    assert keymap.names == {"embed_out.weight": "lm_head.weight", "gpt_neox.embed_in.weight": "gpt_neox.embed_in.weight"}
    assert keymap.unused == ["nonsense.weight"]
    assert keymap.sources() == {"lm_head.weight": "embed_out.weight", "gpt_neox.embed_in.weight": "gpt_neox.embed_in.weight"}
    assert keymap.filled == {"lm_head.weight", "gpt_neox.embed_in.weight"}


def test_a_key_of_the_same_name_wins_over_a_renamed_one():
    model = _meta("gpt_neox")
    keymap = map_keys(model, ["embed_out.weight", "lm_head.weight"])
    assert keymap.sources() == {"lm_head.weight": "lm_head.weight"}


@pytest.mark.parametrize("prefixes", [True, False])
def test_the_base_model_prefix_rule_is_from_pretrained_only(prefixes):
    model = _meta("llama")
    bare = ["layers.0.self_attn.q_proj.weight", "embed_tokens.weight"]
    keymap = map_keys(model, bare, prefixes=prefixes)
    if prefixes:  # a bare LlamaModel's checkpoint loads into LlamaForCausalLM, as from_pretrained does
        assert keymap.names == {k: f"model.{k}" for k in bare} and keymap.unused == []
    else:  # the checkpoint stage wants the state dict of the model being built
        assert keymap.names == {} and keymap.unused == bare
    base = _meta(make_config("llama"), tf.AutoModel)
    stripped = map_keys(base, ["model.embed_tokens.weight", "lm_head.weight"], prefixes=prefixes)
    assert stripped.names == ({"model.embed_tokens.weight": "embed_tokens.weight"} if prefixes else {})
    assert "lm_head.weight" in stripped.unused


def test_a_wrapped_model_is_renamed_under_its_own_path_and_the_head_matches_exactly():
    model = Wrapper(_meta("gpt_neox"))
    keys = ["inner.embed_out.weight", "inner.gpt_neox.embed_in.weight", "v_head.weight", "embed_out.weight",
            "v_head.gamma"]
    keymap = map_keys(model, keys, prefixes=False)
    assert keymap.names == {
        "inner.embed_out.weight": "inner.lm_head.weight",
        "inner.gpt_neox.embed_in.weight": "inner.gpt_neox.embed_in.weight",
        "v_head.weight": "v_head.weight",
    }
    assert keymap.unused == ["embed_out.weight", "v_head.gamma"]  # outside the wrapper's path: no renaming


def test_keys_that_need_a_value_conversion_are_told_apart():
    config = tf.MixtralConfig(vocab_size=45, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    model = _meta(config)
    experts = "model.layers.0.block_sparse_moe.experts.0.w1.weight"  # merged into experts.gate_up_proj
    gate = "model.layers.0.block_sparse_moe.gate.weight"  # a plain rename
    keymap = map_keys(model, [experts, gate])
    assert keymap.converted == {experts: "model.layers.0.mlp.experts.gate_up_proj"}
    assert keymap.names == {gate: "model.layers.0.mlp.gate.weight"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in keymap.filled


def test_agrees_with_from_pretrained_on_missing_and_unused_keys(tmp_path, model_dir):
    """The point of one rule: what map_keys predicts is what transformers' loader does."""
    from safetensors.torch import load_file, save_file

    path = model_dir("gpt_neox")
    state = load_file(f"{path}/model.safetensors")
    assert "embed_out.weight" in state  # save_pretrained writes the legacy name back
    del state["gpt_neox.final_layer_norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    out = tmp_path / "legacy"
    tf.AutoConfig.from_pretrained(path).save_pretrained(out)
    save_file(state, str(out / "model.safetensors"))
    _, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    keymap = map_keys(_meta("gpt_neox"), state)
    model_names = set(_meta("gpt_neox").state_dict())
    assert sorted(model_names - keymap.filled) == sorted(info["missing_keys"]) == ["gpt_neox.final_layer_norm.bias"]
    assert sorted(keymap.unused) == sorted(info["unexpected_keys"]) == ["extra.weight"]
