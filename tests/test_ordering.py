"""Stage order comes from after/before/replaces, deterministically; bad constraints name culprits."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from hfbuilder import ModelBuilder, Stage, StageOrderError, hookimpl
from hfbuilder.ordering import Entry, resolve
from hfbuilder.testing import make_tokenizer


def stage(name, after=(), before=(), replaces=None):
    return type(f"S_{name}", (Stage,), {"name": name, "after": after, "before": before, "replaces": replaces,
                                         "run": lambda self, ctx: None})()


def plan(*specs, removed=()):
    entries = [Entry(s, f"plugin{i}", i, target=s.replaces) for i, s in enumerate(specs)]
    return [e.name for e in resolve(entries, removed)]


def test_constraints_not_registration_order_decide():
    assert plan(stage("c", after=("b",)), stage("b", after=("a",)), stage("a")) == ["a", "b", "c"]
    assert plan(stage("a"), stage("b"), stage("z", before=("a",))) == ["b", "z", "a"]


def test_ties_break_by_registration_sequence():
    assert plan(stage("a"), stage("m"), stage("b")) == ["a", "m", "b"]
    assert plan(stage("x"), stage("y", after=("x",)), stage("new", after=("x",))) == ["x", "y", "new"]


def test_replacement_takes_the_place_and_inherits_constraints():
    order = plan(stage("a"), stage("b", after=("a",)), stage("c", after=("b",)), stage("b2", replaces="b"))
    assert order == ["a", "b2", "c"]


def test_cycle_names_stages_and_plugins():
    with pytest.raises(StageOrderError, match="cycle") as info:
        plan(stage("a", after=("b",)), stage("b", after=("a",)))
    assert "'a' (from plugin0)" in str(info.value) and "'b' (from plugin1)" in str(info.value)


def test_unknown_after_names_stage_and_plugin():
    with pytest.raises(StageOrderError, match=r"'a' \(from plugin0\) has after='ghost'"):
        plan(stage("a", after=("ghost",)))
    with pytest.raises(StageOrderError, match="before='ghost'"):
        plan(stage("a", before=("ghost",)))


def test_duplicate_names_name_both_providers():
    with pytest.raises(StageOrderError, match="plugin0 and plugin1"):
        plan(stage("a"), stage("a"))


def test_two_replacements_of_one_stage_conflict():
    with pytest.raises(StageOrderError, match="both replace stage 'a'"):
        plan(stage("a"), stage("x", replaces="a"), stage("y", replaces="a"))


def test_replacing_an_unknown_stage_is_an_error():
    with pytest.raises(StageOrderError, match="replaces unknown stage 'ghost'"):
        plan(stage("a"), stage("x", replaces="ghost"))


def test_removing_unknown_stage_is_an_error_and_known_is_fine():
    assert plan(stage("a"), stage("b", after=("a",)), removed=("a",)) == ["b"]
    with pytest.raises(StageOrderError, match="cannot remove unknown stage 'zz'"):
        plan(stage("a"), removed=("zz",))


# -- the same through the builder and real plugins ------------------------------------


class Shout(Stage):
    name = "shout"
    after = ("token_align",)
    before = ("resize",)

    def run(self, ctx):
        ctx.model.config.shouted = True


class NoShrinkNoGrow(Stage):
    name = "keep_vocab"
    replaces = "resize"

    def run(self, ctx):
        ctx.note("vocabulary left alone")


class StagePlugin:
    @hookimpl
    def hfbuilder_stages(self):
        return [Shout, NoShrinkNoGrow()]


def test_plugin_adds_and_replaces_stages(model_dir):
    path = model_dir("llama")
    b = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer()).with_plugin(StagePlugin())
    assert b.plan() == ["config", "dropout", "zero", "load", "token_align", "shout", "keep_vocab"]
    model = b.build()
    assert model.config.shouted is True
    assert model.get_input_embeddings().weight.shape[0] == 45  # resize was replaced


def test_builder_add_replace_remove(model_dir):
    path = model_dir("llama")
    b = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer())
    assert b.with_stage(Shout).plan()[-2:] == ["shout", "resize"]
    assert b.replace_stage(NoShrinkNoGrow).plan()[-1] == "keep_vocab"
    assert "dropout" not in b.without_stage("dropout").plan()
    assert b.without_stage("resize").build().get_input_embeddings().weight.shape[0] == 45
    # a replacement registered by name (replaces=None) takes the stage of the same name
    class MyResize(Stage):
        name = "resize"
        after = ("token_align",)

        def run(self, ctx):
            ctx.note("mine")

    assert b.replace_stage(MyResize).plan() == b.plan()
    with pytest.raises(StageOrderError, match="two plugins provide stage 'resize'"):
        b.with_stage(MyResize).plan()


def test_builder_plugins_do_not_leak_between_builders(model_dir):
    path = model_dir("llama")
    base = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer())
    with_plugin = base.with_plugin(StagePlugin())
    assert "shout" in with_plugin.plan()
    assert "shout" not in base.plan()
