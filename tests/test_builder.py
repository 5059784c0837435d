"""ModelBuilder on real tiny models: equality with DeepSpeed-Chat, immutability, bad inputs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hfbuilder import BuilderInputError, HFBuilderError, ModelBuilder, UnknownHeadError
from hfbuilder.compat import create_hf_model
from hfbuilder.testing import make_tokenizer
from hfbuilder.testing.dschat import create_hf_model as dschat_create_hf_model

DEFAULT_PLAN = ["config", "dropout", "zero", "load", "token_align", "resize"]


def test_default_plan(model_dir, tokenizer_for):
    path = model_dir("opt")
    assert ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).plan() == DEFAULT_PLAN


def test_compat_equals_dschat_reference(family, model_dir, tokenizer_for):
    path = model_dir(family)
    tok = tokenizer_for(path)
    ref = dschat_create_hf_model(AutoModelForCausalLM, path, tok)
    ours = create_hf_model(AutoModelForCausalLM, path, tok)

    assert ours.config.to_dict() == ref.config.to_dict()
    expected_vocab = 8 * math.ceil(len(tok) / 8)
    assert ours.get_input_embeddings().weight.shape[0] == expected_vocab
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert our_state.keys() == ref_state.keys()
    old_vocab = AutoConfig.from_pretrained(path).vocab_size
    emb_names = {n for n, t in our_state.items() if t.dim() == 2 and t.shape[0] == expected_vocab}
    for name, ref_tensor in ref_state.items():
        mine = our_state[name]
        assert mine.shape == ref_tensor.shape, name
        if name in emb_names:  # new rows are random (mean-resized); the old rows are the checkpoint's
            keep = min(old_vocab, expected_vocab)
            torch.testing.assert_close(mine[:keep], ref_tensor[:keep], rtol=0, atol=0)
            assert torch.isfinite(mine).all()
        else:
            torch.testing.assert_close(mine, ref_tensor, rtol=0, atol=0, msg=name)


def test_builder_keeps_a_larger_vocabulary_that_compat_shrinks(model_dir, tokenizer_for):
    path = model_dir("qwen2")  # config vocab 64 > len(tokenizer) 45
    tok = tokenizer_for(path)
    kept = ModelBuilder(AutoModelForCausalLM, path, tok).build()
    assert kept.get_input_embeddings().weight.shape[0] == 64
    with pytest.warns(UserWarning, match="shrinking the vocabulary"):
        shrunk = create_hf_model(AutoModelForCausalLM, path, tok)
    assert shrunk.get_input_embeddings().weight.shape[0] == 48


def test_resize_multiple_option(model_dir, tokenizer_for):
    path = model_dir("llama")
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_options(resize_multiple=64).build()
    assert model.get_input_embeddings().weight.shape[0] == 64
    assert model.get_output_embeddings().weight.shape[0] == 64


def test_token_ids_follow_the_tokenizer_eos(family, model_dir, tokenizer_for):
    path = model_dir(family)
    tok = tokenizer_for(path)
    model = ModelBuilder(AutoModelForCausalLM, path, tok).build()
    assert model.config.end_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.eos_token_id


def test_pad_is_the_tokenizer_eos_even_when_the_config_disagrees(model_dir, tokenizer_for):
    path = model_dir("opt", eos_token_id=2)  # the config says 2, the tokenizer's EOS is 3
    tok = tokenizer_for(path)
    with pytest.warns(UserWarning, match="config.eos_token_id is 2"):
        model = create_hf_model(AutoModelForCausalLM, path, tok)
    assert model.config.pad_token_id == 3  # DeepSpeed-Chat would have set 2


def test_tokenizer_without_eos_fails_before_weights_are_read(model_dir, monkeypatch):
    path = model_dir("opt")
    tok = make_tokenizer()
    tok.eos_token = None
    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(HFBuilderError, match="no EOS token"):
        ModelBuilder(AutoModelForCausalLM, path, tok).build()
    assert calls == []


def test_builder_methods_return_new_builders(model_dir, tokenizer_for):
    path = model_dir("opt")
    base = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))
    snapshot = copy.copy(base.__dict__)
    derived = [
        base.with_dropout(0.2),
        base.with_deepspeed({"zero_optimization": {"stage": 2}}),
        base.with_zero3({"zero_optimization": {"stage": 3}}),
        base.deferred_weights(),
        base.without_stage("resize"),
        base.with_options(resize_multiple=16),
        base.with_head("reward"),
        base.with_plugin(object()),
    ]
    assert base.__dict__ == snapshot
    assert dict(base.options) == {}
    for d in derived:
        assert d is not base and d != base
    with pytest.raises(TypeError):
        base.options["dropout"] = 0.5  # the options mapping is read-only
    with pytest.raises(AttributeError):
        base.tokenizer = None


def test_actor_reference_critic_from_one_base(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    base = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))
    actor = base.with_dropout(0.25).build()
    reference = base.with_dropout(0.0).build()
    plain = base.build()
    assert {m.p for m in actor.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    assert {m.p for m in reference.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    assert {m.p for m in plain.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_passed_config_is_never_mutated(model_dir, tokenizer_for):
    path = model_dir("opt")
    config = AutoConfig.from_pretrained(path)
    before = config.to_dict()
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_options(config=config).with_dropout(0.4).build()
    assert config.to_dict() == before
    assert model.config.dropout == 0.4


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", None, True, [0.1]])
def test_bad_dropout_is_a_value_error_naming_it(model_dir, tokenizer_for, bad):
    path = model_dir("opt")
    with pytest.raises(ValueError, match="dropout") as info:
        ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(bad)
    assert repr(bad) in str(info.value)
    assert isinstance(info.value, HFBuilderError)


def test_with_zero3_rejects_other_stages(model_dir, tokenizer_for, tmp_path):
    path = model_dir("opt")
    b = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))
    with pytest.raises(BuilderInputError, match="zero_optimization.stage == 2"):
        b.with_zero3({"zero_optimization": {"stage": 2}})
    with pytest.raises(BuilderInputError, match="no zero_optimization.stage"):
        b.with_zero3({"train_batch_size": 8})
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert b.with_zero3(str(cfg)).ds_config["zero_optimization"]["stage"] == 3
    with pytest.raises(BuilderInputError, match="does not exist"):
        b.with_deepspeed(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(BuilderInputError, match="not valid JSON"):
        b.with_deepspeed(str(tmp_path / "bad.json"))


def test_stage2_config_builds_without_partitioning(model_dir, tokenizer_for):
    path = model_dir("opt")
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_deepspeed(
        {"zero_optimization": {"stage": 2}}
    ).build()
    assert not any(hasattr(p, "ds_id") for p in model.parameters())


def test_bad_constructor_inputs(model_dir, tokenizer_for):
    path = model_dir("opt")
    tok = tokenizer_for(path)
    with pytest.raises(BuilderInputError, match="model_class"):
        ModelBuilder(dict, path, tok)
    with pytest.raises(BuilderInputError, match="model_name_or_path"):
        ModelBuilder(AutoModelForCausalLM, "", tok)
    with pytest.raises(BuilderInputError, match="tokenizer is None"):
        ModelBuilder(AutoModelForCausalLM, path, None)


def test_missing_model_path_is_an_input_error(tmp_path):
    with pytest.raises(BuilderInputError, match="cannot read a model config"):
        ModelBuilder(AutoModelForCausalLM, str(tmp_path / "nowhere"), make_tokenizer()).build()


def test_unknown_head_names_it_and_lists_known(model_dir, tokenizer_for):
    path = model_dir("opt")
    with pytest.raises(UnknownHeadError, match="'nope'.*known heads"):
        ModelBuilder(AutoModel, path, tokenizer_for(path)).with_head("nope").build()


def test_build_report_records_every_stage(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    model, report = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(0.0).build_with_report()
    assert [r.name for r in report.stages] == DEFAULT_PLAN
    assert all(r.seconds >= 0 and r.peak_rss_mib > 0 for r in report.stages)
    assert any("resid_pdrop" in a for a in report.stage("dropout").actions)
    assert "48" in " ".join(report.stage("resize").actions)
    assert json.loads(report.to_json())["plan"] == DEFAULT_PLAN
    assert "resize" in report.format()
