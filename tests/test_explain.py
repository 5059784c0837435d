"""``ModelBuilder.explain()``: the dry run says what ``build()`` then really does."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hfbuilder import BuilderInputError, Explanation, Head, ModelBuilder, hookimpl
from hfbuilder.plugins.dropout import dropout_like_keys
from hfbuilder.testing import make_config, make_tokenizer

LAUNCHER_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def _builder(path, tokenizer_for, model_class=AutoModelForCausalLM):
    return ModelBuilder(model_class, path, tokenizer_for(path))


def test_explain_matches_build_on_every_family(family, model_dir, tokenizer_for):
    path = model_dir(family)
    builder = _builder(path, tokenizer_for).with_dropout(0.3)
    explanation = builder.explain()
    assert isinstance(explanation, Explanation) and explanation.ok, explanation.errors
    model, report = builder.build_with_report()

    # Same stages, in the same order.
    assert explanation.plan == report.plan == [r.name for r in report.stages] == builder.plan()
    # Every fact both sides record agrees (vocab, dropout keys, ids, parameter count, dtype...).
    for stage in explanation.stages:
        built = report.stage(stage.name).facts
        common = set(stage.facts) & set(built)
        assert {k: stage.facts[k] for k in common} == {k: built[k] for k in common}, stage.name
    assert {"vocab_size", "dropout_keys_set", "pad_token_id", "parameters", "dtype"} <= {
        k for s in explanation.stages for k in s.facts
    }

    # ... and what the model really is.
    assert explanation.fact("vocab_size") == model.get_input_embeddings().weight.shape[0]
    original = AutoConfig.from_pretrained(path)
    changed = {k for k in dropout_like_keys(original) if getattr(model.config, k) != getattr(original, k)}
    assert set(explanation.fact("dropout_keys_set")) == changed
    assert explanation.fact("dropout_not_covered") == []
    assert explanation.fact("pad_token_id") == model.config.pad_token_id == model.generation_config.pad_token_id
    assert explanation.fact("end_token_id") == model.config.end_token_id
    assert explanation.memory.parameters == sum(p.numel() for p in model.parameters())
    assert explanation.memory.dtype == str(model.dtype).removeprefix("torch.")
    assert explanation.memory.total_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert sorted(explanation.fact("missing_weights")) == report.stage("load").facts["missing_weights"] == []
    assert {w.split(": ", 1)[1] for w in explanation.warnings} == set(report.warnings)

    formats = {f["format"] for f in explanation.files}
    assert {"json", "safetensors"} <= formats
    text = str(explanation)
    assert "resize" in text and "memory:" in text and f"{explanation.memory.parameters:,}" in text


def test_explain_reads_no_weights(model_dir, tokenizer_for, monkeypatch):
    path = model_dir("llama")

    def refuse(*args, **kwargs):
        raise AssertionError("explain() must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("torch.load", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    explanation = _builder(path, tokenizer_for).explain()
    assert explanation.ok and explanation.memory.parameters > 0


def test_explain_warns_before_a_vocabulary_shrinks(model_dir, tokenizer_for):
    path = model_dir("qwen2")  # a padded vocabulary of 64 for a tokenizer of 45
    builder = _builder(path, tokenizer_for).with_options(resize_allow_shrink=True)
    explanation = builder.explain()
    resize = explanation.stage("resize")
    assert resize.facts["vocab_size_before"] == 64 and resize.facts["vocab_size"] == 48
    assert any("shrinking the vocabulary from 64 to 48" in w for w in resize.warnings)
    with pytest.warns(UserWarning, match="shrinking"):
        model = builder.build()
    assert model.get_input_embeddings().weight.shape[0] == 48
    assert explanation.memory.parameters == sum(p.numel() for p in model.parameters())

    kept = _builder(path, tokenizer_for).explain().stage("resize")
    assert kept.facts["vocab_size"] == 64 and not kept.warnings and "kept" in kept.lines[0]


def test_explain_names_weights_the_checkpoint_lacks(tmp_path, tokenizer_for):
    AutoModel.from_config(make_config("llama")).save_pretrained(tmp_path)  # no lm_head in the file
    make_tokenizer(path=tmp_path)
    builder = _builder(str(tmp_path), tokenizer_for)
    explanation = builder.explain()
    assert explanation.stage("load").facts["missing_weights"] == ["lm_head.weight"]
    assert any("lm_head.weight" in w for w in explanation.warnings)
    with pytest.warns(UserWarning, match="lm_head.weight"):
        _, report = builder.build_with_report()
    assert report.stage("load").facts["missing_weights"] == ["lm_head.weight"]
    assert report.provenance["lm_head.weight"].startswith("initialized")


def test_token_ids_disagreement_is_explained(model_dir, tokenizer_for):
    path = model_dir("opt")
    tok = tokenizer_for(path)
    tok.eos_token = "<s>"  # id 2, while config and generation_config say 3
    explanation = ModelBuilder(AutoModelForCausalLM, path, tok).explain()
    align = explanation.stage("token_align")
    assert align.facts["eos_agree"] is False and align.facts["pad_token_id"] == 2
    assert align.facts["token_ids"]["generation_config"]["eos"] == 3
    assert any("config.eos_token_id is 3" in w for w in align.warnings)
    assert any("generate() will not stop" in w for w in align.warnings)
    assert "DISAGREE" in str(explanation)


def test_failed_checks_are_listed_not_raised(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    tok = tokenizer_for(path)
    tok.eos_token = None
    builder = ModelBuilder(AutoModelForCausalLM, path, tok)
    explanation = builder.explain()
    assert not explanation.ok
    assert explanation.errors[0].startswith("token_align: ") and "EOS" in explanation.errors[0]
    assert "the build would fail" in str(explanation)
    with pytest.raises(BuilderInputError, match="EOS"):
        builder.build()


def test_unreadable_config_stops_the_explanation(tmp_path, tokenizer_for, model_dir):
    explanation = ModelBuilder(AutoModelForCausalLM, str(tmp_path), tokenizer_for(model_dir("opt"))).explain()
    assert explanation.stage("config").error and "cannot read a model config" in explanation.stage("config").error
    assert explanation.stage("load").lines == ["not explained: stage 'config' could not be explained"]


def test_zero3_memory_is_per_rank(model_dir, tokenizer_for, monkeypatch):
    for key, value in LAUNCHER_ENV.items():
        monkeypatch.setenv(key, value)
    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    explanation = _builder(model_dir("opt"), tokenizer_for).with_zero3(ds).explain(world_size=4)
    assert explanation.ok and explanation.zero3
    assert explanation.stage("zero").facts["zero3"] is True
    mem = explanation.memory
    assert mem.dtype == "bfloat16" and mem.bytes_per_parameter == 2 and mem.world_size == 4
    assert mem.per_rank_bytes == math.ceil(mem.parameters / 4) * 2
    assert "per rank" in str(explanation)
    with pytest.raises(BuilderInputError, match="world_size"):
        _builder(model_dir("opt"), tokenizer_for).explain(world_size=0)


def test_deferred_explain_reads_no_weight_files(model_dir, tokenizer_for):
    explanation = _builder(model_dir("opt"), tokenizer_for).deferred_weights().explain()
    load = explanation.stage("load")
    assert load.facts["device"] == "meta" and "files" not in load.facts
    assert [f["path"].rsplit("/", 1)[1] for f in explanation.files] == ["config.json"]


class PoolingHead(Head):
    name = "pool_test"

    def describe(self, ctx, **options):
        ctx.fact("parameters_added", ctx.config.hidden_size)
        return [f"pools the hidden state of the last non-pad token (pad id {ctx.tokenizer.eos_token_id})"]

    def wrap(self, model, ctx, **options):
        raise NotImplementedError


class PoolingPlugin:
    @hookimpl
    def hfbuilder_heads(self):
        return [PoolingHead()]


def test_head_says_what_it_pools_and_counts_its_parameters(model_dir, tokenizer_for):
    builder = _builder(model_dir("llama"), tokenizer_for, AutoModel).with_plugin(PoolingPlugin()).with_head("pool_test")
    plain = _builder(model_dir("llama"), tokenizer_for, AutoModel).explain()
    explanation = builder.explain()
    head = explanation.stage("head")
    assert head.facts["head"] == "pool_test" and "last non-pad token" in head.lines[0]
    assert explanation.memory.parameters == plain.memory.parameters + 16


def test_explanation_is_json(model_dir, tokenizer_for):
    data = json.loads(_builder(model_dir("gpt_neox"), tokenizer_for).explain().to_json())
    assert data["plan"] == [s["name"] for s in data["stages"]]
    assert data["memory"]["parameters"] > 0 and data["errors"] == [] and data["invariants"] == "error"
    # GPT-NeoX files call lm_head 'embed_out'; transformers renames it on load, and so does explain().
    assert data["stages"][3]["facts"]["missing_weights"] == []
