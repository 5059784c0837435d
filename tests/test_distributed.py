"""Distributed set-up fails fast and by name; training collectives keep DeepSpeed's long timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hfbuilder import DistributedSetupError, testing
from hfbuilder.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, setup_timeout

ENV = {**os.environ, "HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
ENV.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def rank_env(world_size: int, **extra: str) -> dict[str, str]:
    """Rank 0's environment, its peers never started: the shared launcher's, on a free port."""
    return testing.rank_env(0, world_size, testing.free_port(), extra={**ENV, **extra})


def test_setup_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert setup_timeout() == DEFAULT_TIMEOUT_S < 60
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert setup_timeout() == 2.5
    for bad in ("abc", "0", "-1", "nan", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(DistributedSetupError, match=f"{TIMEOUT_ENV} must be a positive number of seconds"):
            setup_timeout()


@pytest.mark.zero3
def test_a_rank_whose_peers_never_come_fails_with_a_named_error(model_dir, tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}))
    proc = subprocess.run([sys.executable, "-m", "hfbuilder", "-q", "build", model_dir("opt"), "--zero3", str(ds)],
                          capture_output=True, text=True, env=rank_env(2, **{TIMEOUT_ENV: "2"}), timeout=300)
    assert proc.returncode == 2, proc.stderr  # DistributedSetupError is an input error
    assert f"torch.distributed set-up failed within 2 s ({TIMEOUT_ENV})" in proc.stderr
    assert "1/2 clients joined" in proc.stderr and "WORLD_SIZE 2" in proc.stderr


@pytest.mark.zero3
def test_collectives_get_deepspeeds_timeout_back_after_the_setup():
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from hfbuilder.distributed import init_distributed
        from hfbuilder.testing import end_rank

        init_distributed("gloo")
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        print("TIMEOUTS", backend.options._timeout.total_seconds(),
              dist.distributed_c10d._get_default_store().timeout.total_seconds(), flush=True)
        end_rank()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=rank_env(1, **{TIMEOUT_ENV: "3", "DEEPSPEED_TIMEOUT": "7"}), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "TIMEOUTS 420.0 420.0" in proc.stdout  # DEEPSPEED_TIMEOUT's 7 minutes, not the set-up's 3 s
