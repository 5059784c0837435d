"""A model directory's own Python code (``auto_map``) never runs unless the user asks, and nothing prompts.

The directory is a real tiny GPT-2 whose config, model and tokenizer point at code that
leaves a marker file when imported; a ``y`` waits on standard input, where transformers
would read its "Do you wish to run the custom code?" answer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from hfbuilder import BuilderInputError, ModelBuilder
from hfbuilder.compat import create_hf_model
from hfbuilder.testing import make_tokenizer

ENV = {**os.environ, "HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def custom_code_dir(tmp_path, model_dir):
    """(directory, marker): a model whose config, model and tokenizer classes are the directory's code."""
    path = tmp_path / "custom"
    shutil.copytree(model_dir("gpt2"), path)
    marker = tmp_path / "custom_code_ran"
    leave_marker = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (path / "configuration_evil.py").write_text(leave_marker + textwrap.dedent("""
        from transformers import GPT2Config

        class EvilConfig(GPT2Config):
            model_type = "evil_marker"
    """))
    (path / "modeling_evil.py").write_text(leave_marker + textwrap.dedent("""
        from transformers import GPT2LMHeadModel

        from .configuration_evil import EvilConfig

        class EvilModel(GPT2LMHeadModel):
            config_class = EvilConfig
    """))
    (path / "tokenization_evil.py").write_text(leave_marker + textwrap.dedent("""
        from transformers import PreTrainedTokenizerFast

        class EvilTokenizer(PreTrainedTokenizerFast):
            pass
    """))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "evil_marker"
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "EvilTokenizer"
    tok_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return str(path), marker


def test_the_api_never_runs_custom_code_even_with_yes_on_stdin(custom_code_dir, monkeypatch):
    path, marker = custom_code_dir
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))
    builder = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer())
    with pytest.raises(BuilderInputError, match="trust_remote_code=True"):
        builder.build()
    explanation = builder.explain()
    assert not explanation.ok and "trust_remote_code" in explanation.stage("config").error
    with pytest.raises(BuilderInputError, match="trust_remote_code"):
        create_hf_model(AutoModelForCausalLM, path, make_tokenizer())
    assert not marker.exists()
    assert sys.stdin.read(2) == "y\n"  # nothing asked: the answer is still waiting


def test_trust_remote_code_must_be_a_boolean(custom_code_dir):
    path, marker = custom_code_dir
    builder = ModelBuilder(AutoModelForCausalLM, path, make_tokenizer())
    with pytest.raises(BuilderInputError, match="trust_remote_code must be True or False, got 'false'"):
        builder.with_options(trust_remote_code="false").build()
    with pytest.raises(BuilderInputError, match="not in config_kwargs"):
        builder.with_options(config_kwargs={"trust_remote_code": True}).build()
    assert not marker.exists()


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfbuilder", *args], capture_output=True, text=True,
                          input="y\n" * 1000, env=env or ENV, timeout=300)


def test_the_cli_never_runs_custom_code_with_yes_piped_in(custom_code_dir, model_dir):
    path, marker = custom_code_dir
    tokenizer = _cli("plan", path)  # the tokenizer is loaded first: its code is refused
    assert tokenizer.returncode == 2, tokenizer.stderr
    assert "trust_remote_code" in tokenizer.stderr and "Do you wish" not in tokenizer.stdout + tokenizer.stderr
    config = _cli("plan", path, "--tokenizer", model_dir("gpt2"))  # the model's config code is refused
    assert config.returncode == 2, config.stderr
    assert "trust_remote_code" in config.stderr and "Do you wish" not in config.stdout + config.stderr
    assert not marker.exists()


def test_the_cli_runs_custom_code_when_asked(custom_code_dir, tmp_path):
    path, marker = custom_code_dir
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers copies the code it runs
    proc = _cli("plan", path, "--trust-remote-code", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    assert json.loads(proc.stdout)["stages"][0]["facts"]["model_type"] == "evil_marker"
