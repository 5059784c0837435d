"""Saving: OUT checked before the build, written atomically, replaced whole, never a hybrid.

Real models on disk, a real failing write, and real processes killed with SIGKILL mid-save.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfbuilder import BuilderInputError, save_model
from hfbuilder.save import check_out

ENV = {**os.environ, "HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def snapshot(path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def siblings(path) -> list[str]:
    """Leftovers of a save beside ``path``: temporary and set-aside directories."""
    base = os.path.basename(path)
    return sorted(n for n in os.listdir(os.path.dirname(path)) if n.startswith(f".{base}."))


@pytest.fixture
def old_model(tmp_path, model_dir):
    """A directory holding another model, sharded, with a stale pytorch_model.bin beside it."""
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(model_dir("gpt2"))
    model.save_pretrained(out, max_shard_size="20KB")
    torch.save({"stale": torch.zeros(2)}, out / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(model_dir("gpt2")).save_pretrained(out)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    return out


def test_check_out_refuses_what_cannot_be_saved_to(tmp_path, old_model):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuilderInputError, match="exists and is not a directory"):
        check_out(tmp_path / "file")
    with pytest.raises(BuilderInputError, match="is not a directory"):
        check_out(tmp_path / "file" / "out")
    with pytest.raises(BuilderInputError, match="cannot be written"):
        check_out("/proc/hfbuilder-out")  # unwritable even for root, unlike a chmod'ed directory
    with pytest.raises(BuilderInputError, match="already holds a model; pass --overwrite"):
        check_out(old_model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(BuilderInputError, match="not a saved model.*even with --overwrite"):
        check_out(tmp_path / "notes", overwrite=True)
    assert check_out(old_model, overwrite=True) == str(old_model)
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty") == str(tmp_path / "empty")
    assert check_out(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
    assert siblings(old_model) == [] and not any(n.startswith(".hfbuilder-probe") for n in os.listdir(tmp_path))


def test_overwrite_replaces_the_old_model_whole(tmp_path, old_model, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir("llama"))
    with pytest.raises(BuilderInputError, match="--overwrite"):
        save_model(model, tokenizer, old_model)
    saved = save_model(model, tokenizer, old_model, overwrite=True)
    fresh = tmp_path / "fresh"
    save_model(model, tokenizer, fresh)
    assert saved.replaced and saved.files == sorted(os.listdir(fresh)) == sorted(os.listdir(old_model))
    assert "pytorch_model.bin" not in saved.files and "model.safetensors.index.json" not in saved.files
    loaded = AutoModelForCausalLM.from_pretrained(old_model)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert siblings(old_model) == []


def test_a_write_failing_halfway_leaves_the_old_model_intact(old_model, model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir("llama"))
    before = snapshot(old_model)

    def disk_full(*args, **kwargs):  # after config and weights were written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, tokenizer, old_model, overwrite=True)
    assert snapshot(old_model) == before and siblings(old_model) == []


CHILD = textwrap.dedent("""
    import os, signal, sys
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hfbuilder.save import save_model

    source, out, where = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def stop_here(*args, **kwargs):
        print("stopped", flush=True)
        signal.pause()  # until the parent's SIGKILL

    if where == "weights":  # config.json is written, the weights are not
        modeling_utils.safe_save_file = stop_here
    elif where == "tokenizer":  # config and weights are written, the tokenizer is not
        tokenizer.save_pretrained = stop_here
    elif where == "swap":  # the old model is renamed aside, the new one not yet in place
        os.replace = stop_here
    save_model(model, tokenizer, out, overwrite=True)
""")


def kill_mid_save(tmp_path, source: str, out, where: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), source, str(out), where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()  # '' if the child died before it got there
        assert line.strip() == "stopped", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_killed_save_leaves_the_old_model(tmp_path, old_model, model_dir):
    before = snapshot(old_model)
    kill_mid_save(tmp_path, model_dir("llama"), old_model, "weights")  # new config.json beside old weights
    assert snapshot(old_model) == before


def test_a_save_killed_at_the_swap_leaves_no_directory_and_the_old_model_aside(tmp_path, old_model, model_dir):
    before = snapshot(old_model)
    kill_mid_save(tmp_path, model_dir("llama"), old_model, "swap")
    assert not old_model.exists()
    aside = [n for n in siblings(old_model) if ".old-" in n]
    assert len(aside) == 1 and snapshot(old_model.parent / aside[0]) == before


def test_a_killed_first_save_leaves_no_directory(tmp_path, model_dir):
    out = tmp_path / "new"
    kill_mid_save(tmp_path, model_dir("llama"), out, "tokenizer")  # weights without a tokenizer
    assert not out.exists()


def test_the_cli_checks_out_before_the_build(tmp_path, old_model, model_dir):
    marker = tmp_path / "plugin_imported"
    (tmp_path / "marker_plugin.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    (tmp_path / "afile").write_text("x")
    for out, message in [(old_model, "already holds a model; pass --overwrite"),
                         (tmp_path / "afile", "exists and is not a directory"),
                         ("/proc/hfbuilder-out", "cannot be written")]:
        proc = subprocess.run([sys.executable, "-m", "hfbuilder", "build", model_dir("llama"), "--plugin",
                               "marker_plugin", "--save", str(out)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not marker.exists()  # refused before the plugins were even imported, so before any stage

    proc = subprocess.run([sys.executable, "-m", "hfbuilder", "-v", "build", model_dir("llama"), "--save",
                           str(old_model), "--overwrite"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "replacing the model there" in proc.stderr
    assert sorted(os.listdir(old_model)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    shutil.rmtree(old_model)
