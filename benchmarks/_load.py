"""The Llama-3-8B load benchmark's parts: checkpoints, contenders and probes (used by ``run.py``).

Every contender reads the same sharded bf16 checkpoint onto the device: hfbuilder with each load
backend, transformers' ``from_pretrained(device_map=...)``, DeepSpeed-Chat's steps and ``.cuda()``,
the raw instanttensor library, and two limits measured on the machine: a pinned host-to-device
copy (the link) and an O_DIRECT read of the files (the disk). ``cold`` runs evict the files from
the page cache first (``posix_fadvise(DONTNEED)``: only these files, no root needed).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Llama shapes: Meta-Llama-3-8B's published config, and a tiny one in several shards for CPU runs.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, n_words=128252,
                      shard="5GB"),
    "llama-tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, n_words=252, shard="100KB"),
}  # fmt: skip
LLAMA_VERSION = 1  # bump when the files' layout changes
CHUNK = 16 << 20


@dataclass(frozen=True)
class LlamaCheckpoints:
    """The directories the load contenders read."""

    root: Path

    @property
    def sft(self) -> Path:  # a causal LM: config, tokenizer, sharded model-*.safetensors and the index
        return self.root / "sft"

    @property
    def critic_st(self) -> Path:  # DeepSpeed-Chat's reward-model keys (rwtransformer.*, v_head.weight), sharded
        return self.root / "critic-st"

    def files(self, reads: str) -> list[str]:
        folder = self.sft if reads == "sft" else self.critic_st
        return sorted(str(p) for p in folder.glob("*.safetensors"))

    def nbytes(self, reads: str) -> int:
        return sum(os.path.getsize(f) for f in self.files(reads))


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    from hfbuilder.testing import BOS_ID, EOS_ID, PAD_ID

    spec = {k: v for k, v in LLAMA_SHAPES[shape].items() if k not in ("n_words", "shard")}
    return LlamaConfig(**spec, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, dtype="bfloat16")


def make_llama_checkpoints(shape: str, workdir: Path, fill_device: str | None = None) -> LlamaCheckpoints:
    """Random bf16 weights of ``shape`` under ``workdir/shape`` (kept while the spec holds), drawn on
    ``fill_device`` (a GPU draws 8B numbers in a second) and written shard by shard."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM

    from hfbuilder.pretrained import build_on_meta
    from hfbuilder.testing import make_tokenizer

    ck = LlamaCheckpoints(workdir / shape)
    spec = {"version": LLAMA_VERSION, "shape": shape, **LLAMA_SHAPES[shape], "dtype": "bfloat16", "seed": 0}
    marker = ck.root / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return ck
    ck.root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    fill_device = fill_device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(shape)
    model = build_on_meta(AutoModelForCausalLM, config, torch.bfloat16).to_empty(device=fill_device)
    gen = torch.Generator(device=fill_device).manual_seed(spec["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    tokenizer = make_tokenizer(spec["n_words"])
    for folder in (ck.sft, ck.critic_st):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    meta = {"format": "pt"}
    save_torch_state_dict(state, ck.sft, max_shard_size=spec["shard"], metadata=meta)
    critic = {f"rwtransformer.{k.removeprefix('model.')}": v for k, v in state.items() if k.startswith("model.")}
    head = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.02
    critic["v_head.weight"] = head.to(torch.bfloat16).to(fill_device)
    del model, state
    save_torch_state_dict(critic, ck.critic_st, max_shard_size=spec["shard"], metadata=meta)
    marker.write_text(json.dumps(spec))
    return ck


# -- contenders (ck, device, tokenizer) -> (what was built, report) ------------------------------


def _builder(path: Path, tok: Any, model_class: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    from hfbuilder import ModelBuilder

    return ModelBuilder(model_class or AutoModelForCausalLM, path, tok).with_dropout(0.0).with_dtype("bfloat16")


def c_hfbuilder(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    return _builder(ck.sft, tok).on_device(device).build_with_report()


def c_hfbuilder_st(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    return _builder(ck.sft, tok).with_loader("safetensors").on_device(device).build_with_report()


def c_hfbuilder_critic(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    """The RLHF critic: the step-2 reward model, built deferred and filled from its checkpoint."""
    from transformers import AutoModel

    builder = _builder(ck.critic_st, tok, AutoModel).for_phase("critic", num_padding_at_beginning=1)
    return builder.on_device(device).build_with_report()


def c_hfbuilder_buffered(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    return _builder(ck.sft, tok).with_loader("auto", io="buffered").on_device(device).build_with_report()


def c_transformers(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ck.sft, device_map=device, dtype=torch.bfloat16), None


def _raw_instanttensor(ck: Any, device: str, buffered: bool) -> tuple[Any, Any]:
    import torch

    if not str(device).startswith("cuda"):
        return None, {"skipped": "instanttensor reads onto CUDA devices only"}
    import instanttensor

    kwargs = {"backend": instanttensor.BackendPolicy.BUFFERED} if buffered else {}
    index = torch.device(device).index or 0
    with instanttensor.safe_open(ck.files("sft"), framework="pt", device=index, **kwargs) as fh:
        return dict(fh.tensors()), {"backend": fh.backend.name}


def c_instanttensor(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    """The raw library as the issue measured it: ``safe_open(files, device, backend=BUFFERED)``."""
    return _raw_instanttensor(ck, device, buffered=True)


def c_instanttensor_direct(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    return _raw_instanttensor(ck, device, buffered=False)


def c_pinned(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    """The link's limit: the checkpoint's byte count copied from pinned host memory, 1 GiB at a time
    (the pinned buffer and the device buffer are made before the clock)."""
    import torch

    if not str(device).startswith("cuda"):
        return None, {"skipped": "a pinned host-to-device copy needs a CUDA device"}
    nbytes = ck.nbytes("sft")
    chunk = min(1 << 30, nbytes)
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for offset in range(0, nbytes, chunk):
        n = min(chunk, nbytes - offset)
        dst[offset:offset + n].copy_(src[:n], non_blocking=True)
    torch.cuda.synchronize()
    return None, {"seconds": time.perf_counter() - start, "bytes": nbytes}


def c_disk(ck: Any, device: str, tok: Any) -> tuple[Any, Any]:
    """The disk's sequential read: every shard with O_DIRECT, 16 MiB reads, one thread per shard."""
    files = ck.files("sft")
    total = [0] * len(files)

    def read(i: int, file: str) -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                offset += n
                total[i] += n
                if n < CHUNK:
                    break
        finally:
            os.close(fd)
            buf.close()

    threads = [threading.Thread(target=read, args=(i, f)) for i, f in enumerate(files)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return None, {"seconds": time.perf_counter() - start, "bytes": sum(total)}


# -- the page cache ----------------------------------------------------------------------------------


def evict(files: list[str]) -> float | None:
    """Drop ``files`` from the page cache (their clean pages: written back first); return the share
    of sampled pages still cached afterwards (0.0 when the eviction worked, None where unknown)."""
    from hfbuilder.loaders import cached_fraction

    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached_fraction(files)


def check_llama(reads: str, ck: LlamaCheckpoints, built: Any, device: str, last: int) -> str:
    """After the clock: the last layer's down projection (and the critic's v_head) equal the file's."""
    from _common import check_values

    if reads == "sft":
        return check_values(built, ck.sft, [f"model.layers.{last}.mlp.down_proj.weight"], device)
    return check_values(built, ck.critic_st, [f"rwtransformer.layers.{last}.mlp.down_proj.weight", "v_head.weight"],
                        device)


__all__ = [
    "LLAMA_SHAPES", "LlamaCheckpoints", "c_disk", "c_hfbuilder", "c_hfbuilder_buffered", "c_hfbuilder_critic",
    "c_hfbuilder_st", "c_instanttensor", "c_instanttensor_direct", "c_pinned", "c_transformers", "check_llama",
    "evict", "llama_config", "make_llama_checkpoints",
]  # fmt: skip
