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

    python benchmarks/zero3_build.py [--repeat 3] [--workdir DIR]

Goal (issue 5): on the worst rank, at most 0.6x DeepSpeed-Chat's peak RSS, in at most 0.5x its time.
This is a benchmark, not a test: it prints the figures and the ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

OPT_350M = dict(
    vocab_size=50265, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
    word_embed_proj_dim=512, max_position_embeddings=2048, do_layer_norm_before=False,
    pad_token_id=0, bos_token_id=2, eos_token_id=3,
)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": True},
}
CONTENDERS = ("dschat", "hfbuilder")
MIB = 1024 * 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(path: str) -> str:
    """Random fp16 weights in OPT-350m's shape, and a 50,265-token tokenizer; made once."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from hfbuilder.testing import make_tokenizer

    os.makedirs(path, exist_ok=True)
    print(f"writing an OPT-350m-shaped fp16 checkpoint to {path} (once)", flush=True)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**OPT_350M, dtype="float16")).half()
    model.save_pretrained(path)
    make_tokenizer(OPT_350M["vocab_size"] - 4, path)
    return path


# -- one rank ------------------------------------------------------------------------------


def build_dschat(path: str, tokenizer) -> object:
    import math

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(path)
    dschf = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841  (DeepSpeed-Chat keeps it alive in a local)
    model = AutoModelForCausalLM.from_pretrained(path, config=model_config)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model


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
    with open(out, "w") as fh:
        json.dump(result, fh)


# -- the driver ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(contender: str, path: str, world_size: int, tmp: str, threads: int | None, timeout: float = 600) -> list[dict]:
    port = free_port()
    procs, outs = [], []
    for rank in range(world_size):
        out = os.path.join(tmp, f"{contender}-{rank}-{port}.json")
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TOKENIZERS_PARALLELISM="false")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, __file__, "--worker", contender, "--checkpoint", path, "--out", out]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{contender}: timed out after {timeout} s") from None
    if any(p.returncode for p in procs):
        for rank, log in enumerate(logs):
            print(f"--- {contender} rank {rank} ---\n{log[-4000:]}", file=sys.stderr)
        raise SystemExit(f"{contender} failed")
    return [json.load(open(o)) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="launches per contender, interleaved (default 3)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hfbuilder-bench-opt350m-fp16"))
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                    help="OMP_NUM_THREADS for every rank of both contenders, as torchrun and `deepspeed "
                    "--bind_cores_to_rank` set it (default: cores / 2); 0 leaves it unset")
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.out)
        return

    path = make_checkpoint(args.workdir)
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
