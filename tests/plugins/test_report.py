"""The per-stage timing wrapper: wall time, peak RSS and peak CUDA memory in the build report.

The CUDA branch runs here against a stand-in for ``torch.cuda`` (this machine has no GPU);
the GPU benchmark exercises the real one.
"""

from __future__ import annotations

import sys
import types

import pytest
from transformers import AutoModelForCausalLM

from hfbuilder import ModelBuilder
from hfbuilder.context import BuildContext
from hfbuilder.plugins import report
from hfbuilder.plugins.load import LoadSettings


class FakeCuda:
    """What the wrapper uses of ``torch.cuda``, recording each call."""

    def __init__(self, initialized: bool = True, peak_bytes: int = 3 * 2**20) -> None:
        self.initialized = initialized
        self.peak_bytes = peak_bytes
        self.calls: list[tuple[str, object]] = []

    def is_initialized(self) -> bool:
        return self.initialized

    def reset_peak_memory_stats(self, device=None) -> None:
        self.calls.append(("reset", device))

    def synchronize(self, device=None) -> None:
        self.calls.append(("synchronize", device))

    def max_memory_allocated(self, device=None) -> int:
        self.calls.append(("max", device))
        return self.peak_bytes


def test_every_stage_is_timed_and_measured(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    _, rep = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).build_with_report()
    assert [r.name for r in rep.stages] == rep.plan
    for rec in rep.stages:
        assert rec.seconds >= 0
        assert rec.peak_rss_mib is not None and rec.peak_rss_mib > 0
        assert rec.rss_delta_mib is not None
        assert rec.peak_cuda_mib is None  # no CUDA here: nothing recorded, nothing initialized
    peaks = [r.peak_rss_mib for r in rep.stages]
    assert peaks == sorted(peaks)  # the process high-water mark, never reset
    assert rep.total_seconds >= sum(r.seconds for r in rep.stages) * 0.99
    assert rep.to_dict()["stages"][0]["name"] == rep.plan[0]


def test_cuda_peak_per_stage(model_dir, tokenizer_for, monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(report, "_cuda", lambda: fake)
    path = model_dir("opt")
    _, rep = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).build_with_report()
    assert [r.peak_cuda_mib for r in rep.stages] == [3.0] * len(rep.stages)
    # Per stage: reset before, synchronize and read after; on the current device (no on_device).
    assert fake.calls == [("reset", None), ("synchronize", None), ("max", None)] * len(rep.stages)


def test_a_stage_that_initializes_cuda_reports_its_peak(monkeypatch):
    """CUDA not initialized at the stage start (nothing to reset), initialized by its end."""
    fake = FakeCuda(initialized=False)
    states = iter([None, fake])
    monkeypatch.setattr(report, "_cuda", lambda: next(states))
    ctx = BuildContext(model_class=None, model_name_or_path="x", tokenizer=None, stage_settings={"load": LoadSettings(device="cuda:1")})
    from hfbuilder.context import StageRecord

    ctx.report.stages.append(StageRecord("load", "test"))
    stage = types.SimpleNamespace(name="load")
    gen = report.hfbuilder_run_stage(stage, ctx)
    next(gen)
    with pytest.raises(StopIteration):
        gen.send("done")
    assert ctx.report.stages[0].peak_cuda_mib == 3.0
    assert fake.calls == [("synchronize", "cuda:1"), ("max", "cuda:1")]


def test_cuda_lookup_never_imports_torch_or_starts_cuda(monkeypatch):
    fake = FakeCuda(initialized=False)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake))
    assert report._cuda() is None
    fake.initialized = True
    assert report._cuda() is fake
    monkeypatch.delitem(sys.modules, "torch")
    assert report._cuda() is None
    assert "torch" not in sys.modules


@pytest.mark.parametrize(
    ("device", "expected"), [(None, None), ("cpu", None), ("cuda", "cuda"), ("cuda:1", "cuda:1"), ("meta", None)]
)
def test_cuda_device_is_the_builds(device, expected):
    ctx = BuildContext(model_class=None, model_name_or_path="x", tokenizer=None, stage_settings={"load": LoadSettings(device=device)})
    assert report._cuda_device(ctx) == expected
