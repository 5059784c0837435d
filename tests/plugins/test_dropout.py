"""The dropout stage reaches every nn.Dropout of every family, and says what it cannot reach."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfbuilder import ModelBuilder, hookimpl
from hfbuilder.plugins.dropout import DROPOUT_KEYS


def dropout_ps(model):
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_every_dropout_module_and_key_gets_p(family, model_dir, tokenizer_for):
    path = model_dir(family)
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(0.37).build()
    assert dropout_ps(model) <= {0.37}
    set_keys = [k for k in DROPOUT_KEYS if hasattr(model.config, k)]
    assert set_keys, family
    for key in set_keys:
        assert getattr(model.config, key) == 0.37, key


def test_gpt2_pdrop_keys_that_dschat_misses(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(0.0).build()
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert dropout_ps(model) == {0.0}


def test_family_without_known_keys_warns_naming_model_type(model_dir, tokenizer_for):
    path = model_dir("gpt2")

    b = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(0.2)
    from hfbuilder.plugins.dropout import DropoutStage

    class Narrow(DropoutStage):
        def run(self, ctx):
            ctx.dropout_keys = ("not_a_key",)
            super().run(ctx)

    with pytest.warns(UserWarning, match="'gpt2' config has none of the known dropout keys"):
        b.replace_stage(Narrow).build()


def test_plugin_teaches_a_new_dropout_key(model_dir, tokenizer_for):
    path = model_dir("opt", my_dropout=0.9)

    class Keys:
        @hookimpl
        def hfbuilder_dropout_keys(self):
            return ["my_dropout"]

    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_plugin(Keys()).with_dropout(0.1).build()
    assert model.config.my_dropout == 0.1


def test_unknown_dropout_like_keys_are_reported(model_dir, tokenizer_for):
    path = model_dir("opt", exotic_dropout=0.3)
    with pytest.warns(UserWarning, match="exotic_dropout"):
        model, report = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(0.1).build_with_report()
    assert model.config.exotic_dropout == 0.3


def test_no_dropout_requested_leaves_config_alone(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).build()
    assert model.config.resid_pdrop == 0.1


def test_a_nan_dropout_in_config_json_is_refused_naming_it(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from hfbuilder import BuilderInputError, ModelBuilder
    from hfbuilder.testing import make_model, make_tokenizer

    path = make_model("opt", tmp_path / "nan-dropout")
    config = json.loads((tmp_path / "nan-dropout" / "config.json").read_text())
    config["attention_dropout"] = float("nan")
    (tmp_path / "nan-dropout" / "config.json").write_text(json.dumps(config))
    builder = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer())
    with pytest.raises(BuilderInputError, match="attention_dropout"):
        builder.build()
    assert not builder.explain().ok
    assert builder.with_dropout(0.0).build().config.attention_dropout == 0.0  # a value set replaces it
