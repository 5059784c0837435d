"""ZeRO-3 build, world size 2 on CPU: hfbuilder against DeepSpeed-Chat's algorithm, in the same run.

Each contender runs as two processes (gloo, ``DS_ACCELERATOR=cpu``). Every rank reports
the wall time of the build (from the config read to the resized model, ending at a
barrier so the time is the slowest rank's) and its peak RSS above the RSS it had when
the build started (torch, transformers and deepspeed already imported, distributed
already initialized, the modeling module already imported, for both contenders).

Model: OPT-350m's shape with a 50,265-row vocabulary, random fp16 weights in
``model.safetensors``, which the script writes once into ``--workdir``; the tokenizer
has 50,265 tokens, so both contenders resize to 50,272. DeepSpeed config: ZeRO-3, bf16.

DeepSpeed-Chat's algorithm (``dschat/utils/model/model_utils.py::create_hf_model``) is
spelled out with plain transformers calls: ``AutoConfig``, ``HfDeepSpeedConfig``,
``from_pretrained`` under it, the end/pad ids, ``resize_token_embeddings`` to a multiple of 8.

    python benchmarks/zero3_build.py [--repeat 3] [--workdir DIR] [--shape opt-350m|opt-1.3b|tiny]

Goal (issue 5): on the worst rank, at most 0.6x DeepSpeed-Chat's peak RSS, in at most 0.5x its time.
This is a benchmark, not a test: it prints the figures and the ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from _common import (
    SHAPES,
    current_rss_mib,
    dschat_create_hf_model,
    launch_ranks,
    make_checkpoint,
    peak_rss_mib,
)

from hfbuilder.testing import end_rank

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": True},
}
CONTENDERS = ("dschat", "hfbuilder")


# -- one rank ------------------------------------------------------------------------------


def build_dschat(path: str, tokenizer) -> object:
    from transformers import AutoModelForCausalLM

    return dschat_create_hf_model(AutoModelForCausalLM, path, tokenizer, DS_CONFIG)


def build_hfbuilder(path: str, tokenizer) -> object:
    from transformers import AutoModelForCausalLM

    from hfbuilder import ModelBuilder

    return ModelBuilder(AutoModelForCausalLM, path, tokenizer).with_zero3(DS_CONFIG).build()


def worker(contender: str, path: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    import transformers.models.opt.modeling_opt  # noqa: F401  (imported before timing, for both)
    from transformers import AutoTokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(path)
    dist.barrier()
    rss0 = current_rss_mib()
    start = time.perf_counter()
    model = (build_dschat if contender == "dschat" else build_hfbuilder)(path, tokenizer)
    own = time.perf_counter() - start
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    params = list(model.parameters())
    result = {
        "contender": contender,
        "rank": dist.get_rank(),
        "seconds": seconds,
        "own_seconds": own,
        "rss_start_mib": rss0,
        "peak_rss_mib": peak,
        "peak_delta_mib": peak - rss0,
        "unpartitioned": [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")],
        "dtypes": sorted({str(p.dtype) for p in params}),
        "vocab": int(getattr(model.get_input_embeddings().weight, "ds_shape", model.get_input_embeddings().weight.shape)[0]),
    }
    with open(f"{out}-{result['rank']}.json", "w") as fh:
        json.dump(result, fh)


# -- the driver ------------------------------------------------------------------------------


def launch(contender: str, path: str, world_size: int, tmp: str, threads: int | None, timeout: float = 600) -> list[dict]:
    outs = [os.path.join(tmp, f"{contender}-{rank}.json") for rank in range(world_size)]
    cmd = [sys.executable, __file__, "--worker", contender, "--checkpoint", path, "--out", os.path.join(tmp, contender)]
    run = launch_ranks(cmd, world_size, threads=threads, timeout=timeout, log_dir=tmp)
    if not run.ok:
        for rank, log in enumerate(run.logs):
            print(f"--- {contender} rank {rank} (exit {run.returncodes[rank]}) ---\n{log[-4000:]}", file=sys.stderr)
        raise SystemExit(f"{contender} failed" + (" or timed out" if run.killed else ""))
    results = []
    for out in outs:
        with open(out) as fh:
            results.append(json.load(fh))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="launches per contender, interleaved (default 3)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-350m",
                    help="the OPT shape of the random checkpoint (default opt-350m; tiny for a smoke run)")
    ap.add_argument("--workdir", help="where the checkpoint is written once (default: a temp dir per shape)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                    help="OMP_NUM_THREADS for every rank of both contenders, as torchrun and `deepspeed "
                    "--bind_cores_to_rank` set it (default: cores / 2); 0 leaves it unset")
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)  # the worker writes OUT-<rank>.json
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.out)
        end_rank()
        return

    workdir = args.workdir or os.path.join(
        tempfile.gettempdir(), "hfbuilder-bench-opt350m-fp16" if args.shape == "opt-350m" else f"hfbuilder-bench-{args.shape}"
    )
    path = make_checkpoint(workdir, args.shape)
    runs: dict[str, list[list[dict]]] = {c: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for contender in CONTENDERS:
                ranks = launch(contender, path, args.world_size, tmp, args.threads)
                runs[contender].append(ranks)
                summary = ", ".join(
                    f"rank {r['rank']}: +{r['peak_delta_mib']:.0f} MiB" for r in ranks
                )
                print(f"run {i + 1} {contender:<9} {ranks[0]['seconds']:6.2f} s  {summary}", flush=True)

    def worst(contender: str, key: str, rank: int | None = None) -> float:
        return max(r[key] for ranks in runs[contender] for r in ranks if rank is None or r["rank"] == rank)

    def median_time(contender: str) -> float:
        times = sorted(ranks[0]["seconds"] for ranks in runs[contender])
        return times[len(times) // 2]

    print()
    print(f"{'':<10}{'time s (median)':>16}" + "".join(f"{f'rank {r} +MiB':>14}" for r in range(args.world_size)))
    for c in CONTENDERS:
        row = "".join(f"{worst(c, 'peak_delta_mib', r):>14.0f}" for r in range(args.world_size))
        print(f"{c:<10}{median_time(c):>16.2f}{row}")
    time_ratio = median_time("hfbuilder") / median_time("dschat")
    rss_ratios = [worst("hfbuilder", "peak_delta_mib", r) / worst("dschat", "peak_delta_mib", r)
                  for r in range(args.world_size)]
    worst_rss = max(worst("hfbuilder", "peak_delta_mib", r) for r in range(args.world_size))
    worst_rss_ds = max(worst("dschat", "peak_delta_mib", r) for r in range(args.world_size))
    print(f"time ratio hfbuilder/dschat: {time_ratio:.2f} (goal <= 0.5)")
    print("peak RSS ratio per rank: " + ", ".join(f"rank {r}: {x:.2f}" for r, x in enumerate(rss_ratios))
          + f"; worst rank: {worst_rss / worst_rss_ds:.2f} (goal <= 0.6)")
    for c in CONTENDERS:
        left = sorted({n for ranks in runs[c] for r in ranks for n in r["unpartitioned"]})
        dtypes = sorted({d for ranks in runs[c] for r in ranks for d in r["dtypes"]})
        print(f"{c}: unpartitioned parameters {left or 'none'}; dtypes {dtypes}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)


if __name__ == "__main__":
    main()
