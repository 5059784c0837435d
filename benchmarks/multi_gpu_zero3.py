"""Multi-GPU ZeRO-3: an RLHF actor and critic built, initialized and trained at world
size N, hfbuilder against DeepSpeed-Chat's algorithm, in the same run.

    python benchmarks/multi_gpu_zero3.py --device cuda --world-size 2 --shape opt-1.3b --steps 3
    python benchmarks/multi_gpu_zero3.py --device cpu --world-size 2 --shape tiny --steps 2   # CPU smoke run

The script launches its own ranks (no ``deepspeed``/``torchrun`` launcher needed): NCCL on
``cuda`` with ``LOCAL_RANK`` picking the GPU, gloo with ``DS_ACCELERATOR=cpu`` on ``cpu``.

1. It makes, once per ``--workdir``, random fp16 checkpoints of ``--shape`` (a shape of
   :mod:`hfbuilder.testing.shapes`; OPT's have 50,272 rows and a 50,265-token tokenizer, as
   published) with ``benchmarks/_common.make_checkpoints``: the causal LM, and a DeepSpeed-Chat
   step-2 output of a reward model on it (``v_head.weight``, ``rwtransformer.*``) both as
   ``pytorch_model.bin``, which DeepSpeed-Chat's critic reads, and as ``model.safetensors``,
   which hfbuilder's reads.
2. Each contender runs in its own launch of N ranks; with ``--repeat`` the launches alternate.
   Every rank builds the actor and then the critic (the build time ends at a barrier, so it is
   the slowest rank's), checks them, ``deepspeed.initialize``s both (``torch.optim.AdamW``) and
   trains ``--steps`` steps: the LM loss for the actor, the pairwise reward loss for the critic
   (chosen = the ids, rejected = the ids with another tail), different data on every rank.

   - **hfbuilder**: ``ModelBuilder(AutoModelForCausalLM, actor, tok).with_zero3(cfg)`` and
     ``ModelBuilder(AutoModel, critic, tok).for_phase("critic", num_padding_at_beginning=1).with_zero3(cfg)``.
   - **DeepSpeed-Chat**: ``create_hf_model`` and ``create_critic_model(rlhf_training=True,
     zero_stage=3)`` from :mod:`hfbuilder.testing.dschat` (its algorithm in transformers calls):
     ``HfDeepSpeedConfig``, ``from_pretrained`` (actor) or ``from_config`` (critic) under it, the
     end/pad ids, ``resize_token_embeddings`` to a multiple of 8; the critic wrapped in its
     ``RewardModel`` with an fp32 ``v_head`` and the ``.bin`` loaded module by module under
     ``GatheredParameters(..., modifier_rank=0)``.
3. Checks, per contender and model: every parameter partitioned (``ds_id``); the ranks agree on
   every gathered weight after the build and after training (the parent compares the ranks'
   digests); every loss finite. A failure is recorded with its error text and the run goes on.
4. Measures per rank: build time, peak GPU memory (``max_memory_allocated``, on cuda) for each
   build and for training, peak host RSS.
5. Prints markdown tables with hfbuilder/DeepSpeed-Chat ratios; writes every figure to ``--out``
   (JSON) and the tables beside it (``.md``).

Exit status: 0 when hfbuilder's checks pass, 1 when any fails, 2 for bad usage. DeepSpeed-Chat's
failures are recorded, not fatal (its critic is expected to fail in ``deepspeed.initialize``:
an fp32, unpartitioned ``v_head`` beside bf16 partitions).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from _common import Checkpoints, make_checkpoints
from _probes import MIB, current_rss_mib, peak_rss_mib, reset_peak_rss

from hfbuilder.testing import SHAPES, end_rank, launch_ranks

CONTENDERS = ("dschat", "hfbuilder")
LABELS = {"dschat": "DeepSpeed-Chat", "hfbuilder": "hfbuilder"}
MODELS = ("actor", "critic")


def ds_config(micro_batch: int) -> dict[str, Any]:
    """ZeRO-3 in bf16, no offload: DeepSpeed-Chat's step-3 settings on a GPU that has bf16."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
    }


# -- the contenders (in a rank) -------------------------------------------------------------------


def padding_at_beginning(config: Any) -> int:
    return 1 if config.model_type == "opt" else 0  # DeepSpeed-Chat's convention: OPT's tokenizer adds a BOS


def dschat_actor(ck: Checkpoints, tok: Any, cfg: dict) -> Any:
    from transformers import AutoModelForCausalLM

    from hfbuilder.testing import dschat

    return dschat.create_hf_model(AutoModelForCausalLM, str(ck.sft), tok, cfg)


def dschat_critic(ck: Checkpoints, tok: Any, cfg: dict) -> Any:
    """``create_critic_model(..., rlhf_training=True, zero_stage=3)``: every rank reads the step-2 ``.bin`` whole."""
    from transformers import AutoConfig

    from hfbuilder.testing import dschat

    npb = padding_at_beginning(AutoConfig.from_pretrained(ck.critic_bin))
    return dschat.create_critic_model(str(ck.critic_bin), tok, cfg, npb, rlhf_training=True, zero_stage=3)


def hfbuilder_actor(ck: Checkpoints, tok: Any, cfg: dict) -> Any:
    from transformers import AutoModelForCausalLM

    from hfbuilder import ModelBuilder

    return ModelBuilder(AutoModelForCausalLM, ck.sft, tok).with_zero3(cfg).build()


def hfbuilder_critic(ck: Checkpoints, tok: Any, cfg: dict) -> Any:
    """The same step-2 weights as DeepSpeed-Chat's, from ``model.safetensors``."""
    from transformers import AutoConfig, AutoModel

    from hfbuilder import ModelBuilder

    npb = padding_at_beginning(AutoConfig.from_pretrained(ck.critic_st))
    return ModelBuilder(AutoModel, ck.critic_st, tok).for_phase("critic", num_padding_at_beginning=npb).with_zero3(cfg).build()


BUILDERS = {
    "dschat": {"actor": dschat_actor, "critic": dschat_critic},
    "hfbuilder": {"actor": hfbuilder_actor, "critic": hfbuilder_critic},
}


def actor_loss(engine: Any, ids: Any, vocab: int) -> Any:
    return engine(input_ids=ids, labels=ids).loss


def critic_loss(engine: Any, ids: Any, vocab: int) -> Any:
    """DeepSpeed-Chat's pairwise loss: chosen = the ids, rejected = the ids with another second half."""
    import torch

    rejected = ids.clone()
    half = ids.shape[1] // 2
    rejected[:, half:] = (rejected[:, half:] - 4 + 7) % (vocab - 4) + 4  # ids 4..vocab-1: 0-3 are special
    return engine(input_ids=torch.cat([ids, rejected]))["loss"]


LOSSES = {"actor": actor_loss, "critic": critic_loss}


# -- one rank ---------------------------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: {frame.line}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}".replace(":  at", " at")


def digests(model: Any) -> dict[str, str]:
    """A digest of every parameter gathered to full size (dtype, shape and bytes), one at a time."""
    import deepspeed
    import torch

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]), torch.no_grad():
            t = p.data.detach().to("cpu").contiguous()
        h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()[:16]
    return out


def partition_facts(model: Any) -> dict[str, Any]:
    params = list(model.named_parameters())
    return {
        "type": type(model).__name__,
        "n_params": len(params),
        "numel": sum(int(getattr(p, "ds_numel", p.numel())) for _, p in params),
        "unpartitioned": [n for n, p in params if not hasattr(p, "ds_id")],
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for _, p in params}),
    }


class Rank:
    """One rank's record, rewritten after every phase so that a hang or crash keeps what was done."""

    def __init__(self, path: str, contender: str, device: str) -> None:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        self.acc = get_accelerator()
        self.cuda = device == "cuda"
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.acc.set_device(self.local_rank)  # a no-op on the CPU
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.dist = dist
        self.rank = dist.get_rank()
        self.path = f"{path}-{self.rank}.json"
        self.data: dict[str, Any] = {
            "contender": contender, "rank": self.rank, "world_size": dist.get_world_size(),
            "device": self.acc.device_name(self.local_rank) if self.cuda else "cpu",
            "device_name": self._device_name(), "phase": "started", "models": {m: {"errors": {}} for m in MODELS},
        }  # fmt: skip
        self.save()

    def _device_name(self) -> str:
        if self.cuda:
            import torch

            return torch.cuda.get_device_name(self.local_rank)
        return platform.processor() or platform.machine()

    def save(self, phase: str | None = None) -> None:
        if phase:
            self.data["phase"] = phase
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh)
        os.replace(tmp, self.path)

    # Peak GPU memory only on cuda: the CPU accelerator's "memory" is RSS sampled when asked.
    def gpu_reset(self) -> None:
        self.acc.synchronize()
        self.acc.reset_peak_memory_stats()

    def gpu_mib(self, peak: bool) -> float | None:
        if not self.cuda:
            return None
        self.acc.synchronize()
        return (self.acc.max_memory_allocated() if peak else self.acc.memory_allocated()) / MIB

    def reset_rss_peak(self) -> bool:
        """Start a new peak-RSS window, keeping the process's peak so far in ``rss_peak_mib``."""
        self.data["rss_peak_mib"] = max(self.data.get("rss_peak_mib", 0.0), peak_rss_mib())
        return reset_peak_rss()

    def sync(self) -> None:
        self.acc.synchronize()
        self.dist.barrier()


def run_rank(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before timing, for both)
    import transformers.models.opt.modeling_opt  # noqa: F401
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401

    import hfbuilder.plugins  # noqa: F401  (the builder's stage modules, imported before timing)
    import hfbuilder.plugins.reward_model  # noqa: F401
    from hfbuilder.testing import dschat  # noqa: F401

    r = Rank(args.rank_out, args.worker, args.device)
    cfg = ds_config(args.micro_batch)
    ck = Checkpoints(Path(args.checkpoints))
    tok = AutoTokenizer.from_pretrained(ck.sft)
    r.data["rss_start_mib"] = current_rss_mib()
    models: dict[str, Any] = {}

    for name in MODELS:
        entry = r.data["models"][name]
        r.sync()
        r.gpu_reset()
        entry["rss_peak_reset"] = r.reset_rss_peak()
        entry["rss_start_mib"], entry["gpu_start_mib"] = current_rss_mib(), r.gpu_mib(peak=False)
        start = time.perf_counter()
        try:
            models[name] = BUILDERS[args.worker][name](ck, tok, copy.deepcopy(cfg))
        except Exception as exc:
            entry["errors"]["build"] = _error(exc)
        entry["own_seconds"] = time.perf_counter() - start
        r.sync()
        entry["build_seconds"] = time.perf_counter() - start
        entry["rss_build_peak_mib"] = peak_rss_mib()
        entry["rss_peak_above_start_mib"] = entry["rss_build_peak_mib"] - entry["rss_start_mib"]
        entry["gpu_peak_mib"], entry["gpu_after_mib"] = r.gpu_mib(peak=True), r.gpu_mib(peak=False)
        r.save(f"built {name}")

    for name, model in models.items():  # outside the clock
        entry = r.data["models"][name]
        try:
            entry.update(partition_facts(model))
            entry["digests_built"] = digests(model)
        except Exception as exc:
            entry["errors"]["check"] = _error(exc)
        r.save(f"checked {name}")

    engines: dict[str, Any] = {}
    for name, model in models.items():
        entry = r.data["models"][name]
        try:
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
            engines[name], *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(cfg))
        except Exception as exc:
            entry["errors"]["initialize"] = _error(exc)
        r.save(f"initialized {name}")
    models.clear()

    r.gpu_reset()
    r.reset_rss_peak()
    vocab = len(tok)
    for step in range(args.steps):
        for name in list(engines):
            engine, entry = engines[name], r.data["models"][name]
            gen = torch.Generator().manual_seed(1000 * step + r.rank)  # data parallel: other data on every rank
            ids = torch.randint(4, vocab, (args.micro_batch, args.seq_len), generator=gen).to(engine.device)
            start = time.perf_counter()
            try:
                loss = LOSSES[name](engine, ids, vocab)
                engine.backward(loss)
                engine.step()
                entry.setdefault("losses", []).append(float(loss))
            except Exception as exc:
                entry["errors"]["train"] = _error(exc)
                del engines[name]
            r.acc.synchronize()
            entry.setdefault("step_seconds", []).append(time.perf_counter() - start)
        r.save(f"step {step + 1}")
    r.data["gpu_train_peak_mib"] = r.gpu_mib(peak=True)
    r.data["rss_train_peak_mib"] = peak_rss_mib()
    r.reset_rss_peak()

    for name, engine in engines.items():
        entry = r.data["models"][name]
        try:
            entry["digests_trained"] = digests(engine.module)
        except Exception as exc:
            entry["errors"]["check_trained"] = _error(exc)
        engine.destroy()
    r.data["rss_peak_mib"] = max(r.data["rss_peak_mib"], peak_rss_mib())
    r.save("done")


# -- the parent: summary, tables ---------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _max(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _mismatches(ranks: list[dict], key: str) -> list[str] | None:
    """Parameter names whose digests differ between rank 0 and another rank; None if a rank has none."""
    found = [r.get(key) for r in ranks]
    if not found or any(d is None for d in found):
        return None
    names = set().union(*found)
    return sorted(n for n in names if len({d.get(n) for d in found}) > 1)


def summarize(runs: dict[str, list[dict]], world_size: int, steps: int) -> dict[str, Any]:
    """Per contender and model: the checks (over every launch and rank) and the figures."""
    summary: dict[str, Any] = {}
    for contender, launches in runs.items():
        summary[contender] = {}
        for model in MODELS:
            per_launch = [[r["models"][model] if r else {} for r in launch["ranks"]] for launch in launches]
            entries = [e for ranks in per_launch for e in ranks]
            complete = all(launch["ok"] and all(launch["ranks"]) for launch in launches)
            errors: dict[str, str] = {}
            for e in entries:
                for what, text in e.get("errors", {}).items():
                    errors.setdefault(what, text)
            built = [ranks for ranks in per_launch if all("digests_built" in e for e in ranks)]
            trained = [ranks for ranks in per_launch if all("digests_trained" in e for e in ranks)]
            after_build = [_mismatches(ranks, "digests_built") for ranks in built]
            after_train = [_mismatches(ranks, "digests_trained") for ranks in trained]
            losses = [e.get("losses", []) for e in entries]
            # step_seconds: the median step after the first of each rank (the first warms up).
            summary[contender][model] = {
                "complete": complete,
                "errors": errors,
                "built": len(built) == len(launches),
                "partitioned": bool(built) and len(built) == len(launches)
                and all(e.get("unpartitioned") == [] for e in entries),
                "unpartitioned": sorted({n for e in entries for n in e.get("unpartitioned", [])}),
                "dtypes": sorted({d for e in entries for d in e.get("dtypes", [])}),
                "numel": _max([e.get("numel") for e in entries]),
                "ranks_agree_after_build": bool(built) and len(built) == len(launches) and all(m == [] for m in after_build),
                "mismatched_after_build": sorted({n for m in after_build if m for n in m}),
                "ranks_agree_after_training": bool(trained) and len(trained) == len(launches)
                and all(m == [] for m in after_train),
                "mismatched_after_training": sorted({n for m in after_train if m for n in m}),
                "losses": [[e.get("losses", []) for e in ranks] for ranks in per_launch],
                "losses_finite": bool(losses) and all(len(ls) == steps and all(math.isfinite(x) for x in ls) for ls in losses),
                "build_seconds": _median([max(e["build_seconds"] for e in ranks) for ranks in per_launch
                                          if all("build_seconds" in e for e in ranks)]),
                "step_seconds": _median([s for e in entries for s in e.get("step_seconds", [])[1:]]),
                "gpu_peak_mib": [_max([ranks[r].get("gpu_peak_mib") for ranks in per_launch]) for r in range(world_size)],
                "rss_peak_above_start_mib": [
                    _max([ranks[r].get("rss_peak_above_start_mib") for ranks in per_launch]) for r in range(world_size)
                ],
            }  # fmt: skip
        ranks = [r for launch in launches for r in launch["ranks"] if r]
        summary[contender]["gpu_train_peak_mib"] = [
            _max([r.get("gpu_train_peak_mib") for r in ranks if r["rank"] == k]) for k in range(world_size)
        ]
        for key in ("rss_peak_mib", "rss_train_peak_mib"):
            summary[contender][key] = [_max([r.get(key) for r in ranks if r["rank"] == k]) for k in range(world_size)]
        summary[contender]["rss_build_peak_mib"] = [
            _max([e.get("rss_build_peak_mib") for r in ranks if r["rank"] == k for e in r["models"].values()])
            for k in range(world_size)
        ]
    return summary


def passed(s: dict[str, Any]) -> list[str]:
    """What failed among a contender's checks (empty: all passed)."""
    failures = []
    for model in MODELS:
        m = s[model]
        for check in ("complete", "partitioned", "ranks_agree_after_build", "ranks_agree_after_training", "losses_finite"):
            if not m[check]:
                failures.append(f"{model}: {check}")
        failures += [f"{model}: {what}: {text}" for what, text in m["errors"].items()]
    return failures


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.2f}x"


def _names(names: list[str], n: int = 3) -> str:
    """Parameter names, short: the last two components each, at most ``n`` of them."""
    short = [".".join(x.split(".")[-3:-1]) for x in names[:n]]
    return ", ".join(short) + (f" +{len(names) - n}" if len(names) > n else "")


def tables(summary: dict[str, Any], world_size: int) -> str:
    lines = [
        "| contender | model | build s | GPU peak MiB, build (worst rank) | host RSS peak above start MiB (worst rank) "
        "| step s | partitioned | ranks agree (built / trained) | loss, rank 0 (first → last) | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for contender in CONTENDERS:
        if contender not in summary:
            continue
        for model in MODELS:
            m = summary[contender][model]
            loss0 = m["losses"][0][0] if m["losses"] and m["losses"][0] else []
            loss = f"{loss0[0]:.3f} → {loss0[-1]:.3f}" if loss0 else "n/a"
            error = next(iter(f"{k}: {v}" for k, v in m["errors"].items()), "")
            error = error.split("\n")[0][:120] + ("…" if len(error) > 120 else "")
            partitioned = "yes" if m["partitioned"] else (f"no ({_names(m['unpartitioned'])})" if m["built"] else "n/a")
            agree = " / ".join(
                "yes" if ok else (f"no ({_names(bad)})" if bad else "n/a")
                for ok, bad in ((m["ranks_agree_after_build"], m["mismatched_after_build"]),
                                (m["ranks_agree_after_training"], m["mismatched_after_training"])))  # fmt: skip
            lines.append(
                f"| {LABELS[contender]} | {model} | {_fmt(m['build_seconds'], '.2f')} | {_fmt(_max(m['gpu_peak_mib']))} "
                f"| {_fmt(_max(m['rss_peak_above_start_mib']))} | {_fmt(m['step_seconds'], '.3f')} | {partitioned} "
                f"| {agree} | {loss} | {error.replace('|', '/')} |"
            )
    if all(c in summary for c in CONTENDERS):
        for model in MODELS:
            h, d = summary["hfbuilder"][model], summary["dschat"][model]
            lines.append(
                f"| **hfbuilder / DeepSpeed-Chat** | {model} | {_ratio(h['build_seconds'], d['build_seconds'])} "
                f"| {_ratio(_max(h['gpu_peak_mib']), _max(d['gpu_peak_mib']))} "
                f"| {_ratio(_max(h['rss_peak_above_start_mib']), _max(d['rss_peak_above_start_mib']))} "
                f"| {_ratio(h['step_seconds'], d['step_seconds'])} | | | | |"
            )
    lines += ["", "| contender | rank | GPU peak MiB: actor build | critic build | training "
              "| host peak RSS MiB: builds | training | whole run |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for contender in CONTENDERS:
        if contender not in summary:
            continue
        s = summary[contender]
        for k in range(world_size):
            lines.append(
                f"| {LABELS[contender]} | {k} | {_fmt(s['actor']['gpu_peak_mib'][k])} | {_fmt(s['critic']['gpu_peak_mib'][k])} "
                f"| {_fmt(s['gpu_train_peak_mib'][k])} | {_fmt(s['rss_build_peak_mib'][k])} "
                f"| {_fmt(s['rss_train_peak_mib'][k])} | {_fmt(s['rss_peak_mib'][k])} |"
            )
    trained = {c: [m for m in MODELS if summary[c][m]["losses_finite"]] for c in summary}
    if len({tuple(v) for v in trained.values()}) > 1:
        lines += ["", "Training figures are not like for like: " + "; ".join(
            f"{LABELS[c]} trained {' and '.join(v) or 'nothing'}" for c, v in trained.items()) + "."]  # fmt: skip
    return "\n".join(lines)


def meta(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    first = next((r for launches in runs.values() for launch in launches for r in launch["ranks"] if r), {})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "device_name": first.get("device_name"), "world_size": args.world_size,
        "shape": args.shape, "steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "repeat": args.repeat, "threads_per_rank": args.threads, "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "commit": commit, "ds_config": ds_config(args.micro_batch),
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2, help="ranks per launch (default 2)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: NCCL, one GPU per rank; cpu: gloo")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-1.3b", help="the model shape (default opt-1.3b)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per model (default 3)")
    ap.add_argument("--repeat", type=int, default=1, help="launches per contender, alternating (default 1)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per rank and step (default 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; 16 for tiny)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per rank (default cores / world size)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per launch before its ranks are killed")
    ap.add_argument("--workdir", help="checkpoints, made once, and the ranks' logs (default: a temp dir per shape)")
    ap.add_argument("--prepare", action="store_true",
                    help="only make the checkpoints in --workdir (once), then exit: a long run can be split")
    ap.add_argument("--out", help="the JSON results (default WORKDIR/results-DEVICExN.json); tables go beside it as .md")
    for hidden in ("--worker", "--checkpoints", "--rank-out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 16 if args.shape == "tiny" else 128
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.world_size)
    args.workdir = args.workdir or os.path.join(tempfile.gettempdir(), f"hfbuilder-multigpu-{args.shape}")
    args.out = args.out or os.path.join(args.workdir, f"results-{args.device}x{args.world_size}.json")
    if args.world_size < 1 or args.steps < 1 or args.repeat < 1 or args.seq_len < 4:
        ap.error("--world-size, --steps and --repeat must be at least 1, --seq-len at least 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_rank(args)
        end_rank()
    if args.device == "cuda" and not args.prepare:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < args.world_size:
            print(f"--device cuda --world-size {args.world_size} needs {args.world_size} GPUs; this host has {found}",
                  file=sys.stderr)  # fmt: skip
            return 2
    ck = make_checkpoints(args.shape, Path(args.workdir))
    if args.prepare:
        print(f"checkpoints ready: {ck.root}")
        return 0
    logs = os.path.join(args.workdir, "logs")
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for i in range(args.repeat):
        for contender in CONTENDERS if i % 2 == 0 else reversed(CONTENDERS):
            prefix = os.path.join(logs, f"{contender}-{i}")
            os.makedirs(logs, exist_ok=True)
            for stale in range(args.world_size):
                if os.path.exists(f"{prefix}-{stale}.json"):
                    os.remove(f"{prefix}-{stale}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", contender, "--checkpoints", str(ck.root),
                   "--rank-out", prefix, "--device", args.device, "--shape", args.shape, "--steps", str(args.steps),
                   "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--lr", str(args.lr)]  # fmt: skip
            launch = launch_ranks(cmd, args.world_size, args.device, args.threads, args.timeout, log_dir=logs,
                                  name=f"{contender}-{i}")
            ranks = []
            for k in range(args.world_size):
                try:
                    with open(f"{prefix}-{k}.json") as fh:
                        ranks.append(json.load(fh))
                except (OSError, ValueError):
                    ranks.append(None)
            runs[contender].append({
                "ok": launch.ok, "returncodes": launch.returncodes, "killed": launch.killed, "seconds": launch.seconds,
                "ranks": ranks, "log_tails": [] if launch.ok else [log[-3000:] for log in launch.logs],
            })  # fmt: skip
            phases = ", ".join(f"rank {k}: {r['phase'] if r else 'no record'}" for k, r in enumerate(ranks))
            status = "ok" if launch.ok else f"exit codes {launch.returncodes}{' (killed)' if launch.killed else ''}"
            print(f"launch {i + 1} {LABELS[contender]:<15} {launch.seconds:6.1f} s  {status}; {phases}", flush=True)
            if not launch.ok:
                for k, log in enumerate(launch.logs):
                    print(f"--- {contender} rank {k} log tail ---\n{log[-2000:]}", file=sys.stderr)

    summary = summarize(runs, args.world_size, args.steps)
    failures = passed(summary["hfbuilder"])
    info = meta(args, runs)
    text = tables(summary, args.world_size)
    header = (f"{info['date']}: {args.world_size} x {info['device_name']} ({args.device}), shape {args.shape}, "
              f"{args.steps} steps, micro batch {args.micro_batch} x {args.seq_len} tokens, bf16 ZeRO-3; "
              f"torch {info['torch']}, transformers {info['transformers']}, DeepSpeed {info['deepspeed']}")  # fmt: skip
    print("\n" + header + "\n\n" + text + "\n")
    print("hfbuilder: all checks passed" if not failures else "hfbuilder FAILED: " + "; ".join(failures))
    for contender in CONTENDERS:
        for model in MODELS:
            for what, error in summary[contender][model]["errors"].items():
                print(f"{LABELS[contender]} {model} {what}: {error.splitlines()[0][:300]}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": info, "summary": summary, "hfbuilder_failures": failures, "runs": _without_digests(runs)},
                  fh, indent=1)  # fmt: skip
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(header + "\n\n" + text + "\n")
    print(f"wrote {args.out}")
    return 1 if failures else 0


def _without_digests(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The launches as recorded, minus the per-parameter digests (compared already; the ranks' files keep them)."""
    out: dict[str, list[dict]] = {}
    for contender, launches in runs.items():
        out[contender] = []
        for launch in launches:
            ranks = []
            for r in launch["ranks"]:
                if r is not None:
                    r = {**r, "models": {m: {k: v for k, v in e.items() if not k.startswith("digests")}
                                         for m, e in r["models"].items()}}  # fmt: skip
                ranks.append(r)
            out[contender].append({**launch, "ranks": ranks})
    return out


if __name__ == "__main__":
    sys.exit(main())
