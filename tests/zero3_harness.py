"""Run real DeepSpeed ZeRO-3 on CPU: a worker script as N ranks (gloo), each writing JSON.

Used by ``tests/test_zero3.py``; reusable for any test that needs ranks::

    results = run_ranks("tests/zero3_worker.py", {"checks": [...]}, world_size=2, workdir=tmp_path)

Every rank gets ``DS_ACCELERATOR=cpu``, ``MASTER_ADDR``/``MASTER_PORT`` (a free port),
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and one OpenMP thread, and runs
``python WORKER SPEC_JSON OUT_DIR``; it must write ``OUT_DIR/rank<r>.json``. When a
rank fails the others are stopped (they would wait forever in a collective) and the
error shows every rank's log. Also home to the small head the tests build with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hfbuilder

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",  # as torchrun sets it: ranks sharing cores must not oversubscribe them
        TOKENIZERS_PARALLELISM="false",
        HFBUILDER_DISABLE_PLUGIN_AUTOLOAD="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def _tail(path: Path, n: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-n:]


def run_ranks(
    worker: str | os.PathLike[str], spec: dict[str, Any], world_size: int, workdir: Path, timeout: float = 240
) -> list[dict[str, Any]]:
    """Run ``worker`` as ``world_size`` ranks; return the ranks' JSON results, rank 0 first."""
    workdir = Path(workdir)
    out = workdir / f"ranks-{world_size}"
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        log = out / f"rank{rank}.log"
        logs.append(log)
        with open(log, "w") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.fspath(worker), os.fspath(spec_path), os.fspath(out)],
                    env=rank_env(rank, world_size, port), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                )
            )
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if any(p.returncode not in (None, 0) for p in procs) and failed_at is None:
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 15):
            break
        time.sleep(0.1)
    timed_out = [r for r, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if timed_out or any(p.returncode for p in procs):
        report = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{_tail(logs[r])}" for r, p in enumerate(procs))
        why = f"ranks {timed_out} still running after {timeout} s" if timed_out else "a rank failed"
        raise AssertionError(f"{why}\n{report}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


# -- a small head for the tests, registered through hfbuilder_heads like any plugin's -----------


def _value_model(base: Any) -> Any:
    import torch

    class ValueModel(torch.nn.Module):
        """The base model plus a scalar head, created in fp32 on purpose (as DeepSpeed-Chat's v_head)."""

        def __init__(self, base: Any) -> None:
            super().__init__()
            self.base = base
            self.v_head = torch.nn.Linear(base.config.hidden_size, 1, bias=False, dtype=torch.float32)

        def forward(self, input_ids: Any, attention_mask: Any = None) -> Any:
            hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.v_head(hidden).squeeze(-1)

    return ValueModel(base)


class ValueHead(hfbuilder.Head):
    name = "test_value"

    def wrap(self, model: Any, ctx: Any, **options: Any) -> Any:
        return _value_model(model)


class HeadPlugin:
    @hfbuilder.hookimpl
    def hfbuilder_heads(self) -> list[hfbuilder.Head]:
        return [ValueHead()]


class LoopedMoeLeafPlugin:
    """Teaches hfbuilder the test model's MoE block, as a plugin for a remote-code family would."""

    @hfbuilder.hookimpl
    def hfbuilder_zero3_leaf_modules(self, model_type: str | None) -> list[str]:
        from hfbuilder.testing import LOOPED_MOE

        return ["LoopedMoeBlock"] if model_type == LOOPED_MOE else []


__all__ = ["HeadPlugin", "LoopedMoeLeafPlugin", "ValueHead", "free_port", "rank_env", "run_ranks"]
