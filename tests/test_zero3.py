"""ZeRO-3: every parameter partitioned, ranks consistent, one dtype, global state scoped.

The ``zero3``-marked tests run real DeepSpeed on CPU (gloo) as separate processes, world
size 1 and 2, through :mod:`zero3_harness`; each launch runs many checks, so the whole
set costs a few launches. The rest runs in-process and needs no distributed set-up.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hfbuilder
from hfbuilder import BuilderInputError, CheckpointError, DistributedSetupError, ModelBuilder
from hfbuilder.weights import LoadPlan, TensorInfo, match_keys, open_checkpoint
from hfbuilder.zero3 import LAUNCHER_VARS, ds_dtype_name, load_checkpoint_into_partitions

try:  # tests/ is a package on main
    from .zero3_harness import HeadPlugin, run_ranks
except ImportError:  # pragma: no cover - tests/ as plain rootdir modules
    from zero3_harness import HeadPlugin, run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "zero3_worker.py")
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10_000,
      "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}


def _hf_ds():
    from transformers.integrations import deepspeed as hf_ds

    return hf_ds


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_inputs(model_dir, tmp_path_factory):
    """Saved tiny models (untied Llama, tied OPT), a .bin copy, and a model+head checkpoint
    written by a plain (non-ZeRO) build."""
    llama, opt = model_dir("llama"), model_dir("opt")
    root = tmp_path_factory.mktemp("zero3")
    bin_dir = root / "llama-bin"
    shutil.copytree(llama, bin_dir)
    model = AutoModelForCausalLM.from_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    os.remove(bin_dir / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(llama)
    head_model = ModelBuilder(AutoModel, llama, tok).with_plugin(HeadPlugin()).with_head("test_value").build()
    head_ckpt = root / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head_model.state_dict().items()}, head_ckpt)
    # A DeepSpeed-Chat step-2 output: an OPT reward model's state dict (rwtransformer.*, v_head.weight).
    critic_dir = root / "critic"
    shutil.copytree(opt, critic_dir)
    reward = ModelBuilder(AutoModel, opt, AutoTokenizer.from_pretrained(opt)).for_phase(
        "reward", num_padding_at_beginning=1).build()
    torch.nn.init.normal_(reward.v_head.weight)
    save_file({k: v.contiguous() for k, v in reward.state_dict().items()}, critic_dir / "model.safetensors")
    # The same step-2 output with the vocabulary from before the resize (45 rows, as config.json says).
    critic_pre_dir = root / "critic-preresize"
    shutil.copytree(opt, critic_pre_dir)
    state = {k: (v[:45] if "embed_tokens" in k else v).contiguous() for k, v in reward.state_dict().items()}
    save_file(state, critic_pre_dir / "model.safetensors")
    return {"lm_dirs": {"llama": llama, "opt": opt}, "bin_dir": str(bin_dir), "head_dir": llama,
            "head_ckpt": str(head_ckpt), "critic_dir": str(critic_dir), "critic_pre_dir": str(critic_pre_dir),
            "ds": DS, "root": root}


def _spec(inputs, checks, **extra):
    return {**{k: v for k, v in inputs.items() if k != "root"}, "checks": checks, **extra}


def _ok(results, check):
    for r in results:
        assert r[check]["ok"], f"rank {r['rank']} check {check!r} failed:\n{r[check]['error']}"
    return [r[check] for r in results]


# -- real DeepSpeed, world size 2 ---------------------------------------------------------------

WORLD2_CHECKS = ["lm_llama", "lm_opt", "bin", "head", "checkpoint", "global_state", "stage2", "train_lm", "train_head",
                 "critic", "critic_rank0", "critic_preresize", "train_reward"]


@pytest.fixture(scope="module")
def world2(zero3_inputs):
    """One launch of two ranks that did not initialize distributed themselves (the builder does)."""
    return run_ranks(WORKER, _spec(zero3_inputs, WORLD2_CHECKS), 2, zero3_inputs["root"], timeout=300)


@pytest.fixture(scope="module")
def world1(zero3_inputs):
    """One rank that called deepspeed.init_distributed() itself before building."""
    checks = ["lm_llama", "head", "checkpoint", "global_state", "train_head", "local_rank"]
    return run_ranks(WORKER, _spec(zero3_inputs, checks, preinit=True), 1, zero3_inputs["root"], timeout=240)


def _assert_partitioned(facts):
    assert facts["unpartitioned"] == []
    assert facts["dtypes"] == ["torch.bfloat16"]


@pytest.mark.zero3
@pytest.mark.parametrize("family", ["lm_llama", "lm_opt"])
def test_causal_lm_partitioned_consistent_and_equal_to_checkpoint(world2, family):
    ranks = _ok(world2, family)
    assert [r["initialized_before_first_build"] for r in world2] == [False, False]
    for facts in ranks:
        _assert_partitioned(facts)
        assert facts["partition_loader"], "the safetensors fast path should have been taken"
        for matrix in facts["matrices"].values():
            assert matrix["rows"] == 48  # 45 tokens, rounded up to a multiple of 8
            assert matrix["old_rows_equal_checkpoint"]
            assert matrix["new_rows_finite"]
        assert facts["max_logit_diff"] < 1e-2
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["tied"] is (family == "lm_opt")
    resized = [k for k, v in ranks[0]["provenance"].items() if "resized[45:48]" in v]
    assert any("embed_tokens" in k for k in resized), resized
    assert ranks[0]["tied"] or any("lm_head" in k for k in resized), resized  # a tied head may be listed once


@pytest.mark.zero3
def test_bin_checkpoint_uses_transformers_loader_and_is_partitioned(world2):
    ranks = _ok(world2, "bin")
    for facts in ranks:
        _assert_partitioned(facts)
        assert not facts["partition_loader"]
        assert facts["old_rows_equal_checkpoint"]
    assert ranks[0]["digests"] == ranks[1]["digests"]


@pytest.mark.zero3
def test_head_added_by_plugin_is_partitioned_in_config_dtype(world2):
    ranks = _ok(world2, "head")
    for facts in ranks:
        _assert_partitioned(facts)
        assert any("v_head.weight" in note for note in facts["head_notes"])
    assert ranks[0]["digests"] == ranks[1]["digests"]  # the fp32 head, broadcast from rank 0


@pytest.mark.zero3
def test_checkpoint_loaded_into_partitions(world2):
    ranks = _ok(world2, "checkpoint")
    for facts in ranks:
        for label in ("sliced", "get_only"):
            loaded = facts[label]
            _assert_partitioned(loaded)
            assert loaded["equal_checkpoint"] == loaded["keys"]
            assert "v_head.weight" in loaded["keys"]
        errors = facts["errors"]
        assert "missing from the checkpoint (1): v_head.weight" in errors["missing"]
        assert "unexpected in the checkpoint (1): v_head.bias" in errors["unexpected"]
        assert "shape mismatch" in errors["shape"]
    assert ranks[0]["sliced"]["digests"] == ranks[1]["sliced"]["digests"]
    for facts in ranks:
        assert facts["partial"] == {"old_rows_from_checkpoint": True, "new_rows_kept": True, "others_equal": True}


@pytest.mark.zero3
def test_global_state_is_scoped_to_the_build(world2):
    for facts in _ok(world2, "global_state"):
        assert facts["after_earlier_builds"] is False
        assert facts["plain_after_zero3"]["unpartitioned"]  # a plain build: nothing partitioned
        assert facts["plain_after_zero3"]["dtypes"] == ["torch.float32"]
        assert facts["callers_config_restored"] is True
        assert facts["zero3_during_build"] is True
        assert "boom" in facts["error"]
        assert facts["after_error"] is False and facts["weak_ref_after_error"] is True


@pytest.mark.zero3
def test_stage2_config_builds_like_no_zero3(world2):
    for facts in _ok(world2, "stage2"):
        assert len(facts["unpartitioned"]) == facts["n_params"]
        assert facts["zero3_after"] is False


@pytest.mark.zero3
@pytest.mark.parametrize("check", ["train_lm", "train_head", "train_reward"])
def test_deepspeed_initialize_and_train(world2, check):
    ranks = _ok(world2, check)
    losses = ranks[0]["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the same batch on both ranks, one model
    if check == "train_lm":  # generate(synced_gpus=True) with ranks stopping at different lengths
        assert [r["generated_shape"] for r in ranks] == [[2, 6], [2, 8]]


@pytest.mark.zero3
def test_critic_reward_model_loaded_into_partitions(world2):
    ranks = _ok(world2, "critic")
    for facts in ranks:
        assert facts["type"] == "RewardModel"
        _assert_partitioned(facts)  # v_head included, in the config's dtype
        assert facts["equal_checkpoint"] == facts["keys"]  # every tensor, v_head too, is the checkpoint's
        assert "v_head.weight" in facts["keys"] and facts["v_head"] == "checkpoint"
    assert ranks[0]["digests"] == ranks[1]["digests"]


@pytest.mark.zero3
def test_critic_from_a_checkpoint_saved_before_the_resize(world2, zero3_inputs):
    """45 rows in the file, 48 after the resize: the old rows are the checkpoint's, the new ones their mean,
    exactly as the same build makes them off ZeRO-3."""
    import hashlib

    ranks = _ok(world2, "critic_preresize")
    path = zero3_inputs["critic_pre_dir"]
    plain = ModelBuilder(AutoModel, path, AutoTokenizer.from_pretrained(path)).for_phase(
        "critic", num_padding_at_beginning=1).with_dtype("bfloat16").build()
    want = {k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]
            for k, v in plain.named_parameters(remove_duplicate=False)}
    for facts in ranks:
        _assert_partitioned(facts)
        assert facts["rows"] == 48 and facts["new_rows_are_the_mean"]
        assert facts["provenance"] == "checkpoint+resized[45:48]"
        assert any("filled rows added by resize, which the checkpoint lacks, with the mean" in n for n in facts["notes"])
        assert facts["digests"] == want


@pytest.mark.zero3
def test_rank0_reads_for_every_rank_when_asked(world2):
    """zero3_read="rank0": rank 0 reads each tensor and scatters the slices; the model is the same."""
    plain, scattered = _ok(world2, "critic"), _ok(world2, "critic_rank0")
    for rank, (a, b) in enumerate(zip(plain, scattered, strict=True)):
        _assert_partitioned(b)
        assert b["digests"] == a["digests"], f"rank {rank}"
        assert any("read on rank 0 and scattered" in note for note in b["notes"])
        assert any("GB into this rank in" in note for note in b["notes"])  # the report's throughput
    assert scattered[0]["reads"] > 0 and scattered[1]["reads"] == 0, scattered[1]["read_keys"]  # rank 1 reads no data



# -- real DeepSpeed, world size 1, distributed initialized by the caller -------------------------


@pytest.mark.zero3
def test_world_size_one_with_distributed_initialized_by_caller(world1):
    (r,) = world1
    assert r["initialized_before_first_build"] is True
    for check in ("lm_llama", "head"):
        _assert_partitioned(_ok(world1, check)[0])
    (ckpt,) = _ok(world1, "checkpoint")
    assert ckpt["sliced"]["equal_checkpoint"] == ckpt["sliced"]["keys"]
    (state,) = _ok(world1, "global_state")
    assert state["callers_config_restored"] and not state["after_error"]
    (trained,) = _ok(world1, "train_head")
    assert trained["losses"][-1] < trained["losses"][0]
    (local,) = _ok(world1, "local_rank")
    assert "LOCAL_RANK" in local["error"]


# -- in-process: no distributed set-up needed -----------------------------------------------------


class _Probe(hfbuilder.Stage):
    name = "probe"
    after = ("config",)
    ran = False

    def run(self, ctx):
        type(self).ran = True


def test_missing_launcher_vars_raise_in_check_before_any_stage(model_dir, tokenizer_for, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    path = model_dir("llama")
    _Probe.ran = False
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_zero3(DS).with_stage(_Probe)
    with pytest.raises(DistributedSetupError) as info:
        builder.build()
    message = str(info.value)
    for var in LAUNCHER_VARS:
        assert var in message
    assert "torchrun" in message and "deepspeed.init_distributed()" in message
    assert not _Probe.ran
    assert not _hf_ds().is_deepspeed_zero3_enabled()


def test_stage2_config_needs_no_distributed(model_dir, tokenizer_for, monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    path = model_dir("llama")
    cfg = {**DS, "zero_optimization": {"stage": 2}}
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_deepspeed(cfg).build()
    assert not any(hasattr(p, "ds_id") for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert _hf_ds()._hf_deepspeed_config_weak_ref is None


def test_dtype_contradicting_the_zero3_config_is_an_input_error(model_dir, tokenizer_for):
    path = model_dir("llama")
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_zero3(DS).with_dtype("float16")
    with pytest.raises(BuilderInputError, match="bfloat16"):
        builder.build()


@pytest.mark.parametrize(
    ("cfg", "dtype"),
    [({"bf16": {"enabled": True}}, "bfloat16"), ({"fp16": {"enabled": "auto"}}, "float16"),
     ({"bf16": {"enabled": False}}, "float32"), ({}, "float32")],
)
def test_ds_dtype_name(cfg, dtype):
    assert ds_dtype_name(cfg) == dtype


def test_safetensors_reader_reads_rows_of_files_indexes_and_directories(model_dir, tmp_path):
    path = model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(open_checkpoint(sharded).files) > 1
    for source in (path, os.path.join(path, "model.safetensors"), sharded, sharded / "model.safetensors.index.json"):
        reader = open_checkpoint(source)
        assert set(reader.keys()) == set(model.state_dict())
        w = model.get_input_embeddings().weight
        assert reader.info("model.embed_tokens.weight").shape == tuple(w.shape)
        assert torch.equal(reader.get_slice("model.embed_tokens.weight")[3:7], w[3:7].detach())
        assert torch.equal(reader.get("model.embed_tokens.weight"), w.detach())
    with pytest.raises(CheckpointError, match="no weights in checkpoint directory"):
        open_checkpoint(tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        open_checkpoint(tmp_path / "broken.safetensors")


def test_strict_keys_list_missing_unexpected_and_mismatched(model_dir, tmp_path):
    path = model_dir("opt")  # tied LM head: lm_head.weight is not in the checkpoint, and need not be
    model = AutoModelForCausalLM.from_pretrained(path)
    reader = open_checkpoint(path)
    assert len(match_keys(model, reader).sources) == len({id(t) for t in model.state_dict(keep_vars=True).values()}) == 36
    tensors = {k: reader.get(k) for k in reader.keys()}
    del tensors["model.decoder.final_layer_norm.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["model.decoder.layers.0.fc1.bias"] = torch.zeros(3)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into_partitions(model, tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "missing from the checkpoint (1): model.decoder.final_layer_norm.bias" in message
    assert "unexpected in the checkpoint (1): extra.weight" in message
    assert "model.decoder.layers.0.fc1.bias: checkpoint [3] vs model [32]" in message


def test_load_into_an_unpartitioned_model_copies_everything(model_dir):
    path = model_dir("llama")
    source = AutoModelForCausalLM.from_pretrained(path)
    target = AutoModelForCausalLM.from_config(source.config)
    load_checkpoint_into_partitions(target, path)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_reader_must_follow_the_protocol():
    with pytest.raises(BuilderInputError, match="keys"):
        load_checkpoint_into_partitions(torch.nn.Linear(2, 2), object())


class _InfoReader:
    """The reader protocol, implemented outside hfbuilder: whole tensors, sliced in memory."""

    def __init__(self, path):
        self.reader = open_checkpoint(path)

    def keys(self):
        return self.reader.keys()

    def info(self, key):
        return TensorInfo(self.reader.info(key).shape, self.reader.info(key).dtype)

    def get(self, key, device=None):
        return self.reader.get(key)

    def get_slice(self, key):
        return self.get(key)


def test_sources_and_partial_rows_as_the_checkpoint_stage_passes_them(model_dir):
    path = model_dir("llama")
    source = AutoModelForCausalLM.from_pretrained(path)
    target = AutoModelForCausalLM.from_config(source.config)
    target.resize_token_embeddings(48, mean_resizing=False)
    grown = {n: p.detach().clone() for n, p in target.named_parameters() if p.shape[0] == 48}
    names = {n: n for n in source.state_dict()}
    partial = {n: (45, 48) for n in grown}
    load_checkpoint_into_partitions(target, _InfoReader(path), LoadPlan(sources=names, partial_rows=partial))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name][: value.shape[0]], value), name
    for name, value in grown.items():
        assert torch.equal(target.state_dict()[name][45:], value[45:]), name
    with pytest.raises(CheckpointError, match="does not have"):
        load_checkpoint_into_partitions(target, _InfoReader(path), LoadPlan(sources={"nope.weight": "x"}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_resized_rows_draws_like_transformers(model_dir, dtype):
    """Chunked statistics, transformers' distribution: with the same seed, the same rows
    up to float summation order."""
    from hfbuilder.zero3 import mean_resized_rows

    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    old = torch.nn.Embedding(45, 16, dtype=dtype)
    old.weight.data.copy_(model.get_input_embeddings().weight.data)
    theirs = torch.nn.Embedding(5, 16, dtype=dtype)
    torch.manual_seed(1)
    model._init_added_embeddings_weights_with_mean(old, theirs, 45, 5)
    torch.manual_seed(1)
    ours = mean_resized_rows(old.weight.data, 5, chunk_bytes=7 * 64)  # 7 rows a chunk: several chunks
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs.weight.data, rtol=0, atol=1e-6)
