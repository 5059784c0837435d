"""One rank of the ZeRO-3 tests: runs the checks a spec names and writes ``rank<r>.json``.

Run by :func:`zero3_harness.run_ranks`. Each check returns plain data (digests of gathered
weights, names, losses); ``tests/test_zero3.py`` compares it across ranks and asserts.
A check that raises records the traceback and the run goes on, so one failure does not
hide the others (the ranks stay in step: every check is collective on all of them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from typing import Any

import deepspeed
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import deepspeed as hf_ds
from zero3_harness import HeadPlugin, finish_rank

import hfbuilder
from hfbuilder import ModelBuilder
from hfbuilder.weights import LoadPlan, TensorInfo, open_checkpoint
from hfbuilder.zero3 import load_checkpoint_into_partitions

RANK = int(os.environ["RANK"])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full size (a copy), by name, tied names included."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.clone()
    return out


def partition_facts(model: torch.nn.Module) -> dict[str, Any]:
    params = list(model.named_parameters())
    return {
        "unpartitioned": [n for n, p in params if not hasattr(p, "ds_id")],
        "dtypes": sorted({str(p.dtype) for _, p in params}),
        "n_params": len(params),
    }


def checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def notes(report: Any) -> list[str]:
    return [a for s in report.stages for a in s.actions]


# -- checks ----------------------------------------------------------------------------------


def check_lm(spec: dict[str, Any], family: str) -> dict[str, Any]:
    path = spec["lm_dirs"][family]
    tok = AutoTokenizer.from_pretrained(path)
    model, report = ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).build_with_report()
    full = gathered(model)
    ckpt = checkpoint_tensors(os.path.join(path, "model.safetensors"))
    old = {}
    for which, module in (("embed", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight)
        key = name if name in ckpt else next(n for n, p in model.named_parameters() if p is module.weight)
        ref = ckpt[key].to(torch.bfloat16)
        rows = full[name]
        old[which] = {
            "old_rows_equal_checkpoint": bool(torch.equal(rows[: ref.shape[0]], ref)),
            "rows": rows.shape[0],
            "new_rows_finite": bool(torch.isfinite(rows[ref.shape[0]:].float()).all()),
            "new_rows_digest": digest(rows[ref.shape[0]:]),
        }
    # Same numbers as the plain model for the old vocabulary: buffers (rotary) and weights intact.
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[2, 7, 9, 11, 13, 3]])
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        logits = model.eval()(input_ids=ids).logits.float()
    with torch.no_grad():
        ref_logits = plain(input_ids=ids).logits.float()
    n = ref_logits.shape[-1]
    return {
        **partition_facts(model),
        "digests": {k: digest(v) for k, v in full.items()},
        "matrices": old,
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "max_logit_diff": float((logits[..., :n] - ref_logits).abs().max()),
        "partition_loader": any("built partitioned" in a for a in notes(report)),
        "provenance": report.provenance,
    }


def check_bin(spec: dict[str, Any]) -> dict[str, Any]:
    """A .bin checkpoint: transformers' own ZeRO-3 loader, then hfbuilder's resize and checks."""
    path = spec["bin_dir"]
    tok = AutoTokenizer.from_pretrained(path)
    model, report = ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).build_with_report()
    full = gathered(model)
    ref = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    embed = next(n for n in full if n.endswith("embed_tokens.weight"))
    return {
        **partition_facts(model),
        "digests": {k: digest(v) for k, v in full.items()},
        "old_rows_equal_checkpoint": bool(torch.equal(full[embed][: ref[embed].shape[0]], ref[embed].to(torch.bfloat16))),
        "partition_loader": any("built partitioned" in a for a in notes(report)),
    }


def build_head_model(spec: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    path = spec["head_dir"]
    tok = AutoTokenizer.from_pretrained(path)
    builder = ModelBuilder(AutoModel, path, tok).with_plugin(HeadPlugin()).with_head("test_value")
    return builder.with_zero3(spec["ds"]).build_with_report()


def check_head(spec: dict[str, Any]) -> dict[str, Any]:
    model, report = build_head_model(spec)
    full = gathered(model)
    return {
        **partition_facts(model),
        "digests": {k: digest(v) for k, v in full.items()},
        "head_notes": [a for s in report.stages if s.name in ("head", "after:head") for a in s.actions],
    }


class _GetOnly:
    """A reader that reads whole tensors and slices them in memory (no row reads from the file)."""

    def __init__(self, reader: Any, drop: str | None = None, extra: str | None = None, reshape: str | None = None):
        self.reader, self.drop, self.extra, self.reshape = reader, drop, extra, reshape

    def keys(self) -> list[str]:
        keys = [k for k in self.reader.keys() if k != self.drop]
        return keys + ([self.extra] if self.extra else [])

    def info(self, key: str) -> TensorInfo:
        if key == self.extra:
            return TensorInfo((1,), "float32")
        shape = tuple(self.reader.info(key).shape)
        return TensorInfo((shape[0] + 1, *shape[1:]) if key == self.reshape else shape, self.reader.info(key).dtype)

    def get(self, key: str, device: Any = None) -> torch.Tensor:
        return self.reader.get(key)

    def get_slice(self, key: str) -> torch.Tensor:
        return self.get(key)


def check_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    """A model+head checkpoint saved by a plain build, loaded into ZeRO-3 partitions."""
    ckpt_path = spec["head_ckpt"]
    ckpt = checkpoint_tensors(ckpt_path)
    out: dict[str, Any] = {}
    errors = {}
    model, _ = build_head_model(spec)
    reader = open_checkpoint(ckpt_path)
    some_key = sorted(ckpt)[0]
    for label, bad in (
        ("missing", _GetOnly(reader, drop="v_head.weight")),
        ("unexpected", _GetOnly(reader, extra="v_head.bias")),
        ("shape", _GetOnly(reader, reshape=some_key)),
    ):
        try:
            load_checkpoint_into_partitions(model, bad)
            errors[label] = "no error"
        except hfbuilder.CheckpointError as exc:
            errors[label] = str(exc)
    out["errors"] = errors
    for label, source in (("sliced", ckpt_path), ("get_only", _GetOnly(reader))):
        model, _ = build_head_model(spec)
        load_checkpoint_into_partitions(model, source)
        full = gathered(model)
        out[label] = {
            **partition_facts(model),
            "equal_checkpoint": sorted(k for k in ckpt if torch.equal(full[k], ckpt[k].to(full[k].dtype))),
            "keys": sorted(ckpt),
            "digests": {k: digest(v) for k, v in full.items()},
        }
    # As the checkpoint stage calls it: keys matched by the caller, a checkpoint with fewer
    # embedding rows than the resized model (rows 45:48 keep the resize's values).
    model, _ = build_head_model(spec)
    embed = "base.embed_tokens.weight"
    before = gathered(model)[embed]
    load_checkpoint_into_partitions(
        model, _InfoReader(reader, {embed: 45}), LoadPlan(sources={k: k for k in ckpt}, partial_rows={embed: (45, 48)})
    )
    full = gathered(model)
    out["partial"] = {
        "old_rows_from_checkpoint": bool(torch.equal(full[embed][:45], ckpt[embed][:45].to(torch.bfloat16))),
        "new_rows_kept": bool(torch.equal(full[embed][45:], before[45:])),
        "others_equal": all(torch.equal(full[k], ckpt[k].to(full[k].dtype)) for k in ckpt if k != embed),
    }
    return out


class _InfoReader:
    """The reader protocol, with some tensors cut to fewer rows."""

    def __init__(self, reader: Any, rows: dict[str, int]) -> None:
        self.reader, self.rows = reader, rows

    def keys(self) -> list[str]:
        return self.reader.keys()

    def info(self, key: str) -> TensorInfo:
        shape = tuple(self.reader.info(key).shape)
        if key in self.rows:
            shape = (self.rows[key], *shape[1:])
        return TensorInfo(shape, self.reader.info(key).dtype)

    def get(self, key: str, device: Any = None) -> torch.Tensor:
        return self.reader.get(key)[: self.rows.get(key)]

    def get_slice(self, key: str) -> Any:
        return self.get(key)


def check_global_state(spec: dict[str, Any]) -> dict[str, Any]:
    path = spec["lm_dirs"]["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    out: dict[str, Any] = {"after_earlier_builds": hf_ds.is_deepspeed_zero3_enabled()}
    plain = ModelBuilder(AutoModelForCausalLM, path, tok).build()
    out["plain_after_zero3"] = partition_facts(plain)

    # A caller's own HfDeepSpeedConfig (a Trainer's, say) survives the build.
    theirs = hf_ds.HfDeepSpeedConfig({**spec["ds"], "zero_optimization": {"stage": 3}})
    ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).build()
    out["callers_config_restored"] = hf_ds._hf_deepspeed_config_weak_ref() is theirs
    hf_ds.unset_hf_deepspeed_config()
    del theirs

    class Boom(hfbuilder.Stage):
        name = "boom"
        after = ("load",)

        def run(self, ctx: Any) -> None:
            out["zero3_during_build"] = hf_ds.is_deepspeed_zero3_enabled()
            raise RuntimeError("boom")

    try:
        ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).with_stage(Boom).build()
        out["error"] = None
    except hfbuilder.StageError as exc:
        out["error"] = str(exc)
    out["after_error"] = hf_ds.is_deepspeed_zero3_enabled()
    out["weak_ref_after_error"] = hf_ds._hf_deepspeed_config_weak_ref is None
    out["functional_linear"] = getattr(torch.nn.functional.linear, "__qualname__", "?")
    return out


def check_stage2(spec: dict[str, Any]) -> dict[str, Any]:
    path = spec["lm_dirs"]["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    cfg = {**spec["ds"], "zero_optimization": {"stage": 2}}
    model = ModelBuilder(AutoModelForCausalLM, path, tok).with_deepspeed(cfg).build()
    return {**partition_facts(model), "zero3_after": hf_ds.is_deepspeed_zero3_enabled()}


def train(model: torch.nn.Module, spec: dict[str, Any], loss_fn: Any, steps: int = 4, after: Any = None) -> dict:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.get("lr", 1e-3))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=spec["ds"])
    torch.manual_seed(0)  # the same batch on every rank
    ids = torch.randint(4, 45, (spec["ds"]["train_micro_batch_size_per_gpu"], 8))
    losses = []
    for _ in range(steps):
        loss = loss_fn(engine, ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    out = {"losses": losses, **(after(engine, ids) if after else {})}
    engine.destroy()
    return out


def generate(engine: Any, ids: torch.Tensor) -> dict[str, Any]:
    """generate() as docs/zero3.md says, with ranks that stop at different lengths."""
    engine.eval()
    with torch.no_grad():
        seq = engine.module.generate(
            ids[:, :4], max_new_tokens=2 + 2 * RANK, do_sample=False, synced_gpus=True, pad_token_id=0
        )
    return {"generated_shape": list(seq.shape)}


def check_train_lm(spec: dict[str, Any]) -> dict[str, Any]:
    path = spec["lm_dirs"]["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    model = ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).build()
    return train(model, spec, lambda engine, ids: engine(input_ids=ids, labels=ids).loss, after=generate)


def check_train_head(spec: dict[str, Any]) -> dict[str, Any]:
    model, _ = build_head_model(spec)
    return train(model, spec, lambda engine, ids: (engine(ids).float() - 1.0).pow(2).mean())


def build_critic(spec: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """DeepSpeed-Chat step 3's critic: the step-2 reward model from its checkpoint, under ZeRO-3."""
    path = spec["critic_dir"]
    tok = AutoTokenizer.from_pretrained(path)
    builder = ModelBuilder(AutoModel, path, tok).for_phase("critic", num_padding_at_beginning=1)
    return builder.with_zero3(spec["ds"]).build_with_report()


def check_critic(spec: dict[str, Any]) -> dict[str, Any]:
    model, report = build_critic(spec)
    ckpt = checkpoint_tensors(os.path.join(spec["critic_dir"], "model.safetensors"))
    full = gathered(model)
    return {
        **partition_facts(model),
        "type": type(model).__name__,
        "digests": {k: digest(v) for k, v in full.items()},
        "equal_checkpoint": sorted(k for k in ckpt if k in full and torch.equal(full[k], ckpt[k].to(full[k].dtype))),
        "keys": sorted(ckpt),
        "v_head": report.provenance.get("v_head.weight"),
    }


def check_critic_preresize(spec: dict[str, Any]) -> dict[str, Any]:
    """A step-2 checkpoint saved before the resize (45 embedding rows; the tokenizer asks for 48)."""
    path = spec["critic_pre_dir"]
    builder = ModelBuilder(AutoModel, path, AutoTokenizer.from_pretrained(path)).for_phase(
        "critic", num_padding_at_beginning=1)
    model, report = builder.with_zero3(spec["ds"]).build_with_report()
    full = gathered(model)
    embed = next(k for k in full if k.endswith("embed_tokens.weight"))
    weight = full[embed]
    return {
        **partition_facts(model),
        "digests": {k: digest(v) for k, v in full.items()},
        "rows": weight.shape[0],
        "new_rows_are_the_mean": bool(torch.equal(
            weight[45:], weight[:45].float().mean(0, keepdim=True).to(weight.dtype).expand(3, -1))),
        "provenance": report.provenance.get(embed),
        "notes": notes(report),
    }


def check_critic_rank0(spec: dict[str, Any]) -> dict[str, Any]:
    """The same critic with ``zero3_read="rank0"``: rank 0 reads every tensor, the others none."""
    import hfbuilder.zero3.fill as fill_module
    import hfbuilder.zero3.load as load_module

    reads: list[str] = []
    original = fill_module.read_rows

    def counting(reader: Any, key: str, start: int, stop: int | None) -> torch.Tensor:
        if hasattr(reader, "file"):  # a checkpoint, not the rows the partitioned resize keeps in memory
            reads.append(key)
        return original(reader, key, start, stop)

    fill_module.read_rows = load_module.read_rows = counting
    try:
        path = spec["critic_dir"]
        builder = ModelBuilder(AutoModel, path, AutoTokenizer.from_pretrained(path)).for_phase(
            "critic", num_padding_at_beginning=1).with_zero3(spec["ds"]).with_options(zero3_read="rank0")
        model, report = builder.build_with_report()
    finally:
        fill_module.read_rows = load_module.read_rows = original
    return {
        **partition_facts(model),
        "digests": {k: digest(v) for k, v in gathered(model).items()},
        "reads": len(reads),
        "read_keys": reads[:5],
        "notes": report.stage("checkpoint").actions,
    }


def reward_loss(engine: Any, ids: torch.Tensor) -> torch.Tensor:
    """Chosen = ids, rejected = ids with a different tail: DeepSpeed-Chat's pairwise loss."""
    rejected = ids.clone()
    rejected[:, 4:] = (rejected[:, 4:] + 7) % 41 + 4
    return engine(torch.cat([ids, rejected]))["loss"]


def check_train_reward(spec: dict[str, Any]) -> dict[str, Any]:
    model, _ = build_critic(spec)
    return train(model, spec, reward_loss)


def check_local_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """Distributed initialized by the caller, LOCAL_RANK missing: a clear error from check()."""
    path = spec["lm_dirs"]["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    saved = os.environ.pop("LOCAL_RANK")
    try:
        ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).build()
        return {"error": None}
    except hfbuilder.DistributedSetupError as exc:
        return {"error": str(exc)}
    finally:
        os.environ["LOCAL_RANK"] = saved


CHECKS = {
    "lm_llama": lambda spec: check_lm(spec, "llama"),
    "lm_opt": lambda spec: check_lm(spec, "opt"),
    "bin": check_bin,
    "head": check_head,
    "checkpoint": check_checkpoint,
    "global_state": check_global_state,
    "stage2": check_stage2,
    "train_lm": check_train_lm,
    "train_head": check_train_head,
    "local_rank": check_local_rank,
    "critic": check_critic,
    "critic_rank0": check_critic_rank0,
    "critic_preresize": check_critic_preresize,
    "train_reward": check_train_reward,
}


def main() -> None:
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as fh:
        spec = json.load(fh)
    results: dict[str, Any] = {"rank": RANK, "preinit": spec.get("preinit", False)}
    if spec.get("preinit"):
        deepspeed.init_distributed(dist_backend="gloo")
    results["initialized_before_first_build"] = torch.distributed.is_initialized()
    finish_rank(out_dir, results, {name: functools.partial(CHECKS[name], spec) for name in spec["checks"]})


if __name__ == "__main__":
    main()
