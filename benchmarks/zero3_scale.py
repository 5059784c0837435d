#!/usr/bin/env python
"""ZeRO-3 at scale: what each rank holds and reads while it builds, at world size 1, 2, 4, 8 or any N.

    python benchmarks/zero3_scale.py                                    # CPU ranks (gloo), N = 1, 2, 4, 8
    python benchmarks/zero3_scale.py --device cuda --world-sizes 2,4,8  # one GPU per rank (NCCL)
    python benchmarks/zero3_scale.py --tiny                             # the same machinery in seconds

The script launches its own ranks (:func:`hfbuilder.testing.launch_ranks`), each contender in
fresh processes (``--one-launch`` runs every contender of a world size in the same ones, as
``--tiny`` does). Shapes come from :mod:`hfbuilder.testing.shapes` (``--layers`` scales the
layer count); the random fp16 checkpoints from ``_common.make_checkpoints``: a causal LM in
``model.safetensors`` and a DeepSpeed-Chat step-2 reward model in ``pytorch_model.bin`` and
``model.safetensors``.

Contenders, all ZeRO-3 in bf16 (``CONTENDERS``): DeepSpeed-Chat's algorithm
(:mod:`hfbuilder.testing.dschat`) for the actor and, with ``--contenders``, the critic;
hfbuilder's actor (``with_zero3``) and critic (``for_phase("critic").with_zero3``) from the
``.bin`` and from safetensors; and the same with the checkpoint read on rank 0 only, when the
installed hfbuilder has that option (otherwise the rows say it is missing).

Per rank and build (``_probes``): the build time (to a barrier: the slowest rank's), the peak
RSS, private memory (USS) above the start, and the bytes read from the checkpoint files,
counted where they are handed out. The goals, for hfbuilder's contenders:

* private memory: worst rank's USS above start <= its partition bytes + the largest tensor + 512 MiB;
* bytes read: worst rank <= 1.1 x checkpoint size / N + headers (rank-0 reading: the others <= headers).

It prints a markdown table with the ratios (measured / goal, <= 1 meets it), and writes every
figure to ``--out`` (JSON) and the table beside it (``.md``). It asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing hfbuilder
    sys.path.insert(1, str(REPO_ROOT))

from _common import Checkpoints, checkpoint_name, make_checkpoints  # noqa: E402
from _probes import MIB  # noqa: E402

from hfbuilder.testing import SHAPES, end_rank, launch_ranks  # noqa: E402

SLACK_MIB = 512
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
DS_ITEMSIZE = 2  # bf16

#: name -> (model, checkpoint directory, who reads: "all" ranks or "rank0", hfbuilder's?, label)
CONTENDERS: dict[str, tuple[str, str, str, bool, str]] = {
    "dschat": ("actor", "sft", "all", False, "DeepSpeed-Chat actor (create_hf_model)"),
    "dschat-critic": ("critic", "critic_bin", "all", False, "DeepSpeed-Chat critic (create_critic_model), .bin"),
    "actor": ("actor", "sft", "all", True, "hfbuilder actor"),
    "critic-bin": ("critic", "critic_bin", "all", True, "hfbuilder critic, step-2 .bin"),
    "critic-st": ("critic", "critic_st", "all", True, "hfbuilder critic, step-2 safetensors"),
    "actor-rank0": ("actor", "sft", "rank0", True, "hfbuilder actor, rank 0 reads"),
    "critic-st-rank0": ("critic", "critic_st", "rank0", True, "hfbuilder critic, safetensors, rank 0 reads"),
}
DEFAULT_CONTENDERS = ("dschat", "actor", "critic-bin", "critic-st", "actor-rank0", "critic-st-rank0")
WEIGHTS = {"sft": "model.safetensors", "critic_bin": "pytorch_model.bin", "critic_st": "model.safetensors"}


def with_read(builder: Any, cfg: dict, read: str) -> Any:
    """``builder.with_zero3(cfg)`` with the checkpoint read by every rank or by rank 0 only.

    Raises ``NotImplementedError`` naming what is missing when this hfbuilder cannot read on rank 0.
    """
    import inspect

    if read == "all":
        return builder.with_zero3(cfg)
    if "read" in inspect.signature(builder.with_zero3).parameters:
        return builder.with_zero3(cfg, read=read)
    if hasattr(builder, "configure"):
        from hfbuilder.errors import BuilderInputError

        try:
            return builder.with_zero3(cfg).configure("zero", read=read)
        except BuilderInputError as exc:
            raise NotImplementedError(f"configure('zero', read={read!r}) is refused: {exc}") from exc
    raise NotImplementedError("this hfbuilder has no rank-0 read option: neither with_zero3(read=...) "
                              "nor configure('zero', read=...)")  # fmt: skip


def rank0_unsupported() -> str | None:
    """Why the rank-0 contenders cannot run with the installed hfbuilder, or None when they can."""
    import inspect

    from hfbuilder import ModelBuilder

    if "read" not in inspect.signature(ModelBuilder.with_zero3).parameters and not hasattr(ModelBuilder, "configure"):
        return "this hfbuilder has no rank-0 read option: neither with_zero3(read=...) nor configure('zero', read=...)"
    from transformers import AutoModelForCausalLM

    from hfbuilder.testing import make_tokenizer

    try:  # builders check their inputs when built, not here: a path is not read
        with_read(ModelBuilder(AutoModelForCausalLM, "unused", make_tokenizer(1)), DS_CONFIG, "rank0")
    except NotImplementedError as exc:
        return str(exc)
    return None


# -- one rank --------------------------------------------------------------------------------------


def build(contender: str, ck: Checkpoints, tok: Any) -> tuple[Any, Any]:
    """The contender's model (and hfbuilder's build report)."""
    import copy

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hfbuilder import ModelBuilder
    from hfbuilder.testing import dschat

    model, where, read, _, _ = CONTENDERS[contender]
    path = getattr(ck, where)
    cfg = copy.deepcopy(DS_CONFIG)
    npb = 1 if AutoConfig.from_pretrained(path).model_type == "opt" else 0  # DeepSpeed-Chat's convention
    if contender == "dschat":
        return dschat.create_hf_model(AutoModelForCausalLM, str(path), tok, cfg), None
    if contender == "dschat-critic":
        return dschat.create_critic_model(str(path), tok, cfg, npb, rlhf_training=True, zero_stage=3), None
    if model == "actor":
        builder = ModelBuilder(AutoModelForCausalLM, path, tok)
    else:
        builder = ModelBuilder(AutoModel, path, tok).for_phase("critic", num_padding_at_beginning=npb)
    return with_read(builder, cfg, read).build_with_report()


def check_values(model: Any, ck: Checkpoints, contender: str, layers: int) -> str:
    """After the clock: the last layer's first MLP matrix, gathered, equals the checkpoint's (collective)."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    critic = CONTENDERS[contender][0] == "critic"
    names = [f"decoder.layers.{layers - 1}.fc1.weight", f"layers.{layers - 1}.mlp.gate_proj.weight"]
    params = dict(model.named_parameters())
    name = next(n for n in params if any(n.endswith(x) for x in names))
    key = name if critic else "model." + name.split("model.", 1)[-1]
    with deepspeed.zero.GatheredParameters([params[name]]):
        if dist.get_rank() != 0:
            return "checked on rank 0"
        got = params[name].data.detach().cpu()
        with safe_open(str((ck.critic_st if critic else ck.sft) / "model.safetensors"), framework="pt") as fh:
            want = fh.get_tensor(key)
        if not got.equal(want.to(got.dtype).reshape(got.shape)):
            return f"MISMATCH: {name} differs from the checkpoint's {key}"
    return f"{name} equals the checkpoint"


def release_freed_memory() -> None:
    """Give freed heap memory back to the system before the next job of the same process.

    glibc keeps freed chunks for reuse; the next job would fill them without its private
    memory growing, and look smaller than it is in a fresh process.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def run_rank(args: argparse.Namespace) -> None:
    from _probes import ReadCounter, Sampler

    counter = ReadCounter().install()  # before transformers binds safe_open
    import gc

    import deepspeed
    import torch.distributed as dist
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before any clock, for everyone)
    import transformers.models.opt.modeling_opt  # noqa: F401
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoTokenizer

    import hfbuilder.plugins  # noqa: F401
    import hfbuilder.plugins.reward_model  # noqa: F401

    transformers.utils.logging.set_verbosity_error()
    acc = get_accelerator()
    cuda = args.device == "cuda"
    acc.set_device(int(os.environ["LOCAL_RANK"]))  # a no-op on the CPU
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    record: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size(), "jobs": {}}
    out = Path(f"{args.rank_out}-{rank}.json")
    for job in args.jobs.split(","):
        root, contender = job.rsplit(":", 1)
        ck = Checkpoints(Path(root))
        tok = AutoTokenizer.from_pretrained(ck.sft)
        layers = json.loads((ck.root / "spec.json").read_text())["num_hidden_layers"]
        entry: dict[str, Any] = {"contender": contender, "checkpoints": root}
        weights = getattr(ck, CONTENDERS[contender][1]) / WEIGHTS[CONTENDERS[contender][1]]
        gc.collect()
        dist.barrier()
        if cuda:
            acc.synchronize()
            acc.reset_peak_memory_stats()
        counted0 = counter.bytes
        sampler = Sampler(mapped={os.path.realpath(weights)} if weights.suffix == ".bin" else None).start()
        start = time.perf_counter()
        model = report = None
        try:
            model, report = build(contender, ck, tok)
        except Exception as exc:  # recorded; the ranks stay in step at the barrier below
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        entry["own_seconds"] = time.perf_counter() - start
        acc.synchronize()
        dist.barrier()
        entry["seconds"] = time.perf_counter() - start
        entry.update(sampler.stop())
        entry["safetensors_bytes"] = counter.bytes - counted0
        entry["bytes_read"] = entry["safetensors_bytes"] + entry["mapped_peak_bytes"] + entry["rchar"]
        if cuda:
            entry["gpu_peak_mib"] = acc.max_memory_allocated() / MIB
        if report is not None:  # the build's own count, where the stages record one
            counted = [getattr(r, "bytes_read", None) for r in report.stages]
            if any(c is not None for c in counted):
                entry["reported_bytes_read"] = sum(c or 0 for c in counted)
            entry["stages"] = {r.name: round(r.seconds, 3) for r in report.stages}
        if model is not None:  # no list of the parameters outlives this: the next job must start without them
            entry["unpartitioned"] = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")][:20]
            entry["numel"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
            try:
                entry["check"] = check_values(model, ck, contender, layers)
            except Exception as exc:
                entry["check"] = f"ERROR {type(exc).__name__}: {exc}"[:500]
        record["jobs"][job] = entry
        out.write_text(json.dumps(record))
        del model, report
        release_freed_memory()
    end_rank()


# -- the parent ------------------------------------------------------------------------------------


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The header's length in bytes (with its 8-byte size) and its tensor entries."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return n + 8, header


def checkpoint_facts(ck: Checkpoints) -> dict[str, Any]:
    """Per model and file: sizes, header bytes, the largest tensor, each tensor's element count."""
    facts: dict[str, Any] = {}
    for model, where in (("actor", "sft"), ("critic", "critic_st")):
        path = getattr(ck, where) / "model.safetensors"
        header_bytes, header = safetensors_header(path)
        numels = [math.prod(t["shape"]) for t in header.values()]
        sizes = [t["data_offsets"][1] - t["data_offsets"][0] for t in header.values()]
        facts[model] = {"tensors": len(numels), "numels": numels, "largest_bytes": max(sizes),
                        "tensor_bytes": sum(sizes)}  # fmt: skip
    for where, name in WEIGHTS.items():
        size = (getattr(ck, where) / name).stat().st_size
        model = "actor" if where == "sft" else "critic"
        facts[where] = {"file_bytes": size, "header_bytes": size - facts[model]["tensor_bytes"]}
    return facts


def goals(facts: dict[str, Any], contender: str, world_size: int) -> dict[str, float]:
    model, where, read, _, _ = CONTENDERS[contender]
    m, f = facts[model], facts[where]
    partition = sum(-(-n // world_size) for n in m["numels"]) * DS_ITEMSIZE  # DeepSpeed pads each tensor
    out = {"partition_mib": partition / MIB, "largest_mib": m["largest_bytes"] / MIB,
           "private_goal_mib": (partition + m["largest_bytes"]) / MIB + SLACK_MIB,
           "checkpoint_mib": f["file_bytes"] / MIB, "headers_mib": f["header_bytes"] / MIB}  # fmt: skip
    share = f["file_bytes"] if read == "rank0" else f["file_bytes"] / world_size
    out["read_goal_mib"] = (1.1 * share + f["header_bytes"]) / MIB
    if read == "rank0":
        out["read_goal_others_mib"] = f["header_bytes"] / MIB
    return out


def summarize(ranks: list[dict[str, Any]], goal: dict[str, float], read: str) -> dict[str, Any]:
    def worst(key: str, scale: float = 1.0) -> float | None:
        xs = [r[key] / scale for r in ranks if r.get(key) is not None]
        return max(xs) if xs else None

    s: dict[str, Any] = {
        "seconds": worst("seconds"), "rss_peak_above_start_mib": worst("rss_peak_above_start_mib"),
        "private_peak_above_start_mib": worst("private_peak_above_start_mib"),
        "uss_end_above_start_mib": worst("uss_end_above_start_mib"), "read_mib": worst("bytes_read", MIB),
        "read_mib_per_rank": [r["bytes_read"] / MIB for r in ranks], "gpu_peak_mib": worst("gpu_peak_mib"),
        "errors": sorted({r["error"] for r in ranks if r.get("error")}),
        "unpartitioned": sorted({n for r in ranks for n in r.get("unpartitioned", [])}),
        "check": ranks[0].get("check"), **goal,
    }  # fmt: skip
    if s["private_peak_above_start_mib"] is not None:
        s["private_ratio"] = s["private_peak_above_start_mib"] / goal["private_goal_mib"]
    s["read_ratio"] = s["read_mib"] / goal["read_goal_mib"]
    if read == "rank0" and len(ranks) > 1:
        s["read_others_mib"] = max(r["bytes_read"] for r in ranks[1:]) / MIB
    return s


def _f(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, Any]) -> str:
    lines = ["| shape | N | contender | build s | peak RSS above start, MiB | private (USS) above start, MiB "
             "| goal MiB | ratio | read per rank, MiB | goal MiB | ratio |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    shapes, names = list(results["shapes"]), list(CONTENDERS)
    for run in sorted(results["runs"], key=lambda r: (shapes.index(r["shape"]), r["world_size"], names.index(r["contender"]))):
        head = f"| {run['shape']} | {run['world_size']} | {CONTENDERS[run['contender']][4]} |"
        if run["status"] != "ok":
            lines.append(f"{head} {run['status']}: {run['reason'][:150].replace('|', '/')} | | | | | | | |")
            continue
        s = run["summary"]
        wrong = s["check"] is None or not s["check"].endswith(("equals the checkpoint", "checked on rank 0"))
        bad = "; ".join(s["errors"])[:120] or (f"check: {s['check']}" if wrong else "")
        mark = lambda r: "-" if r is None else (f"**{r:.2f}**" if r > 1 else f"{r:.2f}")  # noqa: E731
        lines.append(f"{head} {_f(s['seconds'], '.2f')} | {_f(s['rss_peak_above_start_mib'])} "
                     f"| {_f(s['private_peak_above_start_mib'])} | {_f(s['private_goal_mib'])} | {mark(s.get('private_ratio'))} "
                     f"| {_f(s['read_mib'])} | {_f(s['read_goal_mib'])} | {mark(s['read_ratio'])} |"
                     + (f" {bad.replace('|', '/')}" if bad else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


def meta(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                            check=False).stdout.strip()  # fmt: skip
    with open("/proc/meminfo") as fh:
        mem = {k: int(v.split()[0]) // 1024 for k, v in (line.split(":") for line in fh)}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
        "cpus": os.cpu_count(), "mem_total_mib": mem["MemTotal"], "device": args.device, "python": platform.python_version(),
        "torch": version("torch"), "transformers": version("transformers"), "deepspeed": version("deepspeed"),
        "commit": commit, "ds_config": DS_CONFIG, "layers": args.layers, "one_launch": args.one_launch,
    }  # fmt: skip


def mem_available_mib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def too_big(contender: str, shape: str, n: int, results: dict[str, Any], fraction: float) -> str | None:
    """DeepSpeed-Chat's ranks each hold the whole model whatever N is: skip an N that cannot fit.

    The need per rank is the largest growth measured at a smaller N plus what a rank holds
    before any build (its imports: the smallest start seen).
    """
    if CONTENDERS[contender][3]:
        return None
    ok = [run for run in results["runs"] if run["status"] == "ok"]
    grew = [r["rss_peak_above_start_mib"] for run in ok if run["shape"] == shape and run["contender"] == contender
            for r in run["ranks"]]  # fmt: skip
    if not grew:
        return None
    per_rank = max(grew) + min(r["rss_start_mib"] for run in ok for r in run["ranks"])
    need, have = n * per_rank, mem_available_mib()
    if need <= fraction * have:
        return None
    return (f"{n} ranks x {per_rank:.0f} MiB (imports + its largest growth at a smaller N) > {fraction:.0%} of the "
            f"{have} MiB available")


def launch(jobs: list[str], n: int, args: argparse.Namespace, label: str) -> tuple[dict[str, list[dict]], str]:
    """Run ``jobs`` on ``n`` fresh ranks: the jobs every rank finished (job -> each rank's entry),
    and, when the launch failed, why (a failed launch keeps the jobs its ranks finished before)."""
    logs = Path(args.workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefix = logs / label
    for stale in logs.glob(f"{label}-*.json"):
        stale.unlink()
    threads = args.threads or max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, os.path.abspath(__file__), "--rank", "--jobs", ",".join(jobs), "--rank-out", str(prefix),
           "--device", args.device]  # fmt: skip
    result = launch_ranks(cmd, n, args.device, threads, args.timeout, log_dir=logs, name=label, cwd=REPO_ROOT)
    records = []
    for r in range(n):
        path = Path(f"{prefix}-{r}.json")
        records.append(json.loads(path.read_text())["jobs"] if path.is_file() else {})
    done = {job: [rec[job] for rec in records] for job in jobs if all(job in rec for rec in records)}
    return done, "" if result.ok else result.report(tail=1500)


def parse_layers(text: str | None, shapes: list[str]) -> dict[str, int | None]:
    """``--layers``: one count for every shape (``12``), or per shape (``opt-1.3b=12,llama3-scaled=2``)."""
    if not text:
        return dict.fromkeys(shapes)
    if "=" not in text:
        return dict.fromkeys(shapes, int(text))
    given = {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    return {s: given.get(s) for s in shapes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", default=None, help="comma-separated N (default 1,2,4,8; 2 with --tiny)")
    ap.add_argument("--shapes", default=None, help="comma-separated shapes (default opt-1.3b,llama3-scaled; tiny ones with --tiny)")
    ap.add_argument("--layers", default=None,
                    help="layer count for every shape (12) or per shape (opt-1.3b=12): fewer is faster")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"comma-separated, of {', '.join(CONTENDERS)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: gloo; cuda: NCCL, one GPU per rank")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per rank (default cores / N)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, N=2, one launch: a smoke run")
    ap.add_argument("--one-launch", action="store_true", help="every contender of an N in the same rank processes")
    ap.add_argument("--workdir", default=None, help="checkpoints (made once) and logs (default: a temp dir)")
    ap.add_argument("--out", default=None, help="results JSON (default WORKDIR/zero3-scale.json); the table beside it as .md")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per launch before its ranks are stopped")
    ap.add_argument("--mem-fraction", type=float, default=0.85,
                    help="skip a DeepSpeed-Chat launch predicted to need more than this share of MemAvailable")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank:
        run_rank(args)
        return 0
    import tempfile

    args.one_launch = args.one_launch or args.tiny
    shapes = (args.shapes or ("tiny,tiny-llama3" if args.tiny else "opt-1.3b,llama3-scaled")).split(",")
    layers = parse_layers(args.layers, shapes)
    sizes = [int(n) for n in (args.world_sizes or ("2" if args.tiny else "1,2,4,8")).split(",")]
    contenders = args.contenders.split(",")
    unknown = [c for c in contenders if c not in CONTENDERS] + [s for s in shapes if s not in SHAPES]
    if unknown or any(n < 1 for n in sizes):
        ap.error(f"unknown contender(s)/shape(s) {unknown} or a world size below 1")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(sizes):
            ap.error(f"--device cuda needs {max(sizes)} GPUs; this host has {torch.cuda.device_count()}")
    args.workdir = args.workdir or os.path.join(tempfile.gettempdir(), "hfbuilder-zero3-scale")
    args.out = Path(args.out or os.path.join(args.workdir, "zero3-scale.json"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))  # DeepSpeed's CPU op, built once

    results: dict[str, Any] = {"meta": meta(args), "shapes": {}, "runs": []}
    started = time.perf_counter()

    def write() -> None:  # after every launch, so a run cut short keeps what it measured
        results["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(table(results))

    no_rank0 = rank0_unsupported() if any(CONTENDERS[c][2] == "rank0" for c in contenders) else None
    made: dict[str, tuple[Checkpoints, dict[str, Any]]] = {}
    for shape in shapes:
        t0 = time.perf_counter()
        ck = make_checkpoints(shape, Path(args.workdir), fill_device="cuda" if args.device == "cuda" else "cpu",
                              layers=layers[shape])  # fmt: skip
        made[shape] = ck, checkpoint_facts(ck)
        spec = json.loads((ck.root / "spec.json").read_text())
        results["shapes"][shape] = {"checkpoints": str(ck.root), "layers": spec["num_hidden_layers"], "spec": spec, **{
            k: {kk: vv for kk, vv in v.items() if kk != "numels"} for k, v in made[shape][1].items()}}  # fmt: skip
        print(f"== {shape}: checkpoints in {ck.root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for n in sizes:  # smallest N first: DeepSpeed-Chat's memory there predicts whether a larger N fits
        pending: list[tuple[str, str]] = []
        for shape in shapes:
            for c in contenders:
                why = no_rank0 if CONTENDERS[c][2] == "rank0" else too_big(c, shape, n, results, args.mem_fraction)
                if why:
                    results["runs"].append({"shape": shape, "world_size": n, "contender": c, "status": "skipped",
                                            "reason": why})  # fmt: skip
                    print(f"  {shape} N={n} {c}: skipped: {why}", flush=True)
                else:
                    pending.append((shape, c))
        # One launch: DeepSpeed-Chat last, so that hfbuilder's builds never start after its gigabytes.
        pending.sort(key=lambda job: not CONTENDERS[job[1]][3])
        groups = [pending] if args.one_launch and pending else [[job] for job in pending]
        for group in groups:
            label = f"n{n}-" + "+".join(f"{checkpoint_name(shape, layers[shape])}-{c}" for shape, c in group)[:80]
            done, failure = launch([f"{made[shape][0].root}:{c}" for shape, c in group], n, args, label)
            if failure:
                print(f"  N={n} launch FAILED:\n{failure}", flush=True)
            for shape, c in group:
                run: dict[str, Any] = {"shape": shape, "world_size": n, "contender": c}
                per_rank = done.get(f"{made[shape][0].root}:{c}")
                if per_rank is None:
                    run.update(status="failed", reason=failure or "a rank wrote no record of it")
                else:
                    goal = goals(made[shape][1], c, n)
                    run.update(status="ok", ranks=per_rank, summary=summarize(per_rank, goal, CONTENDERS[c][2]))
                    s = run["summary"]
                    print(f"  {shape} N={n} {c:<16} {s['seconds']:7.2f} s  private {_f(s['private_peak_above_start_mib'])} "
                          f"MiB (goal {s['private_goal_mib']:.0f})  read {s['read_mib']:.0f} MiB (goal {s['read_goal_mib']:.0f})"
                          f"{'  ' + '; '.join(s['errors'])[:200] if s['errors'] else ''}", flush=True)  # fmt: skip
                results["runs"].append(run)
            write()
    write()
    print("\n" + table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {results['meta']['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
