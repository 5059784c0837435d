"""What the ZeRO-3 benchmarks share: model shapes, the checkpoint maker, DeepSpeed-Chat's
``create_hf_model`` in plain transformers calls, memory probes and a rank launcher.

Imported by ``benchmarks/zero3_build.py`` and ``benchmarks/multi_gpu_zero3.py`` (both run as
scripts, so this directory is on ``sys.path``). Nothing here imports torch at module level:
the launcher side of a benchmark stays light.
"""

from __future__ import annotations

import math
import os
import resource
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024

_OPT_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)  # hfbuilder.testing's tokenizer ids

#: OPT configs. Every vocabulary is 7 rows short of a multiple of 8, as the tokenizer is
#: (OPT's own is 50,265 tokens), so both contenders really resize (50,265 -> 50,272).
SHAPES: dict[str, dict[str, Any]] = {
    "opt-1.3b": dict(
        vocab_size=50265, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
        word_embed_proj_dim=2048, max_position_embeddings=2048, do_layer_norm_before=True, **_OPT_IDS,
    ),
    "opt-350m": dict(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
        word_embed_proj_dim=512, max_position_embeddings=2048, do_layer_norm_before=False, **_OPT_IDS,
    ),
    # opt-350m's layout (project_in/out, post-layer-norm) at a size a 2-core test can run.
    "tiny": dict(
        vocab_size=1001, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=128, do_layer_norm_before=False, **_OPT_IDS,
    ),
}  # fmt: skip
OPT_350M = SHAPES["opt-350m"]


# -- memory ---------------------------------------------------------------------------------


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    """The peak resident set since the process started, or since :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -- checkpoints ------------------------------------------------------------------------------


def _has_shape(path: str, shape: dict[str, Any]) -> bool:
    import json

    try:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False
    same = all(config.get(k) == v for k, v in shape.items())
    return same and os.path.isfile(os.path.join(path, "model.safetensors"))


def make_checkpoint(path: str, shape: str = "opt-350m") -> str:
    """Random fp16 OPT weights of ``shape`` in ``path/model.safetensors`` and a WordLevel tokenizer
    of ``vocab_size`` tokens; written once (kept while config.json matches the shape)."""
    config = SHAPES[shape]
    if _has_shape(path, config):
        return path
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from hfbuilder.testing import make_tokenizer

    os.makedirs(path, exist_ok=True)
    print(f"writing a random fp16 checkpoint of shape {shape} to {path} (once)", flush=True)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**config, dtype="float16")).half()
    model.save_pretrained(path)
    make_tokenizer(config["vocab_size"] - 4, path)
    return path


# -- DeepSpeed-Chat's algorithm ------------------------------------------------------------------


def dschat_create_hf_model(model_class: Any, path: str, tokenizer: Any, ds_config: dict, rlhf_training: bool = False) -> Any:
    """``dschat/utils/model/model_utils.py::create_hf_model`` (ZeRO-3, no dropout override),
    with plain transformers calls.

    The ``HfDeepSpeedConfig`` lives in a local, as in DeepSpeed-Chat: transformers holds it by
    weak reference, so ZeRO-3 construction is on for this call only.
    """
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(path)
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive by this local, as in DeepSpeed-Chat)
    if rlhf_training:  # the weights come later, from the step-2 checkpoint
        model = model_class.from_config(model_config)
    else:
        model = model_class.from_pretrained(path, config=model_config)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model


# -- launching ranks ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, device: str = "cpu", threads: int | None = None) -> dict[str, str]:
    """The environment ``deepspeed``/``torchrun`` give a rank on one host, for ``device`` cpu or cuda.

    ``DS_ACCELERATOR`` is always set explicitly: an inherited ``cpu`` (the Makefile exports it)
    would otherwise put a GPU run on the CPU.
    """
    env = dict(os.environ)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env.update(
        DS_ACCELERATOR=device, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Launch:
    """How the ranks of one launch ended: exit codes (None: still running, so killed), logs."""

    returncodes: list[int | None]
    logs: list[str]
    killed: bool  # some ranks were still running (timeout, or another rank failed) and were killed
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.killed and not any(self.returncodes)


def launch_ranks(
    cmd: list[str], world_size: int, device: str = "cpu", threads: int | None = None,
    timeout: float = 600, grace: float = 30, log_dir: str | None = None, name: str = "",
) -> Launch:  # fmt: skip
    """Run ``cmd`` as ``world_size`` ranks on this host and wait for all of them.

    When a rank exits with an error the others get ``grace`` seconds, then are killed: they
    would wait forever in a collective. Logs go to files, ``NAME-rank<r>.log`` in ``log_dir``
    or a temporary directory (the port when there is no name), not pipes, so a chatty rank
    never blocks on a full pipe.
    """
    import tempfile

    port = free_port()
    log_dir = log_dir or tempfile.mkdtemp(prefix="ranks-")
    os.makedirs(log_dir, exist_ok=True)
    paths = [os.path.join(log_dir, f"{name or port}-rank{r}.log") for r in range(world_size)]
    procs = []
    start = time.monotonic()
    for rank, path in enumerate(paths):
        with open(path, "w") as fh:
            env = rank_env(rank, world_size, port, device, threads)
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
    failed_at = None
    while None in (codes := [p.poll() for p in procs]):  # poll every rank: any() would stop at the first
        now = time.monotonic()
        if failed_at is None and any(codes):
            failed_at = now
        if now - start > timeout or (failed_at is not None and now - failed_at > grace):
            break
        time.sleep(0.1)
    killed = [p.poll() is None for p in procs]
    for p, kill in zip(procs, killed, strict=True):
        if kill:
            p.kill()
            p.wait()
    logs = []
    for path in paths:
        with open(path, errors="replace") as fh:
            logs.append(fh.read())
    codes = [None if kill else p.returncode for p, kill in zip(procs, killed, strict=True)]
    return Launch(codes, logs, any(killed), time.monotonic() - start)


__all__ = [
    "MIB", "OPT_350M", "SHAPES", "Launch", "current_rss_mib", "dschat_create_hf_model", "free_port",
    "launch_ranks", "make_checkpoint", "peak_rss_mib", "rank_env", "reset_peak_rss",
]  # fmt: skip


