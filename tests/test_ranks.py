"""hfbuilder.testing's rank launcher: a failed rank stops the others, a hang is named, results come back.

The ranks here are plain Python processes (no torch): what is tested is the launcher, and a
rank that needs no imports starts in a fraction of a second.
"""

from __future__ import annotations

import json
import sys

import pytest

from hfbuilder.testing import RanksFailed, launch_ranks, run_ranks, where_stuck

RANK = "import json, os, sys, time\nrank = int(os.environ['RANK'])\n"


def test_launcher_stops_the_other_ranks_soon_after_one_fails(tmp_path):
    code = "import os, sys, time; rank = int(os.environ['RANK']); print(os.environ['DS_ACCELERATOR']); " \
           "sys.exit(3) if rank == 1 else time.sleep(60)"  # fmt: skip
    launch = launch_ranks([sys.executable, "-c", code], 2, "cuda", timeout=50, grace=1, log_dir=str(tmp_path), name="t")
    assert launch.returncodes == [None, 3] and launch.killed and not launch.ok
    assert launch.seconds < 20  # not the timeout: rank 0 would have waited forever in a collective
    assert launch.logs[1].strip() == "cuda"  # DS_ACCELERATOR set from the device, whatever was inherited
    assert (tmp_path / "t-rank0.log").exists()
    assert launch.failed == [1] and not launch.timed_out
    assert "rank(s) 1 (exit 3) failed" in launch.why() and "rank 0 was stopped in <module>" in launch.why()


def test_a_hang_is_named_by_the_function_each_rank_waits_in(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(RANK + "def wait_for_the_others():\n    time.sleep(60)\n\n"
                      "def never_returns():\n    time.sleep(60)\n\n"
                      "wait_for_the_others() if rank == 0 else never_returns()\n")  # fmt: skip
    launch = launch_ranks([sys.executable, str(script)], 2, timeout=2, log_dir=tmp_path)
    assert launch.timed_out and launch.returncodes == [None, None] and not launch.ok
    assert launch.stuck[0].startswith("wait_for_the_others (hang.py:4)")
    assert launch.stuck[1].startswith("never_returns (hang.py:7)")
    with pytest.raises(RanksFailed, match=r"ranks \[0, 1\] still running after 2 s; rank 0 was stopped in wait_for"):
        launch.check()


def test_run_ranks_returns_each_ranks_result_and_reports_a_failure(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(RANK + "spec = json.load(open(sys.argv[1]))\n"
                      "if spec['fail'] and rank == 1:\n    raise RuntimeError('rank one broke')\n"
                      "json.dump({'rank': rank, 'world': os.environ['WORLD_SIZE'], 'x': spec['x']}, "
                      "open(os.path.join(sys.argv[2], f'rank{rank}.json'), 'w'))\n")  # fmt: skip
    results = run_ranks(worker, {"x": 7, "fail": False}, 3, tmp_path, timeout=60)
    assert results == [{"rank": r, "world": "3", "x": 7} for r in range(3)]
    with pytest.raises(RanksFailed, match="rank one broke") as info:
        run_ranks(worker, {"x": 7, "fail": True}, 2, tmp_path, timeout=60)
    assert info.value.launch.failed == [1]
    assert json.loads((tmp_path / "ranks-2" / "spec.json").read_text())["fail"] is True


def test_where_stuck_reads_the_main_threads_innermost_frames():
    dump = ('Fatal Python error: Aborted\n\nThread 0x01 (most recent call first):\n  File "/x/t.py", line 3 in helper\n\n'
            'Current thread 0x02 (most recent call first):\n  File "/lib/c10d.py", line 50 in barrier\n'
            '  File "/w/rank.py", line 9 in main\n\nExtension modules: x\n')  # fmt: skip
    assert where_stuck(dump) == "barrier (c10d.py:50) <- main (rank.py:9)"
    assert where_stuck("no dump here") is None
