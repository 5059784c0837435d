"""The ``hfbuilder`` command, run as a subprocess the way scripts run it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from hfbuilder.cli import main

from .dists import make_dist

ENV = {**os.environ, "HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def hfbuilder(*args: str, env: dict | None = None, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "hfbuilder", *args], capture_output=True, text=True, env=env or ENV, timeout=300
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from hfbuilder.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True).stdout
    assert "plan" in out and "inspect" in out and out.strip().endswith("[]")


def test_plan_prints_the_plan_and_json(model_dir, capsys):
    path = model_dir("gpt2")
    data = json.loads(hfbuilder("plan", path, "--json", "--deferred", "-o", "resize_multiple=16").stdout)
    assert data["plan"] == ["config", "dropout", "zero", "load", "token_align", "resize", "materialize"]
    facts = {stage["name"]: stage["facts"] for stage in data["stages"]}
    assert facts["resize"]["vocab_size"] == 48 and facts["load"]["device"] == "meta"

    assert main(["plan", path, "--dropout", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "set resid_pdrop: 0.1 -> 0.2" in text and "resize_token_embeddings 45 -> 48" in text
    assert "memory:" in text


def test_exit_codes_for_bad_input(model_dir):
    missing = hfbuilder("plan", "/no/such/model", check_rc=2)
    assert "PATH '/no/such/model' does not exist" in missing.stderr and missing.stdout == ""
    assert "required" in hfbuilder("plan", check_rc=2).stderr  # argparse's usage error
    assert "must be a number in [0, 1]" in hfbuilder("build", model_dir("opt"), "--dropout", "1.5", check_rc=2).stderr
    assert "cannot be imported" in hfbuilder("plugins", "--plugin", "no_such_module", check_rc=3).stderr


@pytest.mark.parametrize(
    ("args", "rc", "message"),
    [
        (["--head", "nope"], 2, "unknown head 'nope'"),
        (["--model-class", "NoSuchModel"], 2, "is not a transformers class"),
        (["--head-option", "x=1"], 2, "--head-option needs --head"),
        (["-o", "invariants=maybe"], 2, "invariants must be one of"),
        (["--zero3", "/no/such/ds.json"], 2, "does not exist"),
    ],
)
def test_plan_errors_name_what_is_wrong(model_dir, capsys, args, rc, message):
    assert main(["plan", model_dir("opt"), *args]) == rc
    assert message in capsys.readouterr().err


def test_plan_that_would_fail_prints_the_plan_and_exits_nonzero(model_dir, tmp_path, capsys, monkeypatch):
    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}))
    assert main(["plan", model_dir("opt"), "--zero3", str(ds), "--world-size", "8"]) == 2
    out, err = capsys.readouterr()
    assert "ZeRO-3 over 8 rank(s)" in out and "float16" in out
    assert "the build would fail: zero: stage 'zero' (from hfbuilder.plugins.zero) in check: ZeRO-3 needs" in err


def test_build_saves_safetensors_and_a_report(model_dir, tmp_path):
    path, out, report = model_dir("llama"), tmp_path / "out", tmp_path / "report.json"
    proc = hfbuilder("build", path, "--dropout", "0", "--save", str(out), "--report", str(report))
    assert "invariant finite: ok" in proc.stdout and f"saved to {out}" in proc.stdout
    assert sorted(os.listdir(out)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    data = json.loads(report.read_text())
    assert data["plan"][-1] == "resize" and all(r["passed"] for r in data["invariants"])
    assert data["provenance"]["lm_head.weight"] == "pretrained+resized[45:48]"

    inspected = json.loads(hfbuilder("inspect", str(out), "--json").stdout)
    assert inspected["layout"] == "Hugging Face transformers" and inspected["format"] == "safetensors"
    shapes = {k["name"]: k["shape"] for k in inspected["keys"]}
    assert shapes["model.embed_tokens.weight"] == [48, 16] and inspected["architectures"] == ["LlamaForCausalLM"]


def test_build_failing_an_invariant_exits_1(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "poison_plugin.py").write_text(textwrap.dedent("""
        import torch
        import hfbuilder

        class Poison(hfbuilder.Stage):
            name = "poison"
            after = ("resize",)

            def run(self, ctx):
                with torch.no_grad():
                    next(ctx.model.parameters()).fill_(float("inf"))

        @hfbuilder.hookimpl
        def hfbuilder_stages():
            return [Poison()]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    report = tmp_path / "report.json"
    args = ["-q", "build", model_dir("opt"), "--plugin", "poison_plugin", "--report", str(report)]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "finite" in err and "holds NaN or inf" in err and out == ""
    assert json.loads(report.read_text())["invariants"][0]["passed"] is False
    assert main([*args[1:], "-o", "invariants=warn"]) == 0  # not quiet: the InvariantWarning is logged
    out, err = capsys.readouterr()
    assert "invariant finite: FAILED" in out and "InvariantWarning: invariant finite failed" in err


def _layout(tmp_path, name: str, tensors: dict, config: dict | None = None) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return json.loads(hfbuilder("inspect", str(folder), "--json").stdout)


def test_inspect_recognizes_rlhf_layouts(tmp_path):
    base = {"model.layers.0.mlp.up_proj.weight": (4, 2), "model.norm.weight": (2,)}
    dschat = _layout(tmp_path, "dschat", {f"rwtransformer.{k.removeprefix('model.')}": s for k, s in base.items()})
    assert dschat["layout"] == "DeepSpeed-Chat reward/critic model" and "WITHOUT v_head" in dschat["evidence"]
    dschat_ok = _layout(tmp_path, "dschat_ok", {"rwtransformer.norm.weight": (2,), "v_head.weight": (1, 2)})
    assert "with v_head.weight" in dschat_ok["evidence"]
    trl = _layout(tmp_path, "trl", {**base, "lm_head.weight": (8, 2), "v_head.summary.weight": (1, 2),
                                    "v_head.summary.bias": (1,)})
    assert trl["layout"].startswith("TRL")
    openrlhf = _layout(tmp_path, "openrlhf", {**base, "value_head.weight": (1, 2)})
    assert openrlhf["layout"] == "OpenRLHF critic model"
    score = _layout(tmp_path, "score", {**base, "score.weight": (1, 2)}, {"value_head_prefix": "score"})
    assert score["layout"] == "OpenRLHF reward/critic model"
    text = hfbuilder("inspect", str(tmp_path / "trl" / "model.safetensors")).stdout
    assert "v_head.summary.weight" in text and "[1, 2]" in text and "float32" in text
    # What with_checkpoint(layout="auto") would decide, from the registered layout plugins:
    assert dschat["reward_layout"]["name"] == "dschat" and "no v_head.weight" in dschat["reward_layout"]["evidence"]
    assert dschat_ok["reward_layout"]["name"] == "dschat"
    plain = _layout(tmp_path, "plain", base)
    assert plain["reward_layout"]["name"] is None and "no reward/critic value head" in plain["reward_layout"]["evidence"]
    assert trl["reward_layout"]["name"] == "trl" and openrlhf["reward_layout"]["name"] == "openrlhf"
    assert "as a critic: layout 'trl'" in text


def test_inspect_rejects_bad_input(tmp_path):
    assert "is neither a file nor a directory" in hfbuilder("inspect", str(tmp_path / "nope"), check_rc=2).stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert "cannot read safetensors file" in hfbuilder("inspect", str(bad), check_rc=2).stderr
    pickled = tmp_path / "evil.bin"
    torch.save({"x": torch.zeros(1), "payload": os.system}, pickled)  # a function: weights_only refuses it
    assert "refused" in hfbuilder("inspect", str(pickled), check_rc=2).stderr


def test_plugins_lists_each_source(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "hfb-demo-plugin", "hfb_demo_plugin", """
        import hfbuilder

        class Demo(hfbuilder.Head):
            name = "demo_head"

        @hfbuilder.hookimpl
        def hfbuilder_heads():
            return [Demo()]
    """, entry_name="demo")
    (site / "local_plugin.py").write_text("import hfbuilder\n\n@hfbuilder.hookimpl\ndef hfbuilder_dropout_keys():\n"
                                          "    return ['my_drop']\n")
    env = {**ENV, "PYTHONPATH": str(site)}
    env.pop("HFBUILDER_DISABLE_PLUGIN_AUTOLOAD")
    data = json.loads(hfbuilder("plugins", "--json", "--plugin", "local_plugin", env=env).stdout)
    plugins = data["plugins"]
    assert plugins["hfbuilder.plugins.resize"]["source"] == "built-in"
    assert plugins["hfbuilder.plugins.resize"]["stages"][0] == {
        "name": "resize", "after": ["token_align"], "before": [], "replaces": None
    }
    assert plugins["entrypoint:demo"] | {"hooks": None} == {
        "source": "entry point", "distribution": "hfb-demo-plugin 0.1", "hooks": None,
        "stages": [], "heads": ["demo_head"], "phases": [], "dropout_keys": [],
    }
    assert plugins["local_plugin"]["source"] == "with_plugin" and plugins["local_plugin"]["dropout_keys"] == ["my_drop"]
    text = hfbuilder("plugins", env=env).stdout
    assert "entrypoint:demo  [entry point, hfb-demo-plugin 0.1]" in text and "head   demo_head" in text

    disabled = hfbuilder("plugins", env={**env, "HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout
    assert "entry-point plugins not loaded" in disabled and "demo_head" not in disabled


@pytest.mark.zero3
def test_build_under_zero3_saves_gathered_weights(model_dir, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                              "train_micro_batch_size_per_gpu": 1}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    # DeepSpeed compiles its CPU shm op on first use (~30 s); cache it per environment, so
    # other virtualenvs sharing ~/.cache/torch_extensions do not invalidate it.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    out = tmp_path / "out"
    report = json.loads(hfbuilder("-q", "build", model_dir("opt"), "--zero3", str(ds), "--save", str(out), "--json",
                                  env=env).stdout)
    assert report["stages"][2]["facts"]["zero3"] is True and all(r["passed"] for r in report["invariants"])
    inspected = json.loads(hfbuilder("inspect", str(out), "--json").stdout)
    assert inspected["dtypes"] == {"bfloat16": inspected["tensors"]}
    assert {k["name"]: k["shape"] for k in inspected["keys"]}["model.decoder.embed_tokens.weight"] == [48, 16]
