"""The benchmark runner on a tiny shape: its checkpoints, its contenders, its JSON and markdown.

No timing is asserted: the numbers come from ``make bench`` and the GPU run. The GPU
cases' contenders run here in-process with ``device="cpu"``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hfbuilder_bench_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def workdir(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    bench.make_checkpoints("tiny", root, fill_device="cpu")
    return root


def test_checkpoints(bench, workdir):
    ck = bench.Checkpoints(workdir / "tiny")
    config = json.loads((ck.sft / "config.json").read_text())
    assert config["dtype"] == "float16" and config["vocab_size"] == 56
    assert (ck.sft / "model.safetensors").is_file() and (ck.sft / "tokenizer.json").is_file()
    state = torch.load(ck.critic_bin / "pytorch_model.bin", weights_only=True)
    assert "v_head.weight" in state and all(k == "v_head.weight" or k.startswith("rwtransformer.") for k in state)
    assert {t.dtype for t in state.values()} == {torch.float16}
    from safetensors.torch import load_file

    assert load_file(ck.critic_st / "model.safetensors").keys() == state.keys()
    stamp = (ck.sft / "model.safetensors").stat().st_mtime_ns
    bench.make_checkpoints("tiny", workdir, fill_device="cpu")  # same spec: kept, not remade
    assert (ck.sft / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("case", ["sft", "device", "critic"])
def test_contenders_run_and_load_the_checkpoint(bench, workdir, case):
    spec = bench.CASES[case]
    if spec.needs_head and not bench.head_available(spec.needs_head):
        pytest.skip(f"no {spec.needs_head!r} head registered")
    for contender in spec.contenders:
        result = bench.worker(case, contender.name, workdir, "cpu", shape="tiny")
        assert result["seconds"] > 0 and result["peak_rss_mib"] > 0
        assert "match the checkpoint on cpu" in result["check"]
        if contender.name.startswith("hfbuilder"):
            assert result["stages"]  # the build report's per-stage seconds


def test_summary_ratios_and_markdown(bench):
    case = bench.CASES["device"]
    samples = {
        "dschat": [{"seconds": s, "peak_rss_mib": 100.0, "base_rss_mib": 50.0, "peak_gpu_mib": 10.0} for s in (3, 4, 9)],
        "hfbuilder": [{"seconds": s, "peak_rss_mib": 90.0, "base_rss_mib": 50.0, "peak_gpu_mib": 10.0} for s in (1, 1, 5)],
        "safetensors": [{"seconds": 0.5, "peak_rss_mib": 80.0, "base_rss_mib": 50.0}],
    }
    args = type("Args", (), {"tiny": False, "device": "cuda"})()
    entry = bench.summarize(case, bench.Outcome(samples), args)
    assert entry["contenders"]["dschat"]["median_s"] == 4
    ratios = {r["ratio"]: r for r in entry["ratios"]}
    assert ratios["dschat / hfbuilder"]["value"] == 4 and ratios["dschat / hfbuilder"]["met"] is True
    assert ratios["hfbuilder / safetensors"]["value"] == 2 and ratios["hfbuilder / safetensors"]["met"] is False
    text = bench.markdown({"meta": {"date": "d", "device": "H100", "reps_note": "r"}, "cases": {"device": entry}})
    assert "| device | opt-1.3b | cuda | dschat | 4.000 |" in text
    assert "| device | dschat / hfbuilder | 4.000 | 3.000 | >= 3 | yes |" in text  # per-round: 3, 4, 1.8


def test_runner_end_to_end_tiny(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--tiny", "--cases", "sft,import", "--reps", "1",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results-sft-import-tiny.json").read_text())
    assert set(results["cases"]) == {"sft", "import"}
    sft = results["cases"]["sft"]
    assert {c: v["n"] for c, v in sft["contenders"].items()} == {"dschat": 1, "hfbuilder": 1, "hfbuilder-unchecked": 1}
    assert isinstance(sft["ratios"][0]["value"], float)
    imports = results["cases"]["import"]
    assert imports["import_checks"]["hfbuilder"]["imported"] == []  # no torch, transformers, deepspeed...
    assert "transformers" in imports["import_checks"]["transformers"]["imported"]
    assert results["meta"]["date"] and results["meta"]["device"]
    md = (out / "results-sft-import-tiny.md").read_text()
    assert "| sft | tiny | cpu | hfbuilder |" in md and "| import | hfbuilder / transformers |" in md
    assert "hfbuilder / dschat = " in proc.stdout


def test_profile_load_tiny_fresh_processes(tmp_path):
    """benchmarks/profile_load.py --fresh on the CPU: each variant's first build in its own process."""
    script = RUNNER.parent / "profile_load.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", "--fresh", "--rounds", "1", "--variants", "raw,default,written",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rounds = {line.split()[2].rstrip(":"): json.loads(line.split(": ", 1)[1])
              for line in proc.stdout.splitlines() if line.startswith("round 0 ")}
    assert rounds["raw"] == {"seconds": None}  # instanttensor reads onto CUDA only
    for variant in ("default", "written"):
        assert rounds[variant]["seconds"] > 0 and "load" in rounds[variant]["stages"]
        assert list(rounds[variant]["phases"])[:3] == ["open", "architecture", "keys"]
    assert "default: median" in proc.stdout and "written: median" in proc.stdout
