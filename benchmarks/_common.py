"""What the benchmarks share: the random checkpoints they race on.

Imported by the scripts in this directory (run as scripts, so it is on ``sys.path``). The
shapes come from :mod:`hfbuilder.testing.shapes`, DeepSpeed-Chat's algorithm from
:mod:`hfbuilder.testing.dschat`, the rank launcher from :mod:`hfbuilder.testing.ranks`, the
probes of a process from ``_probes``.
Nothing here imports torch at module level: the launching side of a benchmark stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_VERSION = 2  # bump when the files' layout changes, so cached checkpoints are remade


# -- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoints:
    """The directories one shape's contenders read, each with config.json and the tokenizer."""

    root: Path

    @property
    def sft(self) -> Path:  # a causal LM saved by save_pretrained: model.safetensors
        return self.root / "sft"

    @property
    def critic_bin(self) -> Path:  # DeepSpeed-Chat step 2's output: the reward model's pytorch_model.bin
        return self.root / "critic-bin"

    @property
    def critic_st(self) -> Path:  # the same reward-model weights as model.safetensors
        return self.root / "critic-st"


def shape_fields(shape: str, layers: int | None = None) -> dict[str, Any]:
    from hfbuilder.testing import shape as lookup

    fields = dict(lookup(shape).fields)
    if layers:
        fields["num_hidden_layers"] = layers
    return fields


def checkpoint_name(shape: str, layers: int | None = None) -> str:
    return f"{shape}-{layers}l" if layers else shape


def checkpoint_spec(shape: str, layers: int | None = None) -> dict[str, Any]:
    from hfbuilder.testing import shape as lookup

    return {"version": CHECKPOINT_VERSION, "shape": shape, **shape_fields(shape, layers),
            "n_words": lookup(shape).n_words, "dtype": "float16", "seed": 0}  # fmt: skip


def make_checkpoints(shape: str, workdir: Path, fill_device: str | None = None, layers: int | None = None) -> Checkpoints:
    """Random fp16 checkpoints of ``shape`` under ``workdir/<shape>``, kept while their spec holds.

    ``layers`` overrides the shape's layer count (the directory is then ``<shape>-<layers>l``).
    The weights are drawn on ``fill_device`` (a GPU draws 1.3B numbers in well under a second)
    and saved from the CPU; no weight is initialized twice (the model is built on the meta
    device). Beside the causal LM, DeepSpeed-Chat's step-2 output of a reward model on the
    same base: its ``RewardModel`` keys (``rwtransformer.*``, ``v_head.weight``) in
    ``pytorch_model.bin`` and, the same tensors, in ``model.safetensors``.
    """
    ck = Checkpoints(Path(workdir) / checkpoint_name(shape, layers))
    marker = ck.root / "spec.json"
    spec = checkpoint_spec(shape, layers)
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return ck
    import torch  # only when writing: a kept checkpoint costs the caller no imports
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from hfbuilder.testing import make_tokenizer
    from hfbuilder.testing import shape as lookup

    ck.root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    if fill_device is None:
        fill_device = "cuda" if torch.cuda.is_available() else "cpu"
    config = lookup(shape).config(num_hidden_layers=spec["num_hidden_layers"], dtype="float16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model = model.to_empty(device=fill_device)
    gen = torch.Generator(device=fill_device).manual_seed(spec["seed"])
    with torch.no_grad():
        for p in model.parameters():  # buffers left as to_empty made them are not saved (rotary) or absent
            p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model = model.to("cpu")
    tokenizer = make_tokenizer(spec["n_words"])
    model.save_pretrained(ck.sft)
    tokenizer.save_pretrained(ck.sft)

    state = {f"rwtransformer.{k}": v for k, v in model.base_model.state_dict().items()}
    head_dim = getattr(config, "word_embed_proj_dim", None) or config.hidden_size  # DeepSpeed-Chat's rule
    state["v_head.weight"] = (torch.randn(1, head_dim, generator=torch.Generator().manual_seed(1)) * 0.02).half()
    for d in (ck.critic_bin, ck.critic_st):
        d.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(d)
        tokenizer.save_pretrained(d)
    torch.save(state, ck.critic_bin / "pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, ck.critic_st / "model.safetensors", metadata={"format": "pt"})
    marker.write_text(json.dumps(spec))
    return ck


__all__ = ["CHECKPOINT_VERSION", "Checkpoints", "checkpoint_name", "checkpoint_spec", "make_checkpoints",
           "shape_fields"]  # fmt: skip


def check_values(built: Any, checkpoint: Path, names: list[str], device: str, who: str = "") -> str:
    """After the clock: prove ``built`` (a model, or a dict of tensors) holds the checkpoint's values for
    ``names`` on ``device``; an AssertionError says which tensor does not."""
    import torch

    from hfbuilder.weights import open_checkpoint

    prefix = f"{who}: " if who else ""
    tensors = built if isinstance(built, dict) else dict(built.named_parameters())
    with open_checkpoint(checkpoint) as reader:
        for name in names:
            got, want = tensors[name], reader.get(name)
            if got.device.type != torch.device(device).type:
                raise AssertionError(f"{prefix}{name} is on {got.device}, expected {device}")
            if not torch.equal(got.detach().to("cpu", want.dtype), want):
                raise AssertionError(f"{prefix}{name} differs from the checkpoint")
    return f"{len(names)} tensors match the checkpoint on {device}"

