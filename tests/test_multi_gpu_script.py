"""benchmarks/multi_gpu_zero3.py end to end on the CPU: the script a multi-GPU run uses.

The GPU path differs from this one only in the backend (NCCL), ``DS_ACCELERATOR`` and the GPU
memory figures, so one CPU run at world size 2 covers the checkpoints, both contenders' builds,
``deepspeed.initialize``, training, the cross-rank checks, the tables and the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "multi_gpu_zero3.py"
STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("multi-gpu")
    out = work / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--world-size", "2", "--shape", "tiny",
           "--steps", str(STEPS), "--workdir", str(work), "--out", str(out), "--timeout", "240"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout, out


@pytest.mark.zero3
@pytest.mark.parametrize("model", ["actor", "critic"])
def test_hfbuilder_partitions_agrees_across_ranks_and_trains(run, model):
    result, _, _ = run
    assert result["hfbuilder_failures"] == []
    m = result["summary"]["hfbuilder"][model]
    assert m["complete"] and m["errors"] == {}
    assert m["partitioned"] and m["unpartitioned"] == []
    assert m["dtypes"] == ["bfloat16"]
    assert m["ranks_agree_after_build"] and m["mismatched_after_build"] == []
    assert m["ranks_agree_after_training"] and m["mismatched_after_training"] == []
    assert m["losses_finite"]
    (per_rank,) = m["losses"]  # one launch
    assert len(per_rank) == 2 and all(len(losses) == STEPS for losses in per_rank)
    assert all(math.isfinite(x) for losses in per_rank for x in losses)
    assert m["build_seconds"] > 0
    assert all(x is None for x in m["gpu_peak_mib"])  # no GPU figures on the CPU
    assert all(x is not None for x in m["rss_peak_above_start_mib"])


@pytest.mark.zero3
def test_dschat_critic_failure_is_recorded_and_the_run_goes_on(run):
    result, stdout, _ = run
    critic = result["summary"]["dschat"]["critic"]
    error = critic["errors"]["initialize"]
    assert "AssertionError" in error and "defragment" in error
    assert "v_head.weight" in critic["unpartitioned"]  # DeepSpeed-Chat's fp32 head, beside bf16 partitions
    assert not critic["partitioned"]
    actor = result["summary"]["dschat"]["actor"]
    assert "initialize" not in actor["errors"] and actor["losses_finite"]
    assert "DeepSpeed-Chat critic initialize: AssertionError" in stdout


@pytest.mark.zero3
def test_tables_and_records(run):
    result, stdout, out = run
    for row in ("| hfbuilder | actor |", "| hfbuilder | critic |", "| DeepSpeed-Chat | actor |",
                "| **hfbuilder / DeepSpeed-Chat** | actor |"):  # fmt: skip
        assert row in stdout
    assert "hfbuilder: all checks passed" in stdout
    assert out.with_suffix(".md").read_text().count("\n|") >= 10
    meta = result["meta"]
    assert (meta["device"], meta["world_size"], meta["shape"], meta["steps"]) == ("cpu", 2, "tiny", STEPS)
    for launches in result["runs"].values():
        (launch,) = launches
        assert launch["ok"] and [r["rank"] for r in launch["ranks"]] == [0, 1]
        assert all(r["phase"] == "done" and r["rss_peak_mib"] > 0 for r in launch["ranks"])


# -- the parent's checks on records it did not get from a clean run (in-process) ---------------------


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("multi_gpu_zero3", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _rank(rank, digest="a", losses=(1.0, 0.5), unpartitioned=()):
    model = {"errors": {}, "build_seconds": 1.0, "unpartitioned": list(unpartitioned), "dtypes": ["bfloat16"],
             "digests_built": {"w": digest}, "digests_trained": {"w": "t"}, "losses": list(losses),
             "step_seconds": [0.2, 0.1], "gpu_peak_mib": None, "rss_peak_above_start_mib": 10.0}  # fmt: skip
    return {"rank": rank, "models": {"actor": dict(model), "critic": dict(model)}, "rss_peak_mib": 100.0}


def test_parent_flags_disagreeing_ranks_nan_losses_and_missing_ranks():
    mg = _script()
    launch = {"ok": True, "ranks": [_rank(0), _rank(1)]}
    assert mg.passed(mg.summarize({"hfbuilder": [launch]}, 2, 2)["hfbuilder"]) == []

    bad = {"ok": True, "ranks": [_rank(0), _rank(1, digest="b", losses=(1.0, math.nan), unpartitioned=["x"])]}
    s = mg.summarize({"hfbuilder": [bad]}, 2, 2)["hfbuilder"]
    assert s["actor"]["mismatched_after_build"] == ["w"]
    failures = mg.passed(s)
    for check in ("ranks_agree_after_build", "losses_finite", "partitioned"):
        assert f"actor: {check}" in failures

    crashed = {"ok": False, "ranks": [_rank(0), None]}
    summary = mg.summarize({"hfbuilder": [crashed], "dschat": [launch]}, 2, 2)
    failures = mg.passed(summary["hfbuilder"])
    assert "critic: complete" in failures and "critic: ranks_agree_after_build" in failures
    assert "| hfbuilder | critic |" in mg.tables(summary, 2)  # the tables still print
