"""``on_device`` and ``with_dtype``: the weights reach the device in the dtype asked for, with the file's values.

These run with ``device="cpu"``: the load stage takes exactly the same path for ``"cuda"``
(the device goes to ``from_pretrained`` as ``device_map``, so transformers streams each
tensor from the file to the device), which the GPU benchmark measures. The checkpoint stage
(deferred weights) is held to the same rule: it asks its reader for each tensor on the device.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hfbuilder import BuilderInputError, ModelBuilder


@pytest.fixture(scope="module")
def saved(model_dir):
    # vocab 48 = 8 * ceil(45 / 8): the resize stage leaves it, so every weight comes from the file.
    return {
        "float32": model_dir("opt", vocab_size=48),
        "float16": model_dir("llama", vocab_size=48, dtype=torch.float16),
    }


def file_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(f"{path}/model.safetensors", framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def builder(path, tokenizer_for) -> ModelBuilder:
    return ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))


@pytest.mark.parametrize("stored", ["float32", "float16"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_on_device_with_dtype(saved, tokenizer_for, stored, dtype):
    path = saved[stored]
    model, report = builder(path, tokenizer_for).with_dtype(dtype).on_device("cpu").build_with_report()
    want = getattr(torch, dtype)
    on_file = file_tensors(path)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {want}
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert on_file.keys() <= params.keys()
    for name, value in on_file.items():
        # The only change allowed is the cast: a round trip through the file's dtype is exact.
        torch.testing.assert_close(params[name].detach(), value.to(want), rtol=0, atol=0, msg=name)
    assert f"dtype {want}" in " ".join(report.stage("load").actions)


def test_auto_dtype_keeps_the_files_dtype(saved, tokenizer_for):
    model = builder(saved["float16"], tokenizer_for).with_dtype("auto").on_device("cpu").build()
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_device_and_dtype_reach_from_pretrained(saved, tokenizer_for):
    """When from_pretrained reads the files (loader ``transformers``; on a GPU without instanttensor), the
    device is handed to transformers (``device_map``), not applied with ``.to()`` after loading. On the
    CPU the default loader builds with from_config on the meta device and never calls from_pretrained."""
    calls: list[dict] = []
    built: list[dict] = []

    class Recording:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            calls.append(kwargs)
            return AutoModelForCausalLM.from_pretrained(*args, **kwargs)

        @classmethod
        def from_config(cls, *args, **kwargs):
            built.append(kwargs)
            return AutoModelForCausalLM.from_config(*args, **kwargs)

    path = saved["float32"]
    transformers = ModelBuilder(Recording, path, tokenizer_for(path)).with_loader("transformers")
    model = transformers.with_dtype(torch.float16).on_device("cpu").build()
    assert len(calls) == 1
    assert calls[0]["device_map"] == "cpu"
    assert calls[0]["dtype"] is torch.float16
    assert next(model.parameters()).dtype == torch.float16

    calls.clear()
    transformers.build()
    assert "device_map" not in calls[0] and "dtype" not in calls[0]  # transformers' defaults, untouched

    calls.clear()
    built.clear()
    model = ModelBuilder(Recording, path, tokenizer_for(path)).with_dtype(torch.float16).on_device("cpu").build()
    assert calls == [] and any(b.get("dtype") is torch.float16 for b in built)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_options_are_normalized_and_builders_immutable(saved, tokenizer_for):
    base = builder(saved["float32"], tokenizer_for)
    assert base.with_dtype(torch.bfloat16).options["dtype"] == "bfloat16"
    assert base.with_dtype("float16").options["dtype"] == "float16"
    assert base.on_device(torch.device("cuda", 1)).options["device"] == "cuda:1"
    assert base.on_device("cpu").options["device"] == "cpu"
    assert "dtype" not in base.options and "device" not in base.options
    derived = base.with_dtype("float16").on_device("cpu")
    assert derived.with_dtype("float32").options["dtype"] == "float32"
    assert derived.options["dtype"] == "float16"


@pytest.mark.parametrize("bad", ["int8", torch.int8, "fp16"])
def test_bad_dtype(saved, tokenizer_for, bad):
    with pytest.raises(BuilderInputError, match="dtype"):
        builder(saved["float32"], tokenizer_for).with_dtype(bad)


@pytest.mark.parametrize("bad", ["", "gpu", "tpu:0"])
def test_bad_device(saved, tokenizer_for, bad):
    with pytest.raises(BuilderInputError, match="device"):
        builder(saved["float32"], tokenizer_for).on_device(bad)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_stage_reads_straight_onto_the_device(tmp_path, saved, tokenizer_for, monkeypatch, fmt):
    """The critic path: every tensor is asked of the reader on ``options["device"]``, not moved after."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    from hfbuilder.weights import CheckpointReader

    path = saved["float32"]
    tok = tokenizer_for(path)
    reward = ModelBuilder(AutoModel, path, tok).with_head("reward", num_padding_at_beginning=1).build()
    state = {k: v.detach().clone() for k, v in reward.state_dict().items()}
    out = tmp_path / "step2"
    reward.config.save_pretrained(out)
    tok.save_pretrained(out)
    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, str(out / "model.safetensors"))

    asked: list[object] = []
    real_get = CheckpointReader.get

    def get(self, key, device=None):
        asked.append(device)
        return real_get(self, key, device=device)

    monkeypatch.setattr(CheckpointReader, "get", get)
    critic = (
        ModelBuilder(AutoModel, out, tok)
        .with_head("reward", num_padding_at_beginning=1)
        .with_checkpoint()
        .with_dtype("float16")
        .on_device("cpu")
        .build()
    )
    assert asked and set(asked) == {"cpu"}
    assert {t.device.type for t in critic.state_dict().values()} == {"cpu"}
    assert {p.dtype for p in critic.parameters()} == {torch.float16}
    for name, value in critic.state_dict().items():
        torch.testing.assert_close(value, state[name].to(torch.float16), rtol=0, atol=0, msg=name)
