"""Real DeepSpeed ZeRO-3 on CPU for the tests: a worker script as N ranks (gloo), each writing JSON.

Used by ``tests/test_zero3.py``; reusable for any test that needs ranks::

    results = run_ranks("tests/zero3_worker.py", {"checks": [...]}, world_size=2, workdir=tmp_path)

The launcher is :func:`hfbuilder.testing.run_ranks` (the benchmarks use the same one); this
module only adds what the tests want on top: one OpenMP thread per rank, no third-party
plugins, no warnings in the logs, the repository as the working directory. Every rank runs
``python WORKER SPEC_JSON OUT_DIR`` and must write ``OUT_DIR/rank<r>.json``. Also home to the
small head the tests build with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hfbuilder
from hfbuilder.testing import run_ranks as _run_ranks

REPO = Path(__file__).resolve().parent.parent
TEST_ENV = {"HFBUILDER_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONWARNINGS": "ignore"}


def run_ranks(
    worker: str | os.PathLike[str], spec: dict[str, Any], world_size: int, workdir: Path, timeout: float = 240
) -> list[dict[str, Any]]:
    """Run ``worker`` as ``world_size`` ranks; return the ranks' JSON results, rank 0 first."""
    return _run_ranks(worker, spec, world_size, workdir, timeout=timeout, threads=1, env=TEST_ENV, cwd=REPO)


def finish_rank(out_dir: str, results: dict[str, Any], checks: dict[str, Any]) -> None:
    """In a worker rank: run each check (a callable returning plain data) in order, recording its result
    or its traceback, so one failure does not hide the others; write ``rank<r>.json``; end the rank."""
    import json
    import traceback

    from hfbuilder.testing import end_rank

    for name, check in checks.items():
        try:
            results[name] = {"ok": True, **check()}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{results['rank']}.json"), "w") as fh:
        json.dump(results, fh)
    end_rank()


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


__all__ = ["HeadPlugin", "LoopedMoeLeafPlugin", "ValueHead", "run_ranks"]
