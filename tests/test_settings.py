"""Settings: declared by the stage that reads them, checked where they are set, resolved by name."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hfbuilder
from hfbuilder import BuilderInputError, ModelBuilder, Settings, Stage, setting
from hfbuilder.testing import make_tokenizer


@pytest.fixture(scope="module")
def base(model_dir):
    return ModelBuilder(AutoModelForCausalLM, model_dir("opt"), make_tokenizer())


@pytest.mark.parametrize("typo, valid", [("deffered", "deferred"), ("chekpoint", "checkpoint"),
                                         ("mean_resising", "mean_resizing"), ("resize_multipel", "resize_multiple")])
def test_a_typo_fails_and_lists_the_valid_names_closest_first(base, typo, valid):
    with pytest.raises(BuilderInputError, match=rf"invalid option {typo!r}.*closest first: \['{valid}'"):
        base.with_options(**{typo: True})


def test_unknown_stage_and_field_in_configure(base):
    with pytest.raises(BuilderInputError, match=r"unknown stage 'resise'.*closest first: \['resize'"):
        base.configure("resise", multiple=16)
    with pytest.raises(BuilderInputError, match=r"invalid setting 'multipel' for stage resize.*\['multiple'"):
        base.configure("resize", multipel=16)


@pytest.mark.parametrize("options", [
    {"deferred": "false"}, {"resize_allow_shrink": "false"}, {"mean_resizing": "no"}, {"freeze": "no"},
    {"dropout": float("nan")}, {"dropout": -0.1}, {"dropout": "0.1"}, {"dropout": True}, {"resize_multiple": 10**9},
    {"resize_multiple": 0}, {"resize_multiple": 8.0}, {"dtype": "float8"}, {"device": "tpu"}, {"invariants": "maybe"},
    {"lora": {"r": 0}}, {"lora": {"alpha": float("inf")}}, {"lora": {"target_modules": []}},
])
def test_wrongly_typed_values_are_refused_where_they_are_set(base, options):
    with pytest.raises(BuilderInputError):
        base.with_options(**options)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_dropout_is_a_finite_probability(p):
    ok = math.isfinite(p) and 0 <= p <= 1
    builder = ModelBuilder(AutoModelForCausalLM, "unused-path", object())
    if ok:
        assert builder.with_dropout(p).options["dropout"] == p
    else:
        with pytest.raises(BuilderInputError, match="dropout"):
            builder.with_dropout(p)


def test_flat_names_resolve_to_their_stage(base):
    b = base.with_options(dropout=0.0, resize_multiple=16, checkpoint_strict=False, lora={"r": 4}, dtype="bfloat16")
    assert b.settings["dropout"] == {"p": 0.0}
    assert b.settings["resize"] == {"multiple": 16}
    assert b.settings["checkpoint"] == {"strict": False}
    assert b.settings["lora"] == {"r": 4, "enabled": True}
    assert base.configure("resize", multiple=16).settings == base.with_options(resize_multiple=16).settings
    assert dict(b.without_options("lora", "dropout").settings) == {
        "resize": {"multiple": 16}, "checkpoint": {"strict": False}, "load": {"dtype": "bfloat16"}}
    assert base.settings == {}  # the base builder is unchanged


def test_fluent_methods_are_sugar_over_configure(base):
    assert base.with_dtype("bfloat16").settings == base.configure("load", dtype="bfloat16").settings
    import torch

    assert base.with_dtype(torch.float16).options["dtype"] == "float16"
    assert base.frozen().settings == base.configure("freeze", enabled=True).settings
    assert base.with_lora(r=4, target_modules=["q_proj"]).settings["lora"]["target_modules"] == ("q_proj",)


@dataclass(frozen=True)
class ShoutSettings(Settings):
    loud: bool = setting(False, option="loud", doc="shout")
    times: int = setting(1, min=1, max=5, doc="how often")
    words: Mapping[str, int] = setting({}, doc="a mapping, stored frozen")


class Shout(Stage):
    name = "shout"
    after = ("resize",)
    Settings = ShoutSettings

    def run(self, ctx):
        ctx.note(f"loud={ctx.settings(self.name).loud} times={ctx.settings('shout').times}")


class Whisper(Stage):
    name = "whisper"
    after = ("resize",)

    @dataclass(frozen=True)
    class Settings(hfbuilder.Settings):
        loud: bool = setting(False, option="loud", doc="whisper loudly")

    def run(self, ctx):
        pass


def test_third_party_settings_get_the_same_checks(base):
    b = base.with_stage(Shout)
    assert b.with_options(loud=True).settings["shout"] == {"loud": True}
    with pytest.raises(BuilderInputError, match=r"shout.loud must be True or False, got 'yes'"):
        b.with_options(loud="yes")
    with pytest.raises(BuilderInputError, match=r"shout.times must be in \[1, 5\]"):
        b.configure("shout", times=9)
    words = {"a": 1}
    frozen = b.configure("shout", words=words)
    words["a"] = 2
    assert frozen.settings["shout"]["words"]["a"] == 1
    with pytest.raises(TypeError):
        frozen.settings["shout"]["words"]["a"] = 3
    _, report = frozen.configure("shout", times=3).build_with_report()
    assert "loud=False times=3" in report.stage("shout").actions


def test_a_name_two_stages_declare_is_an_error_naming_both(base):
    b = base.with_stage(Shout).with_stage(Whisper)
    with pytest.raises(BuilderInputError, match=r"'loud' is declared by more than one stage: shout.loud .*whisper.loud"):
        b.with_options(loud=True)
    assert b.configure("whisper", loud=True).settings["whisper"] == {"loud": True}


def test_a_stage_settings_must_subclass_settings():
    with pytest.raises(TypeError, match="must be a subclass of hfbuilder.Settings"):
        class Bad(Stage):  # noqa: F841
            name = "bad"
            Settings = dict


def test_the_deepspeed_config_is_checked_and_deep_frozen(base):
    for stage in ("three", 3.7, True, 7, [3], -1):
        with pytest.raises(BuilderInputError, match="zero_optimization.stage must be an int"):
            base.with_deepspeed({"zero_optimization": {"stage": stage}})
    with pytest.raises(BuilderInputError, match="bf16.enabled"):
        base.with_deepspeed({"bf16": {"enabled": "yes"}})
    given_cfg = {"zero_optimization": {"stage": 2}, "train_batch_size": 8}
    b = base.with_deepspeed(given_cfg)
    given_cfg["zero_optimization"]["stage"] = 3  # the caller's dict is not the builder's
    assert b.ds_config["zero_optimization"]["stage"] == 2
    with pytest.raises(TypeError):
        b.ds_config["zero_optimization"]["stage"] = 3
    assert base.with_deepspeed(b.ds_config).ds_config == b.ds_config  # one builder's config given to another


def test_settings_reach_the_stages_that_read_them(base):
    model, report = base.with_options(resize_multiple=16, dropout=0.0).build_with_report()
    assert model.get_input_embeddings().weight.shape[0] == 48
    assert model.config.dropout == 0.0
    assert report.stage("resize").facts["vocab_size"] == 48
