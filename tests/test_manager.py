"""Plugins: entry-point loading, broken plugins, invalid hook results, the wrapper hook."""

from __future__ import annotations

import sys

import pluggy
import pytest
from transformers import AutoModelForCausalLM

from hfbuilder import BuilderInputError, Head, ModelBuilder, PluginError, Stage, StageError, hookimpl
from hfbuilder.manager import DISABLE_AUTOLOAD_ENV, Plugins
from hfbuilder.testing import make_tokenizer

from .dists import make_dist


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("hfb_test_")]:
        del sys.modules[name]


GOOD = """
    from hfbuilder import Stage, hookimpl

    class Stamp(Stage):
        name = "stamp"
        after = ("resize",)

        def run(self, ctx):
            ctx.model.config.stamped_by = "hfb_test_good"

    @hookimpl
    def hfbuilder_stages():
        return [Stamp]
"""


def test_entry_point_plugin_loads_and_runs(site, model_dir):
    make_dist(site, "hfb-test-good", "hfb_test_good", GOOD)
    path = model_dir("gpt_neox")
    builder = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer())
    assert builder.plan()[-1] == "stamp"
    assert builder.build().config.stamped_by == "hfb_test_good"
    info = builder._plugins().info["entrypoint:hfb-test-good"]
    assert info.source == "entry point" and info.distribution == "hfb-test-good 0.1"


def test_entry_point_object_value(site):
    make_dist(site, "hfb-test-obj", "hfb_test_obj", """
        from hfbuilder import hookimpl

        class P:
            @hookimpl
            def hfbuilder_dropout_keys(self):
                return ["my_family_dropout"]

        plugin = P()
    """, entry_value="hfb_test_obj:plugin")
    assert "my_family_dropout" in Plugins().dropout_keys()


def test_autoload_can_be_disabled(site, monkeypatch):
    make_dist(site, "hfb-test-good", "hfb_test_good", GOOD)
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert all(e.name != "stamp" for e in Plugins().stage_entries())


def test_broken_entry_point_names_it(site):
    make_dist(site, "hfb-test-broken", "hfb_test_broken", "import no_such_module_anywhere\n")
    with pytest.raises(PluginError, match="entry point 'hfb-test-broken'.*ModuleNotFoundError"):
        Plugins()


def test_invalid_hook_results_name_the_plugin():
    class Bad:
        @hookimpl
        def hfbuilder_stages(self):
            return ["not a stage"]

    with pytest.raises(PluginError, match="Bad.*returned 'not a stage'"):
        Plugins([Bad()]).stage_entries()

    class Raises:
        @hookimpl
        def hfbuilder_heads(self):
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="Raises.*raised in hfbuilder_heads"):
        Plugins([Raises()]).heads()


def test_duplicate_heads_name_both_plugins():
    class H(Head):
        name = "dup"

    class A:
        @hookimpl
        def hfbuilder_heads(self):
            return [H()]

    class B:
        @hookimpl
        def hfbuilder_heads(self):
            return [H()]

    with pytest.raises(PluginError, match="head 'dup'.*A.*B"):
        Plugins([A(), B()]).heads()


def test_wrapper_hook_sees_every_stage_and_a_plugin_can_take_over(model_dir):
    seen = []

    class Tracer:
        @hookimpl(wrapper=True)
        def hfbuilder_run_stage(self, stage, ctx):
            seen.append(("start", stage.name))
            result = yield
            seen.append(("end", stage.name))
            return result

    class SkipDropout:
        @hookimpl
        def hfbuilder_run_stage(self, stage, ctx):
            if stage.name == "dropout":
                return "skipped"
            return None

    path = model_dir("gpt2")
    model = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer()).with_dropout(0.5).with_plugin(
        Tracer()).with_plugin(SkipDropout()).build()
    assert seen[:2] == [("start", "config"), ("end", "config")]
    assert [n for kind, n in seen if kind == "end"][-1] == "resize"
    assert model.config.resid_pdrop == 0.1  # the dropout stage was taken over and did nothing


def test_stage_errors_name_the_stage_and_provider(model_dir):
    class Boom(Stage):
        name = "boom"
        after = ("load",)

        def run(self, ctx):
            raise RuntimeError("kaput")

    path = model_dir("gpt2")
    with pytest.raises(StageError, match=r"stage 'boom' \(from ModelBuilder.with_stage\).*kaput"):
        ModelBuilder(AutoModelForCausalLM, path, make_tokenizer()).with_stage(Boom).build()


def test_import_hfbuilder_is_light():
    import subprocess

    code = "import sys, hfbuilder, hfbuilder.plugins; print(sorted(m for m in ('torch','transformers','deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("source", ["import sys\nsys.exit(0)\n", "raise SystemExit('bye')\n", "raise ValueError('bad')\n"])
def test_entry_point_that_exits_or_raises_on_import_is_a_plugin_error(site, source):
    make_dist(site, "hfb-test-exits", "hfb_test_exits", source)
    with pytest.raises(PluginError, match="entry point 'hfb-test-exits'.*(SystemExit|ValueError)"):
        Plugins()


def test_misspelled_hook_names_plugin_and_hook():
    class Typo:
        @hookimpl
        def hfbuilder_stage(self):
            return []

    with pytest.raises(PluginError, match=r"Typo.*unknown hook 'hfbuilder_stage' \(did you mean 'hfbuilder_stages'\?\)"):
        Plugins([Typo()])


def test_hook_whose_spec_a_later_plugin_adds_is_not_pending():
    class Implements:
        @hookimpl
        def my_extension_point(self):
            return 1

    class Specs:
        @pluggy.HookspecMarker("hfbuilder")
        def my_extension_point(self):
            """Owned by the plugin below."""

    class Owner:
        @hookimpl
        def hfbuilder_addhooks(self, pluginmanager):
            pluginmanager.add_hookspecs(Specs)

    plugins = Plugins([Implements(), Owner()])  # the implementation is registered before its spec
    assert plugins.pm.hook.my_extension_point() == [1]


def test_with_plugin_refuses_a_module_name():
    builder = ModelBuilder(AutoModelForCausalLM, "unused", make_tokenizer())
    for name in ("hfbuilder.plugins.resize", b"x"):
        with pytest.raises(BuilderInputError, match="not its name"):
            builder.with_plugin(name)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_observer_error_names_the_observer_not_the_stage(model_dir, when):
    class Fragile:
        @hookimpl(wrapper=True)
        def hfbuilder_run_stage(self, stage, ctx):
            if stage.name == "dropout" and when == "before":
                raise RuntimeError("observer broke")
            result = yield
            if stage.name == "dropout":
                raise RuntimeError("observer broke")
            return result

    builder = ModelBuilder(AutoModelForCausalLM, model_dir("gpt2"), make_tokenizer()).with_plugin(Fragile())
    with pytest.raises(PluginError, match=r"plugin .*Fragile.*wrapper around stage 'dropout'.*observer broke") as info:
        builder.build()
    assert not isinstance(info.value, StageError)


def test_stage_errors_are_blamed_on_the_stage_through_wrappers(model_dir):
    class Observer:
        @hookimpl(wrapper=True)
        def hfbuilder_run_stage(self, stage, ctx):
            return (yield)

    class Refuses(Stage):
        name = "refuses"
        after = ("load",)

        def run(self, ctx):
            raise BuilderInputError("option x is wrong")

    class Crashes(Refuses):
        name = "crashes"

        def run(self, ctx):
            raise KeyError("k")

    base = ModelBuilder(AutoModelForCausalLM, model_dir("gpt2"), make_tokenizer()).with_plugin(Observer())
    with pytest.raises(BuilderInputError, match=r"^stage 'refuses' \(from ModelBuilder.with_stage\) in run: option x"):
        base.with_stage(Refuses).build()
    with pytest.raises(StageError, match=r"stage 'crashes' \(from ModelBuilder.with_stage\) failed in run: KeyError"):
        base.with_stage(Crashes).build()


def test_a_take_over_that_raises_names_its_plugin(model_dir):
    class TakesOver:
        @hookimpl
        def hfbuilder_run_stage(self, stage, ctx):
            if stage.name == "dropout":
                raise RuntimeError("took over badly")
            return None

    builder = ModelBuilder(AutoModelForCausalLM, model_dir("gpt2"), make_tokenizer()).with_plugin(TakesOver())
    with pytest.raises(PluginError, match=r"TakesOver.*take-over of stage 'dropout'.*took over badly"):
        builder.build()
