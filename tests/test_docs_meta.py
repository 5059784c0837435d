"""Everything public is documented: hooks, stages, builder methods, options, errors, CLI commands.

Like datasette's documentation tests: adding a hook, a stage or a builder method without a
line in docs/ fails here, naming what is missing and where it belongs.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import hfbuilder
from hfbuilder import ModelBuilder, errors, hookspecs
from hfbuilder.manager import Plugins

DOCS = Path(__file__).resolve().parent.parent / "docs"
MKDOCS = DOCS.parent / "mkdocs.yml"


def _text(*names: str) -> str:
    return "\n".join((DOCS / name).read_text(encoding="utf-8") for name in names)


def _all_docs() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("**/*.md")))


def _mentioned(name: str, text: str) -> bool:
    """``name`` appears as code: `name`, `name(...)`, `.name(...)` or `package.name`."""
    return re.search(rf"`(?:[\w.]*\.)?{re.escape(name)}(\(|`)", text) is not None


CORE_HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("hfbuilder_"))
# Hooks the built-in plugins own (``hfbuilder_addhooks``) are part of the reference too.
HOOKS = sorted(
    name for name, caller in vars(Plugins(autoload=False).hook).items()
    if name.startswith("hfbuilder_") and caller.spec is not None
)
BUILDER_METHODS = sorted(name for name, _ in inspect.getmembers(ModelBuilder, inspect.isfunction) if not name.startswith("_"))
STAGES = sorted({entry.name for entry in Plugins(autoload=False).stage_entries()})
ERRORS = sorted(errors.__all__)


def test_the_lists_are_not_empty():
    assert {"hfbuilder_stages", "hfbuilder_run_stage"} <= set(CORE_HOOKS) < set(HOOKS)
    assert {"with_dropout", "explain", "build_with_report", "plan"} <= set(BUILDER_METHODS)
    assert {"config", "load", "resize"} <= set(STAGES)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_hook_reference(hook):
    assert _mentioned(hook, _text("hooks.md")), f"hook {hook} is not documented in docs/hooks.md"


@pytest.mark.parametrize("method", BUILDER_METHODS)
def test_every_builder_method_is_in_the_builder_page(method):
    assert _mentioned(method, _text("builder.md")), f"ModelBuilder.{method} is not documented in docs/builder.md"


@pytest.mark.parametrize("stage", STAGES)
def test_every_built_in_stage_is_documented(stage):
    assert _mentioned(stage, _all_docs()), f"built-in stage {stage!r} is not documented in docs/"


@pytest.mark.parametrize("error", ERRORS)
def test_every_error_is_documented(error):
    assert _mentioned(error, _all_docs()), f"hfbuilder.errors.{error} is not documented in docs/"


def test_every_public_name_is_in_the_api_reference():
    """Named in docs/api.md, or its whole module rendered there with ``::: module``."""
    api = _text("api.md")
    whole_modules = set(re.findall(r"^::: ([\w.]+)\n(?!\s+options:\n(?:\s+\w+:.*\n)*\s+members:)", api, re.M))
    missing = [
        name for name in hfbuilder.__all__
        if name not in api and getattr(getattr(hfbuilder, name), "__module__", None) not in whole_modules
    ]
    assert not missing, f"not in docs/api.md: {missing}"


def test_every_cli_command_and_option_is_documented():
    from hfbuilder.cli import build_parser

    cli = _text("cli.md")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")  # argparse has no public accessor
    for command, sub in subparsers.choices.items():
        assert f"hfbuilder {command}" in cli, f"command {command!r} is not documented in docs/cli.md"
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and long[0] != "--help":
                assert long[0] in cli, f"option {long[0]} of {command!r} is not documented in docs/cli.md"


def test_every_page_is_in_the_site_navigation():
    nav = MKDOCS.read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.glob("**/*.md"))
    missing = [p for p in pages if f": {p}" not in nav]
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"


def test_the_settings_reference_is_generated_from_the_settings_classes():
    """docs/settings.md's table is what ``hfbuilder settings --markdown`` prints for the built-ins."""
    from hfbuilder.manager import settings_catalog
    from hfbuilder.settings import reference_markdown

    text = _text("settings.md")
    table = text.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    expected = reference_markdown(settings_catalog(Plugins(autoload=False).stage_entries()))
    assert table == expected, "docs/settings.md is stale: regenerate it with `hfbuilder settings --markdown`"


def test_every_setting_has_a_doc():
    import dataclasses

    from hfbuilder.manager import settings_catalog

    catalog = settings_catalog(Plugins(autoload=False).stage_entries())
    undocumented = [
        f"{stage}.{f.name}" for stage, cls in catalog.classes.items() for f in dataclasses.fields(cls)
        if not f.metadata.get("doc")
    ]
    assert not undocumented, f"settings without a doc (use hfbuilder.setting(default, doc=...)): {undocumented}"
