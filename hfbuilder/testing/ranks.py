"""Rank processes for real DeepSpeed runs on one host: gloo on CPU, NCCL on GPUs.

One launcher for the tests and the benchmarks. :func:`launch_ranks` starts any command as
``world_size`` ranks with the environment ``torchrun``/``deepspeed`` would give them and waits;
:func:`run_ranks` is the tests' protocol on top of it (a worker script, a JSON spec in, one
JSON result per rank out). Two failure modes a multi-rank run has and a single process has not:

* one rank fails and the others wait forever in their next collective: they are stopped
  ``grace`` seconds after the first failure;
* every rank waits (a collective one rank never reaches): after ``timeout`` seconds the
  launcher asks each live rank where it is. Ranks run with ``PYTHONFAULTHANDLER=1``, so a
  ``SIGABRT`` makes Python print every thread's stack before the process dies; the innermost
  frames of the main thread name the hang (``Launch.stuck``).

Nothing here imports torch: the launching side stays light.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What ``torchrun``/``deepspeed`` set for every process; a launcher's own must not leak into ours.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# faulthandler's frame lines: '  File "/path/x.py", line 12 in wait'
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


class RanksFailed(AssertionError):
    """A launch of ranks failed or hung; the message says which rank, how, and where.

    An ``AssertionError``: in a test it is the test failing, shown with every rank's log tail.
    """

    def __init__(self, message: str, launch: Launch) -> None:
        super().__init__(message)
        self.launch = launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(
    rank: int, world_size: int, port: int, device: str = "cpu", threads: int | None = 1,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:  # fmt: skip
    """The environment ``torchrun`` gives rank ``rank`` on one host, for ``device`` cpu or cuda.

    ``DS_ACCELERATOR`` is always set from ``device``: an inherited ``cpu`` (the Makefile exports
    it) would otherwise put a GPU run on the CPU. ``threads`` sets ``OMP_NUM_THREADS`` (None
    leaves it): ranks sharing cores must not oversubscribe them.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(
        DS_ACCELERATOR=device, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1",
    )  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


@dataclass
class Launch:
    """How the ranks of one launch ended."""

    returncodes: list[int | None]  # None: the rank was still running and was stopped
    logs: list[str]  # each rank's stdout and stderr
    killed: bool  # some ranks were stopped (timeout, or another rank failed)
    seconds: float
    timed_out: bool = False
    stuck: dict[int, str] = field(default_factory=dict)  # rank -> where it was when stopped
    log_paths: list[str] = field(default_factory=list)
    timeout: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.killed and not any(self.returncodes)

    @property
    def failed(self) -> list[int]:
        """Ranks that exited with an error on their own (not stopped by the launcher)."""
        return [r for r, code in enumerate(self.returncodes) if code]

    def why(self) -> str:
        """One paragraph: which rank failed first or where the ranks hung."""
        if self.ok:
            return "every rank exited 0"
        lines = []
        if self.failed:
            lines.append("rank(s) " + ", ".join(f"{r} (exit {self.returncodes[r]})" for r in self.failed) + " failed")
        if self.timed_out:
            lines.append(f"ranks {sorted(self.stuck)} still running after {self.timeout:g} s")
        for rank, where in sorted(self.stuck.items()):
            lines.append(f"rank {rank} was stopped in {where}")
        return "; ".join(lines)

    def report(self, tail: int = 6000) -> str:
        """:meth:`why`, then every rank's log tail."""
        parts = [self.why()]
        for r, log in enumerate(self.logs):
            parts.append(f"--- rank {r} (exit {self.returncodes[r]}) ---\n{log[-tail:]}")
        return "\n".join(parts)

    def check(self) -> Launch:
        """Raise :class:`RanksFailed` with :meth:`report` unless every rank exited 0."""
        if not self.ok:
            raise RanksFailed(self.report(), self)
        return self


def where_stuck(log: str) -> str | None:
    """The main thread's innermost frames from the last faulthandler dump in ``log``, or None.

    CPython lists the newest thread first, so the main thread's block is the dump's last one,
    whichever thread the signal landed on.
    """
    dump = log.rfind("Fatal Python error")
    if dump < 0:
        return None
    blocks = log[dump:].split("(most recent call first):")
    if len(blocks) < 2:
        return None
    frames = []
    for line in blocks[-1].splitlines()[1:]:
        m = _FRAME.match(line)
        if not m:
            break
        frames.append(f"{m['func']} ({os.path.basename(m['file'])}:{m['line']})")
    return " <- ".join(frames[:4]) if frames else None


def _stop(procs: list[subprocess.Popen], ranks: list[int], wait: float = 5.0) -> None:
    """Ask each rank to print its stacks (SIGABRT with faulthandler on), then kill what is left."""
    for r in ranks:
        try:
            procs[r].send_signal(signal.SIGABRT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    for r in ranks:
        try:
            procs[r].wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs[r].kill()
            procs[r].wait()


def _no_core_dump() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def launch_ranks(
    cmd: Sequence[str], world_size: int, device: str = "cpu", threads: int | None = 1,
    timeout: float = 600, grace: float = 15, log_dir: str | os.PathLike[str] | None = None, name: str = "",
    env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
) -> Launch:  # fmt: skip
    """Run ``cmd`` as ``world_size`` ranks on this host and wait for all of them.

    When a rank exits with an error the others get ``grace`` seconds, then are stopped; after
    ``timeout`` seconds every live rank is stopped. A stopped rank first prints its stacks,
    and :attr:`Launch.stuck` says where each was. Logs go to files (``NAME-rank<r>.log``, or
    ``rank<r>.log``, in ``log_dir`` or a new temporary directory), not pipes, so a chatty rank
    never blocks on a full pipe. ``env`` adds to each rank's environment (see :func:`rank_env`).
    """
    port = free_port()
    log_dir = os.fspath(log_dir or tempfile.mkdtemp(prefix="ranks-"))
    os.makedirs(log_dir, exist_ok=True)
    paths = [os.path.join(log_dir, f"{name}-rank{r}.log" if name else f"rank{r}.log") for r in range(world_size)]
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    for rank, path in enumerate(paths):
        with open(path, "w") as fh:
            procs.append(subprocess.Popen(
                list(cmd), env=rank_env(rank, world_size, port, device, threads, env), cwd=cwd,
                stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_no_core_dump,
            ))  # fmt: skip
    failed_at: float | None = None
    timed_out = False
    while None in (codes := [p.poll() for p in procs]):  # poll every rank: any() would stop at the first
        now = time.monotonic()
        if failed_at is None and any(codes):
            failed_at = now
        if now - start > timeout:
            timed_out = True
            break
        if failed_at is not None and now - failed_at > grace:
            break
        time.sleep(0.05)
    live = [r for r, p in enumerate(procs) if p.poll() is None]
    _stop(procs, live)
    logs = []
    for path in paths:
        with open(path, errors="replace") as fh:
            logs.append(fh.read())
    stuck = {r: where_stuck(logs[r]) or "an unknown place (no stack printed)" for r in live}
    return Launch(
        returncodes=[None if r in live else p.returncode for r, p in enumerate(procs)], logs=logs, killed=bool(live),
        seconds=time.monotonic() - start, timed_out=timed_out, stuck=stuck, log_paths=paths, timeout=timeout,
    )  # fmt: skip


def run_ranks(
    worker: str | os.PathLike[str], spec: Mapping[str, Any], world_size: int, workdir: str | os.PathLike[str],
    timeout: float = 240, device: str = "cpu", threads: int | None = 1, env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``python WORKER SPEC_JSON OUT_DIR`` as ``world_size`` ranks; return their results, rank 0 first.

    ``spec`` is written to ``OUT_DIR/spec.json``; each rank must write ``OUT_DIR/rank<r>.json``.
    Raises :class:`RanksFailed` (every rank's log tail, where each stopped rank was) when a rank
    fails, hangs past ``timeout`` or writes no result.
    """
    import json

    out = Path(workdir) / f"ranks-{world_size}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.json"):
        stale.unlink()
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, os.fspath(worker), os.fspath(spec_path), os.fspath(out)]
    launch = launch_ranks(cmd, world_size, device, threads, timeout, log_dir=out, env=env, cwd=cwd).check()
    missing = [r for r in range(world_size) if not (out / f"rank{r}.json").is_file()]
    if missing:
        raise RanksFailed(f"rank(s) {missing} exited 0 without writing a result\n{launch.report()}", launch)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def end_rank() -> None:
    """Leave a rank process without the interpreter's teardown.

    Its results are written; what is left is DeepSpeed's CPU shared-memory communication op,
    whose threads can abort the C++ static destructors at exit ("terminate called without an
    active exception", exit -6) after every check passed. Close the process group in step on
    every rank, flush, and exit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = ["LAUNCHER_ENV", "Launch", "RanksFailed", "end_rank", "free_port", "launch_ranks", "rank_env",
           "run_ranks", "where_stuck"]  # fmt: skip
