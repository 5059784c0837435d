"""One rank of the ZeRO-3 layout test: critics from other frameworks' checkpoints, streamed into partitions.

Run by :func:`zero3_harness.run_ranks` from ``tests/test_layouts.py``; writes ``rank<r>.json``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import deepspeed
import torch
from layout_writers import tensors_of
from transformers import AutoModel, AutoTokenizer
from zero3_harness import finish_rank

from hfbuilder import ModelBuilder

RANK = int(os.environ["RANK"])


def check(path: str, ds: dict[str, Any]) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(path)
    model, report = ModelBuilder(AutoModel, path, tok).for_phase("critic").with_zero3(ds).build_with_report()
    _, source = tensors_of(path)
    params = dict(model.named_parameters())
    equal = []
    for name, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            if name in source and torch.equal(p.data, source[name].to(p.dtype)):
                equal.append(name)
    return {
        "unpartitioned": [n for n, p in params.items() if not hasattr(p, "ds_id")],
        "equal": sorted(equal),
        "keys": sorted(source),
        "params": sorted(params),
        "provenance": sorted({report.provenance.get(n, "?") for n in params}),
        "normalization": model.reward_normalization,
        "layout": report.stage("reward_layout").facts["reward_layout"],
        "loaded_into_partitions": any("into ZeRO-3 partitions" in a for a in report.stage("checkpoint").actions),
    }


def main() -> None:
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as fh:
        spec = json.load(fh)
    checks = {name: functools.partial(check, path, spec["ds"]) for name, path in spec["cases"].items()}
    finish_rank(out_dir, {"rank": RANK}, checks)


if __name__ == "__main__":
    main()
