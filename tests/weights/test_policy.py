"""One checkpoint reader policy on every path: hostile and broken files, written by hand, refused by name.

Every case is a real file on disk: safetensors headers are written byte by byte (8-byte
length, JSON, data), indexes as JSON, pickles with torch.save. Nothing is mocked. The
paths are the plain build (from_pretrained of a local directory), ``with_checkpoint``,
``explain``, ZeRO-3 partition loading and ``hfbuilder inspect``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hfbuilder import CheckpointError, ModelBuilder, Stage, StageError
from hfbuilder.cli import main
from hfbuilder.weights import open_checkpoint
from hfbuilder.zero3 import load_checkpoint_into_partitions

EMBED = "model.embed_tokens.weight"


class Probe(Stage):
    """Runs right after the config stage: if it ran, the error came after work had started."""

    name = "probe"
    after = ("config",)
    ran = False

    def run(self, ctx):
        type(self).ran = True


def write_safetensors(path, entries: dict[str, tuple[str, list[int], bytes]], tail: bytes = b"") -> None:
    """A safetensors file by hand: ``entries`` is key -> (dtype code, shape as declared, data bytes)."""
    header, data = {}, b""
    for key, (dtype, shape, raw) in entries.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + data + tail)


def raw_entries(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int], bytes]]:
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    return {k: (codes[v.dtype], list(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
            for k, v in state.items()}


@pytest.fixture(scope="module")
def llama(model_dir):
    path = model_dir("llama")
    return path, load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture()
def copy_of(llama, tmp_path):
    """A fresh copy of the tiny Llama directory (config, tokenizer) without its weights."""
    def make(name="ckpt"):
        out = tmp_path / name
        shutil.copytree(llama[0], out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
        return out
    return make


def shard(out, state, placement: dict[str, str], index_map: dict[str, str] | None = None) -> None:
    """Write ``state`` split over shards (key -> shard name) and an index (default: the true placement)."""
    for name in sorted(set(placement.values())):
        save_file({k: v.contiguous() for k, v in state.items() if placement[k] == name}, str(out / name))
    weight_map = placement if index_map is None else index_map
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def halves(state) -> dict[str, str]:
    return {k: ("a.safetensors" if i % 2 else "b.safetensors") for i, k in enumerate(sorted(state))}


def plain(path, tokenizer_for, model_dir):
    Probe.ran = False
    return ModelBuilder(AutoModelForCausalLM, str(path), tokenizer_for(model_dir("llama"))).with_stage(Probe)


def every_path_refuses(path, tokenizer_for, model_dir, *needles: str, inspect: bool = True) -> None:
    """The plain build (from check, before any stage ran), with_checkpoint, explain, ZeRO-3 loading and inspect.

    ``inspect=False``: a problem only a model reveals (inspect has none; it shows the dtypes).
    """
    with pytest.raises(CheckpointError) as info:
        plain(path, tokenizer_for, model_dir).build()
    assert not Probe.ran, "refused after work had started"
    messages = [str(info.value)]
    with pytest.raises(CheckpointError) as info:
        plain(path, tokenizer_for, model_dir).with_checkpoint().build()
    messages.append(str(info.value))
    explanation = plain(path, tokenizer_for, model_dir).explain()
    assert not explanation.ok
    messages.append(" ".join(explanation.errors))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into_partitions(AutoModelForCausalLM.from_pretrained(model_dir("llama")), str(path))
    messages.append(str(info.value))
    if inspect:
        assert main(["--quiet", "inspect", str(path)]) == 2
    for message in messages:
        for needle in needles:
            assert needle in message, (needle, message)


# -- shard indexes -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_a_shard_outside_the_checkpoint_directory_is_refused(llama, copy_of, tokenizer_for, model_dir, where):
    _, state = llama
    out = copy_of()
    outside = out.parent / "outside.safetensors"
    placement = halves(state)
    shard(out, state, placement)
    shutil.move(out / "a.safetensors", outside)  # a valid file, so only the policy can refuse it
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "a.safetensors"}[where]
    if where == "symlink":
        os.symlink(outside, out / "a.safetensors")
    key = next(k for k in sorted(placement) if placement[k] == "a.safetensors")
    shard(out, {}, {}, {k: (name if v == "a.safetensors" else v) for k, v in placement.items()})
    every_path_refuses(out, tokenizer_for, model_dir, repr(key), "model.safetensors.index.json", "outside")


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(llama, tmp_path):
    _, state = llama
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abc"
    blobs = tmp_path / "models--org--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    placement = halves(state)
    shard(blobs, state, placement)
    for name in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"):
        os.symlink(os.path.join("..", "..", "blobs", name), snapshot / name)
    with open_checkpoint(snapshot) as reader:
        assert set(reader.keys()) == set(state)


def test_a_tensor_in_two_shards_is_refused(llama, copy_of, tokenizer_for, model_dir):
    _, state = llama
    out = copy_of()
    placement = halves(state)
    shard(out, state, placement)
    key = next(k for k in sorted(placement) if placement[k] == "b.safetensors")  # listed in b, also put in a
    save_file({**{k: v for k, v in state.items() if placement[k] == "a.safetensors"}, key: state[key]},
              str(out / "a.safetensors"))
    every_path_refuses(out, tokenizer_for, model_dir, repr(key), "two shards")


def test_a_tensor_the_index_does_not_list_is_refused(llama, copy_of, tokenizer_for, model_dir):
    _, state = llama
    out = copy_of()
    placement = halves(state)
    shard(out, {**state, "smuggled.weight": torch.zeros(2)}, {**placement, "smuggled.weight": "a.safetensors"},
          index_map=placement)
    every_path_refuses(out, tokenizer_for, model_dir, "'smuggled.weight'", "does not list")


def test_a_listed_tensor_its_shard_lacks_is_refused(llama, copy_of, tokenizer_for, model_dir):
    _, state = llama
    out = copy_of()
    placement = halves(state)
    shard(out, {k: v for k, v in state.items() if k != EMBED}, {k: v for k, v in placement.items() if k != EMBED},
          index_map=placement)
    every_path_refuses(out, tokenizer_for, model_dir, repr(EMBED), "does not hold it")


def test_a_missing_shard_is_refused(llama, copy_of, tokenizer_for, model_dir):
    _, state = llama
    out = copy_of()
    shard(out, state, halves(state))
    os.remove(out / "b.safetensors")
    every_path_refuses(out, tokenizer_for, model_dir, "'b.safetensors'", "does not exist")


@pytest.mark.parametrize("text, needle", [
    ("{not json", "cannot read checkpoint index"),
    ('{"weight_map": ["a.safetensors"]}', 'no "weight_map" object'),
    ('{"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}}', "lists 'x' twice"),
    ('{"weight_map": {"x": 3}}', "not a file name"),
])
def test_a_malformed_index_is_refused(copy_of, tokenizer_for, model_dir, text, needle):
    out = copy_of()
    (out / "model.safetensors.index.json").write_text(text)
    every_path_refuses(out, tokenizer_for, model_dir, "model.safetensors.index.json", needle)


# -- headers -----------------------------------------------------------------------------------


def test_integers_where_the_model_has_floats_are_refused(llama, copy_of, tokenizer_for, model_dir):
    """Same byte size, so safetensors itself accepts it: the values would load as ~1e9 garbage."""
    _, state = llama
    out = copy_of()
    entries = raw_entries(state)
    code, shape, raw = entries[EMBED]
    entries[EMBED] = ("I32", shape, raw)
    write_safetensors(out / "model.safetensors", entries)
    every_path_refuses(out, tokenizer_for, model_dir, EMBED, "int32", "float32", inspect=False)


@pytest.mark.parametrize("how", ["truncated", "shape_lies", "trailing"])
def test_a_header_that_disagrees_with_its_data_is_refused_by_name(llama, copy_of, tokenizer_for, model_dir, how):
    _, state = llama
    out = copy_of()
    entries = raw_entries(state)
    last = list(entries)[-1]
    if how == "shape_lies":
        code, shape, raw = entries[EMBED]
        entries[EMBED] = (code, [shape[0] + 1, *shape[1:]], raw)
    write_safetensors(out / "model.safetensors", entries, tail=b"\0" * 4 if how == "trailing" else b"")
    if how == "truncated":
        with open(out / "model.safetensors", "r+b") as fh:
            fh.truncate(os.path.getsize(out / "model.safetensors") - 10)
    needle = {"truncated": repr(last), "shape_lies": repr(EMBED), "trailing": "after its last tensor"}[how]
    every_path_refuses(out, tokenizer_for, model_dir, "model.safetensors", needle)


def test_a_wrong_shaped_tensor_fails_the_plain_build_in_check(llama, copy_of, tokenizer_for, model_dir):
    _, state = llama
    out = copy_of()
    save_file({**state, EMBED: torch.zeros(45, 8)}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{EMBED}: checkpoint \[45, 8\] vs model \[45, 16\]"):
        plain(out, tokenizer_for, model_dir).build()
    assert not Probe.ran


def test_a_config_without_weights_fails_in_check(copy_of, tokenizer_for, model_dir):
    out = copy_of()
    with pytest.raises(CheckpointError, match="no weights in checkpoint directory"):
        plain(out, tokenizer_for, model_dir).build()
    assert not Probe.ran


# -- pickles ---------------------------------------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_payload_never_runs_and_the_refusal_names_the_global(llama, copy_of, tokenizer_for, model_dir,
                                                                       legacy):
    _, state = llama
    out = copy_of()
    marker = out.parent / "pwned"
    torch.save({**state, "evil": Payload(marker)}, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    needle = "legacy torch.save file" if legacy else "refused io.open"
    every_path_refuses(out, tokenizer_for, model_dir, "pytorch_model.bin", needle)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(out)
    assert "weights_only=False" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None
    assert not marker.exists()


def test_a_legacy_bin_is_refused_without_being_read(llama, copy_of):
    """A legacy file full of valid tensors: refused from its first bytes, not loaded to be summarized."""
    _, state = llama
    out = copy_of()
    torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not in torch's zip format"):
        open_checkpoint(out)


# -- two formats ---------------------------------------------------------------------------------


def test_bin_and_safetensors_that_disagree_say_which_is_used(llama, copy_of, tokenizer_for, model_dir):
    _, state = llama
    out = copy_of()
    save_file(state, str(out / "model.safetensors"))
    torch.save(state, out / "pytorch_model.bin")
    with warnings.catch_warnings(record=True) as record:  # agreeing copies: nothing to say about them
        warnings.simplefilter("always")
        plain(out, tokenizer_for, model_dir).build()
    assert not any("pytorch_model.bin" in str(w.message) for w in record)
    torch.save({**state, EMBED: torch.zeros(45, 16, dtype=torch.bfloat16)}, out / "pytorch_model.bin")
    for builder in (plain(out, tokenizer_for, model_dir), plain(out, tokenizer_for, model_dir).with_checkpoint()):
        with pytest.warns(UserWarning, match="model.safetensors is used and pytorch_model.bin ignored") as record:
            model = builder.build()
        assert any(EMBED in str(w.message) for w in record)
        assert torch.equal(model.get_input_embeddings().weight[:45], state[EMBED])  # the safetensors copy


def test_stage_errors_do_not_wrap_checkpoint_errors(copy_of, tokenizer_for, model_dir):
    out = copy_of()
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError) as info:
        plain(out, tokenizer_for, model_dir).build()
    assert not isinstance(info.value, StageError)
