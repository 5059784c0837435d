"""Builds in one process are serialized: transformers' loading contexts patch process-global state.

Each build's model class stops inside its own ``__init__``, which transformers runs with
its patches in place (``tie_weights`` a no-op, the default dtype set to the build's), so the
test decides the interleaving instead of the scheduler: without the lock the second build
enters its loading contexts while the first one's patches are active, and when the first
build finishes before the second, ``tie_weights`` stays a no-op for good. (Seen without the
lock: float32 tensors in the bf16 model, and ``tie_weights``, ``torch.linspace`` and the
default dtype (bfloat16) left patched for the rest of the process.)
"""

from __future__ import annotations

import inspect
import sys
import threading
import time

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.integrations import deepspeed as hf_deepspeed

from hfbuilder import ModelBuilder, Stage, StageError
from hfbuilder.locking import build_lock
from hfbuilder.testing import make_tokenizer

INIT_MODULES = ("torch.nn.init", "torch.nn.modules.linear", "torch.nn.modules.sparse", "torch.nn.modules.normalization")


def process_globals() -> dict[str, object]:
    """What transformers' and accelerate's loading contexts patch, as seen now."""
    seen: dict[str, object] = {
        "PreTrainedModel.tie_weights": modeling_utils.PreTrainedModel.tie_weights,
        "PreTrainedModel.init_weights": modeling_utils.PreTrainedModel.init_weights,
        "torch default dtype": torch.get_default_dtype(),
        "torch.linspace": torch.linspace,
        "Module.register_parameter": torch.nn.Module.register_parameter,
        "_is_ds_init_called": modeling_utils._is_ds_init_called,
        "_is_quantized": modeling_utils._is_quantized,
        "_hf_deepspeed_config_weak_ref": hf_deepspeed._hf_deepspeed_config_weak_ref,
    }
    for name in INIT_MODULES:
        module = sys.modules[name]
        for fn in ("normal_", "uniform_", "zeros_", "ones_", "kaiming_uniform_"):
            if hasattr(module, fn):
                seen[f"{name}.{fn}"] = getattr(module, fn)
    return seen


class Gate:
    """Stops a build inside its model's ``__init__`` until released, and logs the order of events."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self.inside, self.go = threading.Event(), threading.Event()

    def model_class(self):
        gate = self

        class Stopping(LlamaForCausalLM):
            @classmethod
            def from_config(cls, config, **kwargs):
                return cls._from_config(config, **kwargs)

            def __init__(self, config):
                if any(f.function == "_meta_architecture" for f in inspect.stack(0)):  # the load stage's check
                    super().__init__(config)
                    return
                gate.log.append(f"{gate.name} inside")
                gate.inside.set()
                assert gate.go.wait(timeout=300), "never released"
                super().__init__(config)

        return Stopping


def blocked_on_the_lock(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_filename.endswith("locking.py"):
            return True
        frame = frame.f_back
    return False


def test_two_threads_building_different_dtypes_get_correct_models(model_dir):
    path = model_dir("llama")
    reference = {dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()
                 for dtype in (torch.bfloat16, torch.float32)}
    before = process_globals()
    log: list[str] = []
    gates = {"bf16": Gate(log, "bf16"), "fp32": Gate(log, "fp32")}
    models: dict[str, torch.nn.Module] = {}
    errors: list[BaseException] = []

    def build(name: str, dtype: str) -> None:
        try:
            models[name] = ModelBuilder(gates[name].model_class(), path, make_tokenizer()).with_dtype(dtype).build()
            log.append(f"{name} done")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            for gate in gates.values():
                gate.go.set()

    first = threading.Thread(target=build, args=("bf16", "bfloat16"))
    second = threading.Thread(target=build, args=("fp32", "float32"))
    first.start()
    assert gates["bf16"].inside.wait(timeout=300)  # the bf16 build is inside transformers' patches
    second.start()
    deadline = time.monotonic() + 300  # a bound for a broken test, not a measurement
    while not (gates["fp32"].inside.is_set() or blocked_on_the_lock(second)) and time.monotonic() < deadline:
        time.sleep(0.01)
    gates["bf16"].go.set()
    first.join(timeout=300)
    gates["fp32"].go.set()
    second.join(timeout=300)
    assert not errors, errors
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        state = models[name].state_dict()
        assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype}
        for key, tensor in reference[dtype].items():
            if key in state and state[key].shape == tensor.shape:  # resize adds rows to the embeddings
                assert torch.equal(state[key], tensor), (name, key)
    assert process_globals() == before
    assert log == ["bf16 inside", "bf16 done", "fp32 inside", "fp32 done"]  # the second waited for the first


@pytest.mark.parametrize("loader", ["transformers", "safetensors"])  # from_pretrained's contexts; the meta build's
def test_a_build_failing_mid_load_leaves_transformers_unpatched(model_dir, loader):
    path = model_dir("llama")
    before = process_globals()

    class Raises(LlamaForCausalLM):
        @classmethod
        def from_config(cls, config, **kwargs):
            return cls._from_config(config, **kwargs)

        def __init__(self, config):  # inside the loading contexts, which patch one of these
            patched = {"transformers": "PreTrainedModel.tie_weights", "safetensors": "PreTrainedModel.init_weights"}
            name = patched[loader]
            assert getattr(modeling_utils.PreTrainedModel, name.split(".")[1]) is not before[name]
            raise RuntimeError("model refused to build")

    class Fails(Stage):
        name = "fails"
        after = ("load",)

        def run(self, ctx):
            raise RuntimeError("stage failed")

    with pytest.raises(StageError, match="model refused to build"):
        ModelBuilder(Raises, path, make_tokenizer()).with_dtype("bfloat16").with_loader(loader).build()
    with pytest.raises(StageError, match="stage failed"):
        ModelBuilder(AutoModelForCausalLM, path, make_tokenizer()).with_dtype("bfloat16").with_loader(loader) \
            .with_stage(Fails).build()
    assert process_globals() == before

    free: list[bool] = []

    def try_lock() -> None:
        with build_lock():
            free.append(True)

    other = threading.Thread(target=try_lock)
    other.start()
    other.join(timeout=300)
    assert free == [True]  # the failed builds released the lock

    tied = AutoModelForCausalLM.from_pretrained(model_dir("qwen2"))  # a plain load ties lm_head again
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
