#!/usr/bin/env python
"""Where hfbuilder's plain build to the GPU spends the time the raw read does not.

``run.py --set load`` gives the ratios; this script says where the difference goes, in one
process (after a warm-up build, page cache warm):

1. rounds of the raw instanttensor read and of hfbuilder's build, alternating, each ended by a
   CUDA synchronize; hfbuilder's per-stage seconds, the load stage's steps (``load_phases``)
   and the checks after the last stage (``verify``);
2. the same build with a synchronize after each of the load stage's steps, so that work a step
   queued on the GPU is counted in that step and not in the next one that waits for the device;
3. one build under ``cProfile`` (the Python side) and one under ``torch.profiler`` (CUDA kernels
   and copies), their top rows.

``--fresh`` measures instead what a training script's first build pays: each sample is the first
build in a fresh process (imports and CUDA initialized before the clock, as ``run.py`` does), for
the raw read and for the variants named by ``--variants``: ``default``; ``written``
(``check_finite="written"``: no finite sums of the read tensors); ``noprewarm`` (the sums'
reduction kernel not launched when the read starts: its code loads at the first sum, in the
drain); ``bgwarm`` (launched from a thread started before instanttensor opens the files);
``cprofile`` (``default`` under cProfile: its top rows).

``--tiny`` runs it on the CPU with a tiny Llama in seconds (no instanttensor, no CUDA rows):
the script's own smoke test.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import importlib.util
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(ck: Any, device: str, tok: Any) -> tuple[Any, Any, float]:
    start = time.perf_counter()
    model, report = _load.c_hfbuilder(ck, device, tok)
    _sync(device)
    return model, report, time.perf_counter() - start


def raw(ck: Any, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    start = time.perf_counter()
    tensors, _ = _load.c_instanttensor(ck, device, None)
    _sync(device)
    seconds = time.perf_counter() - start
    del tensors
    return seconds


def describe(report: Any, seconds: float) -> str:
    stages = " ".join(f"{r.name}={r.seconds:.4f}" for r in report.stages if r.seconds >= 0.0005)
    load = next((r for r in report.stages if r.name == "load"), None)
    phases = (load.facts.get("load_phases") if load else None) or {}
    steps = " ".join(f"[{k}]={v:.4f}" for k, v in phases.items())
    outside = seconds - report.total_seconds
    return (f"{seconds:.4f} s: {stages} verify={report.verify_seconds:.4f} outside-report={outside:.4f}\n"
            f"      load steps: {steps}")


def synced_steps(device: str) -> Any:
    """Make the load stage's step clock synchronize the device before each lap (restored by the caller)."""
    from hfbuilder import pretrained

    original = pretrained._Clock.lap

    def lap(self: Any, name: str) -> None:
        _sync(device)
        original(self, name)

    pretrained._Clock.lap = lap
    return original


VARIANTS = ("raw", "default", "written", "noprewarm", "bgwarm", "cprofile")
TAG = "@@profile "


def patch_prewarm(variant: str) -> None:
    """Variants ``noprewarm`` (the reduction's code loads at the first sum, in the drain) and ``bgwarm``
    (it loads in a thread started just before instanttensor opens the files, in case the open
    releases the GIL)."""
    import threading

    from hfbuilder import loaders
    from hfbuilder.weights import FiniteSums

    warm_now = FiniteSums.prewarm
    FiniteSums.prewarm = staticmethod(lambda *args, **kwargs: None)
    if variant != "bgwarm":
        return
    original = loaders.InstantRead.__init__

    def init(self: Any, files: Any, device: Any, *args: Any, **kwargs: Any) -> None:
        thread = threading.Thread(target=warm_now, args=(device if ":" in str(device) else "cuda:0",))
        thread.start()
        original(self, files, device, *args, **kwargs)
        thread.join()

    loaders.InstantRead.__init__ = init


def one(variant: str, ck: Any, device: str, tok: Any) -> dict[str, Any]:
    """The first build (or raw read) in this process."""
    if variant == "raw":
        seconds = raw(ck, device)
        return {"seconds": seconds}
    if variant in ("noprewarm", "bgwarm"):
        patch_prewarm(variant)
    builder = _load._builder(ck.sft, tok).on_device(device)
    if variant == "written":
        builder = builder.with_options(check_finite="written")
    prof = cProfile.Profile() if variant == "cprofile" else None
    start = time.perf_counter()
    if prof is not None:
        prof.enable()
    model, report = builder.build_with_report()
    _sync(device)
    seconds = time.perf_counter() - start
    top = ""
    if prof is not None:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
        top = out.getvalue()
    load = next(r for r in report.stages if r.name == "load")
    return {"top": top, "seconds": seconds, "outside": seconds - report.total_seconds, "verify": report.verify_seconds,
            "stages": {r.name: round(r.seconds, 4) for r in report.stages if r.seconds >= 0.0005},
            "phases": load.facts.get("load_phases")}


def warm(ck: Any) -> None:
    """Read every shard once: the page cache holds them for every build after."""
    for file in ck.files("sft"):
        with open(file, "rb") as fh:
            while fh.read(1 << 26):
                pass


def fresh(args: argparse.Namespace, device: str) -> int:
    """Each variant's first build in a fresh process, the variants taking turns."""
    samples: dict[str, list[float]] = {v: [] for v in args.variants}
    for i in range(args.rounds):
        order = args.variants[i % len(args.variants):] + args.variants[: i % len(args.variants)]
        for variant in order:
            cmd = [sys.executable, __file__, "--one", variant, "--device", device, "--workdir", str(args.workdir)]
            cmd += ["--tiny"] if args.tiny else []
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            line = next((x for x in done.stdout.splitlines() if x.startswith(TAG)), None)
            if line is None:
                print(f"{variant}: failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}", flush=True)
                continue
            result = json.loads(line[len(TAG):])
            top = result.pop("top", "")
            if top and i == 0:
                print(top, flush=True)
            if variant == "cprofile":
                result["seconds"] = None  # profiled: not a timing
            if result.get("seconds") is not None:
                samples[variant].append(result["seconds"])
            print(f"round {i} {variant}: {json.dumps(result)}", flush=True)
    for variant, values in samples.items():
        if values:
            values.sort()
            print(f"{variant}: median {values[len(values) // 2]:.4f} s, min {values[0]:.4f}, max {values[-1]:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: the script's smoke run")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/hfbuilder-bench"))
    p.add_argument("--fresh", action="store_true", help="first builds in fresh processes (see above)")
    p.add_argument("--variants", type=lambda text: tuple(text.split(",")), default=VARIANTS)
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    shape = "llama-tiny" if args.tiny else "llama3-8b"
    if args.fresh:
        warm(_load.make_llama_checkpoints(shape, args.workdir))
        return fresh(args, device)

    import torch
    import transformers
    from transformers import AutoTokenizer

    from hfbuilder.manager import DEFAULT_PLUGINS

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ck = _load.make_llama_checkpoints(shape, args.workdir)
    if not args.one:
        warm(ck)
    for name in DEFAULT_PLUGINS:
        __import__(name)
    tok = AutoTokenizer.from_pretrained(ck.sft)
    if device.startswith("cuda"):
        torch.empty(1, device=device)
        torch.cuda.synchronize()
    if args.one:
        if importlib.util.find_spec("instanttensor") is not None:
            importlib.import_module("instanttensor")
        importlib.import_module("transformers.models.llama.modeling_llama")
        gc.collect()
        print(TAG + json.dumps(one(args.one, ck, device, tok)), flush=True)
        return 0
    print(f"{shape} on {device}: torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    model, report, seconds = build(ck, device, tok)  # warm-up: first-call costs of every library
    del model
    print("warm-up build:", describe(report, seconds), flush=True)
    for i in range(args.rounds):
        gc.collect()
        r = raw(ck, device)
        gc.collect()
        model, report, seconds = build(ck, device, tok)
        del model
        ratio = f"  hfbuilder/raw {seconds / r:.3f}" if r else ""
        print(f"round {i}: raw {r if r is None else round(r, 4)}  hfbuilder {describe(report, seconds)}{ratio}", flush=True)

    original = synced_steps(device)
    try:
        gc.collect()
        model, report, seconds = build(ck, device, tok)
        del model
        print("synchronized steps:", describe(report, seconds), flush=True)
    finally:
        from hfbuilder import pretrained

        pretrained._Clock.lap = original

    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    model, report, seconds = build(ck, device, tok)
    prof.disable()
    del model
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
    print("cProfile,", describe(report, seconds))
    print(out.getvalue())

    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
            model, report, seconds = build(ck, device, tok)
        del model
        print("torch.profiler,", describe(report, seconds))
        print(tprof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        print(tprof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
