"""A real third-party plugin: examples/hfbuilder-example-head, pip-installed, found by its entry point."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfbuilder import ModelBuilder, UnknownHeadError
from hfbuilder.manager import DISABLE_AUTOLOAD_ENV

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hfbuilder-example-head"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example (no deps, no build isolation: nothing is downloaded) into a temp site dir."""
    work = tmp_path_factory.mktemp("example-head")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        check=True,
    )
    return target


def test_entry_point_plugin_provides_a_head(installed, monkeypatch, model_dir, tokenizer_for):
    from transformers import AutoModel

    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(installed))
    importlib.invalidate_caches()
    path = model_dir("llama")
    tok = tokenizer_for(path)
    builder = ModelBuilder(AutoModel, path, tok)
    plugins = builder._plugins()
    assert plugins.info["entrypoint:example_head"].source == "entry point"
    assert plugins.info["entrypoint:example_head"].distribution.startswith("hfbuilder-example-head")
    model = builder.with_head("multi_objective_reward", objectives=("helpful", "harmless")).build()
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    out = model(ids, attention_mask=(ids != 0).long())
    assert out["scores"].shape == (2, 2) and out["values"].shape == (2, 5, 2)
    torch.testing.assert_close(out["scores"][1], out["values"][1, 2])  # the last non-pad token


def test_autoload_off_means_the_head_is_unknown(installed, monkeypatch, model_dir, tokenizer_for):
    from transformers import AutoModel

    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.syspath_prepend(str(installed))
    path = model_dir("llama")
    with pytest.raises(UnknownHeadError, match="multi_objective_reward"):
        ModelBuilder(AutoModel, path, tokenizer_for(path)).with_head("multi_objective_reward").build()


def test_importing_hfbuilder_and_its_plugins_stays_light():
    code = (
        "import sys, hfbuilder, hfbuilder.plugins, hfbuilder.weights, hfbuilder.zero3, hfbuilder.compat\n"
        "from hfbuilder.manager import Plugins\n"
        "Plugins(autoload=False).phases()\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'peft', 'safetensors.torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])})
