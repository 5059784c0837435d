"""One rank of the family matrix under ZeRO-3: builds, gathers, trains; writes ``rank<r>.json``.

Run by :func:`zero3_harness.run_ranks` from ``tests/test_families.py``, all families in one
launch. Each rank trains on its own inputs (seeded by rank), so MoE routers send tokens to
different experts on different ranks: the case that hangs when experts are gathered one by
one. A check that raises records its traceback and the run goes on, as in ``zero3_worker``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from zero3_harness import LoopedMoeLeafPlugin
from zero3_worker import digest, gathered, partition_facts

from hfbuilder import ModelBuilder
from hfbuilder.testing import end_rank, looped_moe_classes

RANK = int(os.environ["RANK"])


def builder(spec: dict[str, Any], family: str) -> ModelBuilder:
    path = spec["dirs"][family]
    return ModelBuilder(AutoModelForCausalLM, path, AutoTokenizer.from_pretrained(path)).with_zero3(spec["ds"])


def rank_inputs(rows: int, length: int, step: int) -> torch.Tensor:
    """Different tokens on each rank (and at each step)."""
    return torch.randint(4, 45, (rows, length), generator=torch.Generator().manual_seed(1000 * step + RANK))


def train(model: torch.nn.Module, spec: dict[str, Any], steps: int = 2, length: int = 8) -> dict[str, Any]:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=spec["ds"])
    losses, inputs = [], []
    for step in range(steps):
        ids = rank_inputs(spec["ds"]["train_micro_batch_size_per_gpu"], length, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        inputs.append(digest(ids))
    return {"losses": losses, "inputs": inputs}


def tied_names(model: torch.nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def check_family(spec: dict[str, Any], family: str) -> dict[str, Any]:
    """The ZeRO-3 build gathered equals from_pretrained; then a training step on per-rank inputs."""
    model, report = builder(spec, family).build_with_report()
    full = gathered(model)
    ref = AutoModelForCausalLM.from_pretrained(spec["dirs"][family], dtype=torch.bfloat16).state_dict()
    unequal, grown = [], {}
    for name, want in ref.items():
        got = full[name]
        if got.shape[0] != want.shape[0]:  # the resized vocabulary: old rows are the checkpoint's
            grown[name] = [got.shape[0], bool(torch.isfinite(got[want.shape[0]:].float()).all())]
            got = got[: want.shape[0]]
        if got.shape != want.shape or not torch.equal(got, want):
            unequal.append(name)
    out = {
        **partition_facts(model),
        "keys_equal": sorted(full) == sorted(ref),
        "unequal": unequal,
        "grown": grown,
        "digests": {k: digest(v) for k, v in full.items()},
        "tied": tied_names(model),
        "invariants": {r.name: r.passed for r in report.invariants},
        "leaf_modules": sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules()),
        "after_load": next((s.actions for s in report.stages if s.name == "after:load"), []),
    }
    if family in spec["train"]:
        out.update(train(model, spec))
        out["leaf_modules_trained"] = sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules())
    return out


def check_deferred(spec: dict[str, Any], family: str) -> dict[str, Any]:
    """A deferred ZeRO-3 build (partitioned, no init) filled from a step-1 output: ties survive."""
    path = spec["sft_dirs"][family]
    tok = AutoTokenizer.from_pretrained(path)
    model, report = (ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(spec["ds"]).deferred_weights()
                     .with_checkpoint(path).build_with_report())
    return {"tied": tied_names(model), "invariants": {r.name: r.passed for r in report.invariants}}


def check_lora(spec: dict[str, Any], family: str) -> dict[str, Any]:
    """bf16 ZeRO-3 with LoRA: adapters partitioned in bf16, only they change in a training step."""
    model = builder(spec, family).with_lora(r=2, target_modules=["q_proj", "v_proj"], only_optimize_lora=True).build()
    facts = partition_facts(model)
    adapters = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
    before = gathered(model)
    out = {**facts, "adapters": adapters, **train(model, spec)}
    after = gathered(model)
    out["changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    out["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return out


def check_looped_moe(spec: dict[str, Any]) -> dict[str, Any]:
    """Experts called one by one: with the leaf plugin, ranks routing differently still train."""
    model, report = builder(spec, "looped_moe").with_plugin(LoopedMoeLeafPlugin()).build_with_report()
    blocks = [m for m in model.modules() if type(m).__name__ == "LoopedMoeBlock"]
    out: dict[str, Any] = {
        "leaves": [bool(getattr(m, "_z3_leaf", False)) for m in blocks],
        "after_load": report.stage("after:load").actions,
        "warnings": report.warnings,
    }
    out.update(train(model, spec, steps=3, length=2))
    out["calls"] = [m.calls for m in blocks]
    _, unguarded = builder(spec, "looped_moe").build_with_report()
    out["unguarded_warnings"] = unguarded.warnings
    return out


def main() -> None:
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as fh:
        spec = json.load(fh)
    looped_moe_classes()  # as a remote-code model's module would be imported before loading it
    gc.freeze()  # see below
    results: dict[str, Any] = {"rank": RANK}
    for name in spec["checks"]:
        kind, _, family = name.partition(":")
        start = time.perf_counter()
        try:
            if kind == "family":
                result = check_family(spec, family)
            elif kind == "deferred":
                result = check_deferred(spec, family)
            elif kind == "lora":
                result = check_lora(spec, family)
            else:
                result = check_looped_moe(spec)
            results[name] = {"ok": True, **result}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        # deepspeed.initialize calls gc.collect(), which walks every object torch, transformers
        # and DeepSpeed made: about 2 s a call on a busy CPU. Objects alive now are not garbage
        # the next check needs collected; freezing them leaves the walk only the newer ones.
        gc.freeze()
    with open(os.path.join(out_dir, f"rank{RANK}.json"), "w") as fh:
        json.dump(results, fh)
    end_rank()


if __name__ == "__main__":
    main()
