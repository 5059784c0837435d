"""The checkpoint stage and its reader: round trips, strict keys, no pickle, tied weights, grown vocabularies."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from hfbuilder import CheckpointError, ModelBuilder
from hfbuilder.testing import PAD_ID
from hfbuilder.weights import open_checkpoint

from .conftest import REWARD_FAMILIES as FAMILIES


def step2_dir(tmp_path, model, tok, fmt: str, state: dict | None = None) -> str:
    """A DeepSpeed-Chat step-2 output: the RewardModel's state dict, its config, the tokenizer."""
    out = tmp_path / f"step2-{fmt}"
    out.mkdir(exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in (state or model.state_dict()).items()}
    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(out / "config.json"))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def trained(reward_models):
    """Reward models as step 2 leaves them (pretrained base, v_head set to non-default values)."""
    out = {}
    for family, (rm, npb, _, tok) in reward_models.items():
        with torch.no_grad():
            rm.v_head.weight.copy_(torch.linspace(-1, 1, rm.v_head.weight.numel()).view_as(rm.v_head.weight))
        out[family] = (rm, npb, tok)
    return out


def critic(path, tok, npb, **kw):
    from transformers import AutoModel

    return ModelBuilder(AutoModel, path, tok).with_head("reward", num_padding_at_beginning=npb).with_checkpoint(**kw)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("family", [f for f, _ in FAMILIES])
def test_round_trip(tmp_path, trained, family, fmt):
    rm, npb, tok = trained[family]
    path = step2_dir(tmp_path, rm, tok, fmt)
    model, report = critic(path, tok, npb).build_with_report()
    assert report.plan[-2:] == ["checkpoint", "materialize"]
    want, got = rm.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert set(report.provenance.values()) == {"checkpoint"}
    # Non-persistent buffers (rotary inv_freq) are computed by the model, as from_pretrained does, not warned about.
    assert report.stage("materialize").actions[-1] == "every tensor was filled; nothing to initialize"
    assert not report.warnings
    built_buffers = dict(model.named_buffers())
    for name, buffer in rm.named_buffers():
        assert torch.equal(built_buffers[name], buffer), name
    ids = torch.tensor([[PAD_ID] * npb + [5, 6, 7, 3, 0], [PAD_ID] * npb + [5, 8, 3, 0, 0]])
    model.eval()
    torch.testing.assert_close(model(ids)["loss"], rm(ids)["loss"], rtol=0, atol=0)


def test_safetensors_is_preferred_and_memory_mapped(tmp_path, trained):
    rm, npb, tok = trained["llama"]
    path = step2_dir(tmp_path, rm, tok, "safetensors")
    torch.save({"garbage": torch.zeros(1)}, os.path.join(path, "pytorch_model.bin"))  # would fail strictness
    model = critic(path, tok, npb).build()
    assert torch.equal(model.v_head.weight, rm.v_head.weight)
    copied = critic(path, tok, npb).with_options(checkpoint_mmap=False).build()
    assert torch.equal(copied.v_head.weight, rm.v_head.weight)


def test_sharded_safetensors_and_bin(tmp_path, trained):
    rm, npb, tok = trained["gpt_neox"]
    state = {k: v.detach().clone() for k, v in rm.state_dict().items()}
    keys = sorted(state)
    half = {k: ("part-1" if i % 2 else "part-2") for i, k in enumerate(keys)}
    for fmt, ext, save in (("safetensors", "safetensors", save_file), ("bin", "bin", torch.save)):
        out = tmp_path / f"sharded-{fmt}"
        out.mkdir()
        weight_map = {k: f"{half[k]}.{ext}" for k in keys}
        for shard in ("part-1", "part-2"):
            save({k: state[k] for k in keys if half[k] == shard}, str(out / f"{shard}.{ext}"))
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        rm.config.to_json_file(str(out / "config.json"))
        model = critic(str(out), tok, npb).build()
        for key, value in rm.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (fmt, key)


def test_strict_errors_list_every_problem(tmp_path, trained):
    rm, npb, tok = trained["opt"]
    state = dict(rm.state_dict())
    del state["v_head.weight"]
    state["rwtransformer.decoder.extra.weight"] = torch.zeros(2)
    name = "rwtransformer.decoder.final_layer_norm.weight"
    state[name] = torch.zeros(3)
    path = step2_dir(tmp_path, rm, tok, "safetensors", state)
    with pytest.raises(CheckpointError) as info:
        critic(path, tok, npb).build()
    text = str(info.value)
    assert "missing from the checkpoint (1): v_head.weight" in text
    assert "unexpected in the checkpoint (1): rwtransformer.decoder.extra.weight" in text
    assert f"{name}: checkpoint [3] vs model [16]" in text


def test_bare_model_checkpoint_gets_a_prefix_hint(tmp_path, model_dir, tokenizer_for):
    path = model_dir("llama")
    with pytest.raises(CheckpointError, match="holds no reward/critic value head"):  # the layout stage's refusal
        critic(path, tokenizer_for(path), 0).build()
    with pytest.raises(CheckpointError, match="model has 'rwtransformer.' where the checkpoint has 'model.'"):
        critic(path, tokenizer_for(path), 0).without_stage("reward_layout").build()


def test_non_strict_initializes_what_is_missing_and_says_so(tmp_path, trained):
    rm, npb, tok = trained["llama"]
    state = {k: v for k, v in rm.state_dict().items() if k != "v_head.weight"}
    path = step2_dir(tmp_path, rm, tok, "safetensors", state)
    with pytest.warns(UserWarning) as record:
        model, report = critic(path, tok, npb, strict=False).build_with_report()
    messages = [str(w.message) for w in record]
    assert any("lacks 1 tensor" in m for m in messages)
    assert any("were initialized: v_head.weight" in m for m in messages)
    assert report.provenance["v_head.weight"] == "initialized"
    assert "v_head.weight" in " ".join(report.stage("materialize").actions)
    assert torch.isfinite(model.v_head.weight).all() and model.v_head.weight.abs().sum() > 0
    for key, value in state.items():  # nothing that was loaded was re-initialized
        assert torch.equal(model.state_dict()[key], value), key


def test_pickle_payload_is_refused_and_never_runs(tmp_path, trained):
    rm, npb, tok = trained["opt"]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = dict(rm.state_dict())
    state["evil"] = Payload()
    path = step2_dir(tmp_path, rm, tok, "bin", state={k: v for k, v in state.items() if k != "evil"})
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused.*never executes pickled code"):
        critic(path, tok, npb).build()
    assert not marker.exists()


def test_tied_weights_are_not_missing_and_stay_tied(tmp_path, model_dir, tokenizer_for):
    from transformers import AutoModelForCausalLM

    path = model_dir("opt")
    tok = tokenizer_for(path)
    lm = ModelBuilder(AutoModelForCausalLM, path, tok).build()
    out = tmp_path / "sft"
    lm.save_pretrained(str(out))  # safetensors without lm_head.weight (tied)
    assert "lm_head.weight" not in open_checkpoint(str(out)).keys()
    model = ModelBuilder(AutoModelForCausalLM, str(out), tok).with_checkpoint().build()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)


def test_rows_added_by_resize_are_filled_with_the_mean(tmp_path, model_dir, tokenizer_for):
    from transformers import AutoModelForCausalLM

    path = model_dir("gpt_neox")  # vocab 45, tokenizer 45 -> resized to 48
    tok = tokenizer_for(path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, report = ModelBuilder(AutoModelForCausalLM, path, tok).with_checkpoint().build_with_report()
    assert not any("initialized" in str(w.message) for w in record)  # grown rows are a resize, not a gap
    for new, old in ((model.get_input_embeddings(), lm.get_input_embeddings()),
                     (model.get_output_embeddings(), lm.get_output_embeddings())):
        assert new.weight.shape[0] == 48
        assert torch.equal(new.weight[:45], old.weight)
        torch.testing.assert_close(new.weight[45:], old.weight.mean(0, keepdim=True).expand(3, -1))
    assert report.provenance["gpt_neox.embed_in.weight"] == "checkpoint+resized[45:48]"


@pytest.mark.parametrize("dtype, expected", [(None, torch.float16), ("float32", torch.float32), ("auto", torch.float16)])
def test_dtype_follows_options_then_checkpoint(tmp_path, model_dir, tokenizer_for, dtype, expected):
    from transformers import AutoModelForCausalLM

    path = model_dir("llama", dtype=torch.float16)
    tok = tokenizer_for(path)
    builder = ModelBuilder(AutoModelForCausalLM, path, tok).with_checkpoint()
    if dtype is not None:
        builder = builder.with_dtype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = builder.build()
    assert {p.dtype for p in model.parameters()} == {expected}


def test_missing_checkpoint_fails_before_any_work(tmp_path, model_dir, tokenizer_for):
    from transformers import AutoModel

    path = model_dir("opt")
    empty = tmp_path / "empty"
    empty.mkdir()
    builder = ModelBuilder(AutoModel, path, tokenizer_for(path)).with_checkpoint(str(empty))
    with pytest.raises(CheckpointError, match="looked for model.safetensors") as info:
        builder.build_with_report()
    assert "pytorch_model.bin" in str(info.value)
    with pytest.raises(CheckpointError, match="neither a file nor a directory"):
        ModelBuilder(AutoModel, path, tokenizer_for(path)).with_checkpoint("org/some-hub-name").build()


def test_reader_keys_shapes_slices(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.save(tensors, tmp_path / "weights.bin")
    for target in (str(tmp_path), str(tmp_path / "weights.bin")):
        with open_checkpoint(target) as reader:
            assert sorted(reader.keys()) == ["a", "b"] and "a" in reader and len(reader) == 2
            assert reader.info("a").shape == (3, 4) and reader.info("b").dtype == "bfloat16"
            assert torch.equal(reader.get_slice("a")[1:2], tensors["a"][1:2])
            assert reader.get_slice("a").get_shape() == [3, 4]
            assert torch.equal(reader.get("b"), tensors["b"])
            with pytest.raises(CheckpointError, match="no tensor 'c'"):
                reader.get("c")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        open_checkpoint(tmp_path / "list.bin")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="cannot tell the format"):
        open_checkpoint(tmp_path / "weights.txt")
