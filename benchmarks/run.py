#!/usr/bin/env python
"""Side-by-side build benchmarks: DeepSpeed-Chat's algorithm against hfbuilder, in fresh processes.

Every measurement runs in a fresh Python process (``run.py --worker ...``), and the contenders of
a case take turns (the order rotates each round), so neither side profits from a warm process or
from running last. Each worker imports torch and transformers, loads the tokenizer, imports the
model's modeling module and (on a GPU) initializes CUDA *before* its clock starts: the timed region
is the model build alone, the same for every contender. One-time module imports are outside the
clock on both sides: transformers and the modeling module for every contender, ``hfbuilder`` and
its built-in plugin modules for hfbuilder's; case ``import`` measures those (``hfbuilder+plugins``).
What hfbuilder does on every build (scanning entry points, making the plugin manager, ordering the
stages, the report's per-stage measurements) is inside.

Cases (``--set cpu`` is what ``make bench`` runs; ``--set gpu`` is the H100 run):

=========  =====  ===========  ==============================================================
case       set    shape        contenders and goal
=========  =====  ===========  ==============================================================
sft        cpu    OPT-350m     dschat, hfbuilder: hfbuilder / dschat <= 1.05; and, for information,
                               hfbuilder-unchecked (``invariants="off"``: no post-build checks)
import     cpu    -            ``python -c "import X"`` for transformers, hfbuilder: <= 1.2,
                               and ``import hfbuilder`` imports no torch/transformers/deepspeed;
                               hfbuilder+plugins (the package and every built-in plugin module)
                               for information
device     gpu    OPT-1.3B     dschat (+ ``.cuda()``), hfbuilder (``.on_device``), safetensors
                               (``load_file(device=...)``): dschat / hfbuilder >= 3,
                               hfbuilder / safetensors <= 1.3; and, for information, dschat-fp32
                               (the baseline as transformers 4 ran it: float32 by default)
critic     gpu    OPT-1.3B     dschat (full init + ``torch.load`` + ``load_state_dict``),
                               hfbuilder (``with_checkpoint`` of the same ``.bin``),
                               hfbuilder-st (same weights as ``model.safetensors``):
                               dschat / hfbuilder >= 30
=========  =====  ===========  ==============================================================

The baseline ("dschat") is DeepSpeed-Chat's algorithm written here with plain transformers calls:
``AutoConfig.from_pretrained``; set the dropout keys; ``from_pretrained`` (or ``from_config`` with
full initialization for ``rlhf_training``); end and pad ids; ``resize_token_embeddings`` to a
multiple of 8; then ``.to(device)`` (``.cuda()``). Its critic wraps the base in a value head and
loads ``pytorch_model.bin`` with ``torch.load`` and a non-strict ``load_state_dict``.

The script makes its own random checkpoints (fp16, 50,265-token tokenizer, OPT's 50,272-row
vocabulary) under ``--workdir`` and reuses them while their spec is unchanged. It writes
``results-<set>.json`` and ``results-<set>.md`` under ``--out`` and prints the ratios.
``--tiny`` runs the same machinery on a tiny OPT in seconds (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "HFBUILDER_BENCH_RESULT "
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing hfbuilder (the GPU machine)
    sys.path.insert(1, str(REPO_ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:  # _common, also when loaded by file path
    sys.path.insert(1, str(Path(__file__).resolve().parent))

import _load  # noqa: E402
from _common import Checkpoints, check_values, make_checkpoints  # noqa: E402
from _probes import current_rss_mib, peak_rss_mib  # noqa: E402

from hfbuilder.testing import SHAPES  # noqa: E402

OPT_SHAPES = sorted(name for name, s in SHAPES.items() if s.model_type == "opt")  # the cases name OPT's modules

# -- the contenders (run inside a worker; the timed region is the call) ---------------------------

DROPOUT = 0.0
NUM_PADDING_AT_BEGINNING = 1  # OPT's convention in DeepSpeed-Chat


def c_sft_dschat(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from hfbuilder.testing import dschat

    return dschat.create_hf_model(AutoModelForCausalLM, str(ck.sft), tok, dropout=DROPOUT), None


def c_sft_hfbuilder(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from hfbuilder import ModelBuilder

    return ModelBuilder(AutoModelForCausalLM, ck.sft, tok).with_dropout(DROPOUT).build_with_report()


def c_sft_hfbuilder_unchecked(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    """The same build without the post-build invariants (``invariants="off"``), for information:
    the default checks that every weight is finite, which reads every weight once."""
    from transformers import AutoModelForCausalLM

    from hfbuilder import ModelBuilder

    builder = ModelBuilder(AutoModelForCausalLM, ck.sft, tok).with_dropout(DROPOUT).with_options(invariants="off")
    return builder.build_with_report()


def c_device_dschat(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    model, _ = c_sft_dschat(ck, device, tok)
    return model.to(device), None  # DeepSpeed-Chat's users call .cuda()


def c_device_dschat_fp32(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    """The same, as it ran on transformers 4, whose from_pretrained loaded float32 unless told otherwise.

    DeepSpeed-Chat passes no dtype, so on transformers 4 an fp16 checkpoint became a float32
    model on the CPU (a full converted copy) before ``.cuda()``. For information only: the goal
    ratios use the transformers 5 baseline above.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from hfbuilder.testing import dschat

    class Float32Default:  # transformers 4's from_pretrained: float32 unless told otherwise
        @staticmethod
        def from_pretrained(path: str, **kwargs: Any) -> Any:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)

    return dschat.create_hf_model(Float32Default, str(ck.sft), tok, dropout=DROPOUT).to(device), None


def c_device_hfbuilder(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from hfbuilder import ModelBuilder

    builder = ModelBuilder(AutoModelForCausalLM, ck.sft, tok).with_dropout(DROPOUT)
    return builder.with_dtype("float16").on_device(device).build_with_report()


def c_device_safetensors(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    from safetensors.torch import load_file

    return load_file(ck.sft / "model.safetensors", device=device), None


def c_critic_dschat(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    from hfbuilder.testing import dschat

    critic = dschat.create_critic_model(str(ck.critic_bin), tok, None, NUM_PADDING_AT_BEGINNING, rlhf_training=True,
                                        dropout=DROPOUT)  # fmt: skip
    return critic.to(device), None


def _critic_hfbuilder(path: Path, device: str, tok: Any) -> tuple[Any, Any]:
    from transformers import AutoModel

    from hfbuilder import ModelBuilder

    builder = (
        ModelBuilder(AutoModel, path, tok)
        .with_dropout(DROPOUT)
        .with_head("reward", num_padding_at_beginning=NUM_PADDING_AT_BEGINNING)
        .with_checkpoint()
    )
    return builder.with_dtype("float16").on_device(device).build_with_report()


def c_critic_hfbuilder(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    return _critic_hfbuilder(ck.critic_bin, device, tok)


def c_critic_hfbuilder_st(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    return _critic_hfbuilder(ck.critic_st, device, tok)


def c_critic_compat(ck: Checkpoints, device: str, tok: Any) -> tuple[Any, Any]:
    """As a DeepSpeed-Chat step-3 script calls it: ``create_critic_model(..., rlhf_training=True)``."""
    from hfbuilder import compat

    return compat.create_critic_model(str(ck.critic_bin), tok, None, NUM_PADDING_AT_BEGINNING, rlhf_training=True), None


# -- cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """``num / den`` of median seconds, with the goal it must meet (``op`` "<=" or ">=", or "" for none)."""

    num: str
    den: str
    op: str = ""
    goal: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.num} / {self.den}"

    @property
    def goal_text(self) -> str:
        return f"{self.op} {self.goal:g}" if self.op else "(for information)"

    def met(self, value: float) -> bool | None:
        if not self.op:
            return None
        return value <= self.goal if self.op == "<=" else value >= self.goal


@dataclass(frozen=True)
class Contender:
    name: str
    fn: Any  # the build, or for case import the module name
    #: what the worker reads, for the correctness check after the clock stops and its GB/s ("": no check)
    reads: str = "sft"
    warmup: bool = True  # slow baselines skip the untimed warm-up round
    #: import hfbuilder's plugin modules before the clock (False: the first build in a process pays them)
    preimport: bool = True


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    shape: str
    contenders: tuple[Contender, ...]
    ratios: tuple[Ratio, ...]
    reps: int
    gpu: bool = False  # runs on options.device; on the CPU set it is forced to "cpu"
    needs_head: str | None = None
    tiny_shape: str = "tiny"  # the shape --tiny runs
    #: evict the checkpoint's files from the page cache before every measurement
    cold: bool = False
    #: (contender, GB/s it must reach), for the goal table
    gbps_goal: tuple[str, float] | None = None

    def contender(self, name: str) -> Contender:
        return next(c for c in self.contenders if c.name == name)


#: Everything a first build imports of hfbuilder: the package and every built-in plugin module.
PLUGINS_IMPORT = ("import hfbuilder, importlib\nfrom hfbuilder.manager import DEFAULT_PLUGINS\n"
                  "for name in DEFAULT_PLUGINS: importlib.import_module(name)")

CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("sft", "SFT build (from_pretrained, token ids, resize) on the CPU", "opt-350m",
             (Contender("dschat", c_sft_dschat), Contender("hfbuilder", c_sft_hfbuilder),
              Contender("hfbuilder-unchecked", c_sft_hfbuilder_unchecked)),
             (Ratio("hfbuilder", "dschat", "<=", 1.05), Ratio("hfbuilder-unchecked", "dschat")), reps=15),
        Case("import", "python -c 'import X'", "tiny",
             (Contender("transformers", "import transformers", reads=""),
              Contender("hfbuilder", "import hfbuilder", reads=""),
              Contender("hfbuilder+plugins", PLUGINS_IMPORT, reads="")),
             (Ratio("hfbuilder", "transformers", "<=", 1.2), Ratio("hfbuilder+plugins", "transformers")), reps=15),
        Case("device", "build straight to the device, fp16", "opt-1.3b",
             (Contender("dschat", c_device_dschat), Contender("hfbuilder", c_device_hfbuilder),
              Contender("safetensors", c_device_safetensors), Contender("dschat-fp32", c_device_dschat_fp32)),
             (Ratio("dschat", "hfbuilder", ">=", 3.0), Ratio("hfbuilder", "safetensors", "<=", 1.3),
              Ratio("dschat-fp32", "hfbuilder")),
             reps=5, gpu=True),
        Case("critic", "critic: deferred weights + reward head + step-2 checkpoint", "opt-1.3b",
             (Contender("dschat", c_critic_dschat, reads="critic-bin", warmup=False),
              Contender("hfbuilder", c_critic_hfbuilder, reads="critic-bin"),
              Contender("hfbuilder-st", c_critic_hfbuilder_st, reads="critic-st")),
             (Ratio("dschat", "hfbuilder", ">=", 30.0),), reps=3, gpu=True, needs_head="reward"),
        Case("critic-first", "critic on the CPU, first build in a fresh process (DeepSpeed-Chat step 3)", "opt-350m",
             (Contender("dschat", c_critic_dschat, reads="critic-bin", warmup=False),
              Contender("hfbuilder", c_critic_compat, reads="critic-bin", preimport=False)),
             (Ratio("dschat", "hfbuilder", ">=", 20.0),), reps=5, needs_head="reward"),
        Case("llama3-8b", "build to the GPU, Llama-3-8B shape, bf16, 4 safetensors shards, page cache warm",
             "llama3-8b",
             (Contender("hfbuilder", _load.c_hfbuilder), Contender("hfbuilder-st", _load.c_hfbuilder_st),
              Contender("hfbuilder-critic", _load.c_hfbuilder_critic, reads="critic-st"),
              Contender("transformers", _load.c_transformers), Contender("dschat", c_device_dschat, warmup=False),
              Contender("instanttensor", _load.c_instanttensor), Contender("pinned", _load.c_pinned, reads="")),
             (Ratio("hfbuilder", "instanttensor", "<=", 1.2), Ratio("hfbuilder-critic", "hfbuilder", "<=", 1.1),
              Ratio("hfbuilder-st", "hfbuilder"), Ratio("transformers", "hfbuilder"), Ratio("dschat", "hfbuilder"),
              Ratio("pinned", "hfbuilder")),
             reps=3, gpu=True, needs_head="reward", tiny_shape="llama-tiny", gbps_goal=("hfbuilder", 20.0)),
        Case("llama3-8b-cold", "build to the GPU, Llama-3-8B shape, the files evicted from the page cache first",
             "llama3-8b",
             (Contender("disk", _load.c_disk, reads=""), Contender("hfbuilder", _load.c_hfbuilder),
              Contender("hfbuilder-buffered", _load.c_hfbuilder_buffered),
              Contender("instanttensor-direct", _load.c_instanttensor_direct),
              Contender("instanttensor", _load.c_instanttensor)),
             (Ratio("disk", "hfbuilder", ">=", 0.8), Ratio("disk", "hfbuilder-buffered"),
              Ratio("disk", "instanttensor-direct"), Ratio("disk", "instanttensor")),
             reps=1, gpu=True, tiny_shape="llama-tiny", cold=True),
    )
}
SETS: dict[str, tuple[str, ...]] = {"cpu": ("sft", "import"), "gpu": ("device", "critic"),
                                    "load": ("llama3-8b", "llama3-8b-cold"), "cpu-critic": ("critic-first",),
                                    "all": ("sft", "import", "critic-first", "device", "critic", "llama3-8b", "llama3-8b-cold")}

# -- the worker ---------------------------------------------------------------------------------


def _check(case: Case, contender: Contender, ck: Checkpoints, built: Any, device: str) -> str:
    """After the clock: prove the contender really put the checkpoint's values on ``device``."""
    last = SHAPES[case.shape].fields["num_hidden_layers"] - 1
    if contender.reads == "sft":
        return check_values(built, ck.sft, [f"model.decoder.layers.{last}.fc2.weight"], device, contender.name)
    names = [f"rwtransformer.decoder.layers.{last}.fc2.weight", "v_head.weight"]
    return check_values(built, ck.critic_st, names, device, contender.name)


def worker(case_name: str, contender_name: str, workdir: Path, device: str, shape: str | None = None) -> dict[str, Any]:
    """One measurement, in this (fresh) process. Returns what the parent records.

    The tests call it in their own process, with ``device="cpu"`` and the tiny shape, to run
    the GPU cases' code on a machine without one.
    """
    import gc

    import torch
    import transformers
    from transformers import AutoTokenizer

    case = CASES[case_name]
    if shape is not None and shape != case.shape:
        case = Case(**{**case.__dict__, "shape": shape})
    contender = case.contender(contender_name)
    llama = case.shape in _load.LLAMA_SHAPES
    ck: Any = _load.LlamaCheckpoints(workdir / case.shape) if llama else Checkpoints(workdir / case.shape)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Every side: the modeling module, and instanttensor where installed, are imported before the clock.
    importlib.import_module(f"transformers.models.{'llama.modeling_llama' if llama else 'opt.modeling_opt'}")
    if importlib.util.find_spec("instanttensor") is not None:
        importlib.import_module("instanttensor")

    if contender.name.startswith("hfbuilder") and contender.preimport:
        # One-time module imports stay outside the clock on both sides (the baseline's modeling
        # module above); case "import" measures them. Plugin discovery, the plugin manager and
        # the stage order are per build, and timed.
        from hfbuilder.manager import DEFAULT_PLUGINS

        for name in DEFAULT_PLUGINS:
            importlib.import_module(name)
    elif contender.name.startswith("hfbuilder"):
        importlib.import_module("hfbuilder.compat")  # a script's import at its top; the plugins load on first build
    tok = AutoTokenizer.from_pretrained(ck.sft)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    base_rss = current_rss_mib()
    start = time.perf_counter()
    built, report = contender.fn(ck, device, tok)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_rss = peak_rss_mib()
    probe = report if isinstance(report, dict) else {}  # the raw contenders' own measurements
    if "skipped" in probe:
        return {"skipped": probe["skipped"]}
    seconds = probe.get("seconds", seconds)
    result: dict[str, Any] = {"seconds": seconds, "peak_rss_mib": peak_rss, "base_rss_mib": base_rss}
    nbytes = probe.get("bytes") or (ck.nbytes(contender.reads) if llama and contender.reads else None)
    if nbytes:
        result.update(bytes=nbytes, gbps=nbytes / seconds / 1e9)
    if "backend" in probe:
        result["backend"] = probe["backend"]
    report = None if isinstance(report, dict) else report
    if cuda:
        # hfbuilder's report resets torch's peak counter at each stage start, so the build's peak
        # is the largest of its per-stage peaks and the counter's value since the last reset.
        peaks = [torch.cuda.max_memory_allocated() / 2**20]
        if report is not None:
            peaks += [r.peak_cuda_mib for r in report.stages if r.peak_cuda_mib is not None]
        result["peak_gpu_mib"] = max(peaks)
        result["gpu_name"] = torch.cuda.get_device_name()
    if report is not None:
        result["stages"] = {r.name: round(r.seconds, 4) for r in report.stages}
        result["report_total_s"], result["verify_s"] = round(report.total_seconds, 4), round(report.verify_seconds, 4)
        result["facts"] = {r.name: {k: v for k, v in r.facts.items() if k.startswith("load")}
                           for r in report.stages if any(k.startswith("load") for k in r.facts)}
    if llama:
        last = _load.LLAMA_SHAPES[case.shape]["num_hidden_layers"] - 1
        checked = contender.reads and built is not None
        result["check"] = _load.check_llama(contender.reads, ck, built, device, last) if checked else "nothing to check"
    else:
        result["check"] = _check(case, contender, ck, built, device)
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    return result


HEAVY_MODULES = ("torch", "transformers", "deepspeed", "accelerate", "safetensors")


def import_check(statement: str, timeout: float) -> dict[str, Any]:
    """In a fresh ``python -c``: the heavy modules ``statement`` pulls in, and its peak RSS."""
    code = (f"{statement}\nimport sys, json\n"
            f"hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
            f"print({RESULT_TAG!r} + json.dumps({{'imported': sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), "
            f"'peak_rss_mib': int(hwm[0].split()[1]) / 1024 if hwm else None}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": f"{statement!r} failed: {proc.stderr.strip()[-500:]}"}


# -- the parent ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # An installed package runs from .pyc files; without them every worker would compile hfbuilder
    # (an editable checkout) from source while site-packages (transformers) load compiled code.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def run_worker(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=REPO_ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"worker {args} exited {proc.returncode}: " + " | ".join(tail)}


def time_import(statement: str) -> dict[str, Any]:
    """Wall time of ``python -c statement`` (``"import hfbuilder"``), measured from outside."""
    env = _env()
    with open(os.devnull, "wb") as null:
        start = time.perf_counter()
        pid = os.posix_spawn(sys.executable, [sys.executable, "-c", statement], env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, null.fileno(), 1)])
        _, status = os.waitpid(pid, 0)
        seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"python -c {statement!r} failed"}
    return {"seconds": seconds}


def warm_page_cache(ck: Checkpoints) -> None:
    """Read every checkpoint file once, so no contender pays for the first read from disk."""
    for path in sorted(ck.root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def head_available(name: str) -> bool:
    from hfbuilder.manager import Plugins

    return name in Plugins().heads()


@dataclass
class Outcome:
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)  # contender -> why it cannot run here (no CUDA...)
    skipped: str | None = None


def _median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


def run_case(case: Case, args: argparse.Namespace, log: Any) -> Outcome:
    out = Outcome({c.name: [] for c in case.contenders})
    if case.needs_head and not head_available(case.needs_head):
        out.skipped = f"no {case.needs_head!r} head is registered in this hfbuilder"
        return out
    shape = case_shape(case, args)
    device = args.device if case.gpu else "cpu"
    reps = args.reps if args.reps is not None else (1 if args.tiny else case.reps)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    if case.name == "import":
        checks = {c.name: import_check(c.fn, args.timeout) for c in case.contenders}
        out.samples["_checks"] = [checks]
        # Peak RSS from the check (VmHWM after the import); wall time from a bare `python -c "import X"`.
        measure = lambda c: {**time_import(c.fn), "peak_rss_mib": checks[c.name].get("peak_rss_mib")}  # noqa: E731
    else:
        if shape not in args.made:
            started = time.perf_counter()
            made = run_worker(["--make", shape, "--workdir", str(args.workdir)], args.timeout)
            if "error" in made:
                raise SystemExit(made["error"])
            args.made.add(shape)
            log(f"  checkpoints for {shape} ready in {time.perf_counter() - started:.1f} s ({made['root']})")
        cmd = lambda c: ["--worker", case.name, c.name, "--workdir", str(args.workdir), "--device", device,  # noqa: E731
                         "--shape", shape]
        if case.cold:
            started = time.perf_counter()
            os.sync()  # what the checkpoint maker wrote must be on disk before its pages can be dropped
            log(f"  sync: {time.perf_counter() - started:.1f} s")
            files = _load.LlamaCheckpoints(args.workdir / shape).files("sft")
            warmup = 0

            def measure(c: Contender) -> dict[str, Any]:
                cached = _load.evict(files)  # before the worker starts: it must find the files cold
                return {**run_worker(cmd(c), args.timeout), "cached_before": cached}

        else:
            warm_page_cache(Checkpoints(args.workdir / shape))
            measure = lambda c: run_worker(cmd(c), args.timeout)  # noqa: E731
    for _ in range(warmup):
        for c in case.contenders:
            if c.warmup:
                measure(c)
    for rep in range(reps):
        k = rep % len(case.contenders)
        for c in case.contenders[k:] + case.contenders[:k]:
            if c.name in out.errors or c.name in out.skips:
                continue
            result = measure(c)
            if "error" in result or "skipped" in result:
                bad = "error" if "error" in result else "skipped"
                (out.errors if bad == "error" else out.skips)[c.name] = result[bad]
                log(f"  {c.name}: {bad.upper()} {result[bad]}")
                continue
            out.samples[c.name].append(result)
            gpu = f", peak GPU {result['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in result else ""
            rate = f", {result['gbps']:.2f} GB/s" if "gbps" in result else ""
            log(f"  round {rep + 1}/{reps} {c.name:<20} {result['seconds']:8.3f} s{rate}, peak RSS "
                f"{result['peak_rss_mib']:.0f} MiB{gpu}")
    return out


def case_shape(case: Case, args: argparse.Namespace) -> str:
    return getattr(args, "shape", None) or (case.tiny_shape if args.tiny else case.shape)


def summarize(case: Case, outcome: Outcome, args: argparse.Namespace) -> dict[str, Any]:
    shape = case_shape(case, args)
    entry: dict[str, Any] = {"title": case.title, "shape": shape, "device": args.device if case.gpu else "cpu",
                             "contenders": {}, "ratios": []}
    if outcome.skipped:
        entry["skipped"] = outcome.skipped
        return entry
    if "_checks" in outcome.samples:
        entry["import_checks"] = outcome.samples["_checks"][0]
    medians: dict[str, float] = {}
    for c in case.contenders:
        samples = outcome.samples.get(c.name, [])
        info: dict[str, Any] = {"n": len(samples), "samples": samples}
        if c.name in outcome.errors:
            info["error"] = outcome.errors[c.name]
        if c.name in outcome.skips:
            info["skipped"] = outcome.skips[c.name]
        if samples:
            secs = [s["seconds"] for s in samples]
            info.update(median_s=statistics.median(secs), min_s=min(secs), max_s=max(secs),
                        peak_rss_mib=_median(samples, "peak_rss_mib"), base_rss_mib=_median(samples, "base_rss_mib"),
                        peak_gpu_mib=_median(samples, "peak_gpu_mib"), gbps=_median(samples, "gbps"))
            medians[c.name] = info["median_s"]
        entry["contenders"][c.name] = info
    if case.gbps_goal is not None:
        who, goal = case.gbps_goal
        got = entry["contenders"].get(who, {}).get("gbps")
        entry["ratios"].append({"ratio": f"{who} GB/s (median)", "value": got, "goal": f">= {goal:g}",
                                "met": None if got is None else got >= goal})
    for r in case.ratios:
        if r.num in medians and r.den in medians and medians[r.den] > 0:
            value = medians[r.num] / medians[r.den]
            row = {"ratio": r.label, "value": value, "goal": r.goal_text, "met": r.met(value)}
            # The two contenders of one round ran back to back: the median of per-round ratios
            # is less swayed by a shared machine's load drifting between rounds. Not the verdict.
            num, den = outcome.samples[r.num], outcome.samples[r.den]
            if len(num) == len(den) and len(num) > 1:
                row["paired_median"] = statistics.median([a["seconds"] / b["seconds"] for a, b in zip(num, den, strict=True)])
            entry["ratios"].append(row)
        else:
            entry["ratios"].append({"ratio": r.label, "value": None, "goal": r.goal_text, "met": None})
    if case.name == "import" and "import_checks" in entry:
        pulled = entry["import_checks"].get("hfbuilder", {}).get("imported")
        met = pulled is not None and not {"torch", "transformers", "deepspeed"} & set(pulled)
        entry["ratios"].append({"ratio": "modules `import hfbuilder` pulls in", "value": pulled,
                                "goal": "none of torch, transformers, deepspeed", "met": met})
    return entry


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"Run {meta['date']} on {meta['device']}; {meta['reps_note']}.", "",
             "| case | shape | device | contender | median s | min–max s | peak RSS MiB | peak GPU MiB | n | GB/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, case in results["cases"].items():
        if "skipped" in case:
            lines.append(f"| {name} | {case['shape']} | {case['device']} | skipped: {case['skipped']} | | | | | |")
            continue
        for cname, c in case["contenders"].items():
            if c.get("median_s") is None:
                why = "skipped: " + c["skipped"] if "skipped" in c else "error"
                lines.append(f"| {name} | {case['shape']} | {case['device']} | {cname} | {why} | | | | 0 | |")
                continue
            lines.append(f"| {name} | {case['shape']} | {case['device']} | {cname} | {c['median_s']:.3f} | "
                         f"{c['min_s']:.3f}–{c['max_s']:.3f} | {_fmt(c['peak_rss_mib'], '.0f')} | "
                         f"{_fmt(c['peak_gpu_mib'], '.0f')} | {c['n']} | {_fmt(c.get('gbps'), '.2f')} |")
    lines += ["", "| case | ratio (of medians) | value | median of per-round ratios | goal | met |",
              "|---|---|---:|---:|---|---|"]
    for name, case in results["cases"].items():
        for r in case.get("ratios", []):
            v = r["value"]
            shown = f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else f"`{v}`")
            met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
            lines.append(f"| {name} | {r['ratio']} | {shown} | {_fmt(r.get('paired_median'))} | {r['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="cpu", choices=sorted(SETS), help="which cases to run (default: cpu)")
    p.add_argument("--cases", help="comma-separated case names, instead of --set")
    p.add_argument("--tiny", action="store_true", help="tiny shape, 1 round, no warm-up: a smoke test in seconds")
    p.add_argument("--reps", type=int, help="timed rounds per case (default: the case's own)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1; 0 with --tiny)")
    p.add_argument("--device", default=None, help="device of the GPU cases (default cuda; cpu with --tiny)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hfbuilder-bench",
                   help="where the random checkpoints are made and kept")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out", help="where results-*.json/.md go")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    p.add_argument("--make", metavar="SHAPE", help=argparse.SUPPRESS)
    p.add_argument("--contenders", help="comma-separated contender names: run only these (every case)")
    p.add_argument("--shape", choices=sorted({*SHAPES, *_load.LLAMA_SHAPES}),
                   help="run every case at this shape instead of its own")
    args = p.parse_args(argv)

    if args.make:
        if args.make in _load.LLAMA_SHAPES:
            ck = _load.make_llama_checkpoints(args.make, args.workdir)
        else:
            ck = make_checkpoints(args.make, args.workdir)
        print(RESULT_TAG + json.dumps({"root": str(ck.root)}))
        return 0
    if args.worker:
        result = worker(args.worker[0], args.worker[1], args.workdir, args.device or "cpu", args.shape)
        print(RESULT_TAG + json.dumps(result))
        return 0

    if args.device is None:
        args.device = "cpu" if args.tiny else "cuda"
    names = tuple(n.strip() for n in args.cases.split(",")) if args.cases else SETS[args.set]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    label = args.cases.replace(",", "-") if args.cases else args.set
    label += "-tiny" if args.tiny else ""
    args.made = set()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {"meta": {}, "cases": {}}
    started = time.perf_counter()
    json_path, md_path = args.out / f"results-{label}.json", args.out / f"results-{label}.md"
    seen: dict[str, Any] = {"device": None, "versions": {}}

    def write() -> None:  # after every case, so a run cut short keeps what it measured
        ran = [n for n in results["cases"] if "skipped" not in results["cases"][n]]
        reps_note = ", ".join(
            f"{n}: {max((c['n'] for c in results['cases'][n]['contenders'].values()), default=0)} rounds" for n in ran)
        results["meta"] = {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": seen["device"] or f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
            "host": platform.node(), "python": platform.python_version(), "versions": seen["versions"],
            "set": label, "reps_note": reps_note or "nothing run", "wall_s": round(time.perf_counter() - started, 1),
            "warmup_rounds": args.warmup if args.warmup is not None else (0 if args.tiny else 1),
        }
        json_path.write_text(json.dumps(results, indent=2))
        md_path.write_text(markdown(results))

    for name in names:
        case = CASES[name]
        if args.contenders:
            keep = {c.strip() for c in args.contenders.split(",")}
            case = Case(**{**case.__dict__, "contenders": tuple(c for c in case.contenders if c.name in keep)})
        log(f"== {name}: {case.title}")
        outcome = run_case(case, args, log)
        if outcome.skipped:
            log(f"  skipped: {outcome.skipped}")
        results["cases"][name] = summarize(case, outcome, args)
        for samples in outcome.samples.values():
            for sample in samples:
                seen["device"] = seen["device"] or sample.get("gpu_name")
                seen["versions"] = seen["versions"] or sample.get("versions", {})
        write()
    log("")
    log(markdown(results))
    log(f"wrote {json_path} and {md_path} in {results['meta']['wall_s']} s")
    for name, case in results["cases"].items():
        for r in case.get("ratios", []):
            if isinstance(r["value"], float):
                if r["met"] is None:
                    log(f"{name}: {r['ratio']} = {r['value']:.3f} {r['goal']}")
                else:
                    log(f"{name}: {r['ratio']} = {r['value']:.3f} (goal {r['goal']}: {'met' if r['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
