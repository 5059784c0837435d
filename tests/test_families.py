"""Today's families (Qwen3, Qwen3-MoE, Mixtral, Gemma-2/3, Phi-3, Mistral) through every kind of build.

In-process: the plain build equals DeepSpeed-Chat's, the critic round-trips a step-2
checkpoint, tied embeddings stay one tensor in deferred builds, and the ``moe`` plugin plans
ZeRO-3 leaf modules. Under real DeepSpeed (``zero3``): every family's ZeRO-3 build gathered
equals ``from_pretrained``, and trains with different inputs on each rank; LoRA under bf16
ZeRO-3; an MoE whose experts are called one by one trains because its block is a leaf. All
ZeRO-3 cases share one launch of two ranks.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hfbuilder
from hfbuilder import InvariantError, ModelBuilder, PluginError
from hfbuilder.plugins.moe import plan_leaves, routed_expert_blocks
from hfbuilder.testing import LOOPED_MOE, MODERN_FAMILIES, MOE_FAMILIES, PAD_ID, looped_moe_classes, make_config

from .dschat_reference import dschat_create_hf_model
from .zero3_harness import LoopedMoeLeafPlugin, run_ranks

WORKER = os.path.join(os.path.dirname(__file__), "families_worker.py")
# DeepSpeed's own default leaf list (three transformers MoE blocks) is emptied, so the fused
# families train with no leaf at all and the looped MoE only with the one hfbuilder sets.
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10_000,
      "zero_optimization": {"stage": 3, "leaf_module": {"classes": []}}, "bf16": {"enabled": True}}
TIED = ("qwen3", "gpt2")  # the tied-embedding invariant's two witnesses
LORA = ("qwen3", "qwen3_moe")  # one dense, one MoE family


@pytest.fixture(scope="module")
def dirs(model_dir):
    return {f: model_dir(f) for f in (*MODERN_FAMILIES, "gpt2")} | {"looped_moe": model_dir(LOOPED_MOE)}


# -- plain builds --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODERN_FAMILIES)
def test_plain_build_equals_from_pretrained_and_dschat_resize(family, dirs, tokenizer_for):
    path = dirs[family]
    tok = tokenizer_for(path)
    ours = ModelBuilder(AutoModelForCausalLM, path, tok).build()
    ref = dschat_create_hf_model(AutoModelForCausalLM, path, tok)
    assert type(ours) is type(ref) and ours.config.model_type == family
    rows = 8 * math.ceil(len(tok) / 8)
    old = AutoConfig.from_pretrained(path).vocab_size
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    for name, want in theirs.items():
        got = mine[name]
        assert got.shape == want.shape, name
        if got.shape[0] == rows != old:  # mean-resized rows are random; the old rows are the checkpoint's
            assert torch.equal(got[:old], want[:old]), name
            assert torch.isfinite(got).all(), name
        else:
            assert torch.equal(got, want), name
    assert ours.get_input_embeddings().weight.shape[0] == rows
    tied = getattr(ours.config, "tie_word_embeddings", False)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) is tied


def test_the_tiny_configs_keep_each_familys_features():
    qwen3, moe, mixtral = make_config("qwen3"), make_config("qwen3_moe"), make_config("mixtral")
    assert qwen3.tie_word_embeddings and qwen3.head_dim == 8
    assert (moe.num_experts, moe.num_experts_per_tok, mixtral.num_local_experts) == (4, 2, 4)
    for family in ("gemma2", "gemma3_text"):
        cfg = make_config(family)
        assert cfg.layer_types == ["sliding_attention", "full_attention"] and cfg.sliding_window == 4
    assert make_config("mistral").sliding_window == 4
    assert set(MOE_FAMILIES) < set(MODERN_FAMILIES)


# -- the critic phase ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODERN_FAMILIES)
def test_critic_round_trips_a_step2_checkpoint(family, dirs, tokenizer_for, tmp_path):
    """DeepSpeed-Chat step 2 saves the RewardModel's state dict (rwtransformer.*, v_head.weight)."""
    path = dirs[family]
    tok = tokenizer_for(path)
    reward = ModelBuilder(AutoModel, path, tok).for_phase("reward").build().eval()
    with torch.no_grad():
        reward.v_head.weight.copy_(torch.linspace(-1, 1, reward.v_head.weight.numel()).view_as(reward.v_head.weight))
    save_file({k: v.detach().clone().contiguous() for k, v in reward.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reward.config.to_json_file(str(tmp_path / "config.json"))
    tok.save_pretrained(str(tmp_path))

    critic, report = ModelBuilder(AutoModel, str(tmp_path), tok).for_phase("critic").build_with_report()
    want, got = reward.state_dict(), critic.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert set(report.provenance.values()) == {"checkpoint"}
    ids = torch.tensor([[5, 6, 7, 3, PAD_ID], [5, 8, 3, PAD_ID, PAD_ID]])
    torch.testing.assert_close(critic.eval()(ids)["loss"], reward(ids)["loss"], rtol=0, atol=0)


# -- tied embeddings -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TIED)
def test_tied_embeddings_stay_one_tensor_in_a_deferred_build(family, dirs, tokenizer_for):
    path = dirs[family]
    model, report = (ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))
                     .deferred_weights().with_checkpoint(path).build_with_report())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert {r.name: r.passed for r in report.invariants}["tied"] is True
    # the whole gradient reaches the embedding: the head's share and the lookup's
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and bool(grad[40:].abs().sum() > 0)  # rows never looked up get the head's gradient


class _Untie(hfbuilder.Stage):
    """A stage that copies the LM head, as a careless resize or loader would."""

    name = "untie"
    after = ("resize",)

    def run(self, ctx):
        head = ctx.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())


@pytest.mark.parametrize("family", TIED)
def test_an_untied_copy_breaks_the_tied_invariant(family, dirs, tokenizer_for):
    path = dirs[family]
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).deferred_weights().with_checkpoint(path)
    with pytest.raises(InvariantError, match=r"tied: .*lm_head\.weight.*separate tensor"):
        builder.with_stage(_Untie).build()
    with pytest.warns(hfbuilder.InvariantWarning, match="tied failed"):
        model, report = builder.with_stage(_Untie).with_options(invariants="warn").build_with_report()
    assert {r.name: r.passed for r in report.invariants}["tied"] is False
    untied = ModelBuilder(AutoModelForCausalLM, dirs["mistral"], tokenizer_for(dirs["mistral"])).with_stage(_Untie)
    assert {r.name: r.passed for r in untied.build_with_report()[1].invariants}["tied"] is True  # nothing to tie


# -- MoE leaf modules, planned in-process ----------------------------------------------------------


def _zero3_explain(path, tok, *plugins, config=DS):
    builder = ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(config)
    for plugin in plugins:
        builder = builder.with_plugin(plugin)
    return builder.explain(world_size=2)


def test_explain_lists_leaf_classes_and_warns_about_unguarded_experts(dirs, tokenizer_for):
    path = dirs["looped_moe"]
    tok = tokenizer_for(path)
    guarded = _zero3_explain(path, tok, LoopedMoeLeafPlugin())
    row = next(s for s in guarded.stages if s.name == "after:load")
    assert "hfbuilder.plugins.moe" in row.provider
    assert row.facts["zero3_leaf_modules"] == ["LoopedMoeBlock"]
    assert any("leaf modules" in a and "LoopedMoeBlock (2: model.layers.0.mlp, ...)" in a for a in row.lines)
    assert not [w for w in guarded.warnings if "routed experts" in w]

    bare = _zero3_explain(path, tok)
    row = next(s for s in bare.stages if s.name == "after:load")
    assert row.facts["zero3_leaf_modules"] == []
    assert any("LoopedMoeBlock" in w and "hangs" in w for w in row.warnings)

    listed = {**DS, "zero_optimization": {"stage": 3, "leaf_module": {"classes": ["LoopedMoeBlock"]}}}
    default = {**DS, "zero_optimization": {"stage": 3}}  # DeepSpeed's default list lacks it: still a warning
    assert [w for w in _zero3_explain(path, tok, config=default).warnings if "routed experts" in w]
    configured = ModelBuilder(AutoModelForCausalLM, path, tok).with_zero3(listed).explain(world_size=2)
    assert not [w for w in configured.warnings if "routed experts" in w]  # DeepSpeed will flag it


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_need_no_leaf(family, dirs, tokenizer_for):
    path = dirs[family]
    explanation = _zero3_explain(path, tokenizer_for(path))
    row = next(s for s in explanation.stages if s.name == "after:load")
    assert row.facts["zero3_leaf_modules"] == []
    assert any("experts fused into one module" in a and "SparseMoeBlock (2:" in a for a in row.lines)
    assert not explanation.warnings or not [w for w in explanation.warnings if "routed experts" in w]


def test_no_leaf_row_without_zero3_or_without_moe(dirs, tokenizer_for):
    for family, zero3 in (("looped_moe", False), ("mistral", True)):
        builder = ModelBuilder(AutoModelForCausalLM, dirs[family], tokenizer_for(dirs[family]))
        explanation = (builder.with_zero3(DS) if zero3 else builder).explain(world_size=2)
        assert "after:load" not in [s.name for s in explanation.stages]


def test_plan_leaves_on_real_modules():
    classes = looped_moe_classes()
    model = classes["model"](make_config(LOOPED_MOE))
    assert sorted(routed_expert_blocks(model)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    plan = plan_leaves(model, [classes["block"]])
    assert plan.leaves == {"LoopedMoeBlock": ["model.layers.0.mlp", "model.layers.1.mlp"]} and not plan.unguarded
    assert plan_leaves(model, ["model.layers"]).unguarded  # a name that matches no class
    model.model.layers[0].mlp._z3_leaf = True  # flagged by the caller: only the other block is unguarded
    assert plan_leaves(model, []).unguarded == {"LoopedMoeBlock": ["model.layers.1.mlp"]}
    assert plan_leaves(model, [], (["LoopedMoeBlock"], [], [])).unguarded == {}
    mixtral = AutoModelForCausalLM.from_config(make_config("mixtral"))
    assert routed_expert_blocks(mixtral) == {}
    assert plan_leaves(mixtral, ["MixtralSparseMoeBlock"]).fused == {
        "MixtralSparseMoeBlock": ["model.layers.0.mlp", "model.layers.1.mlp"]}


class _BadLeaves:
    @hfbuilder.hookimpl
    def hfbuilder_zero3_leaf_modules(self):
        return "LoopedMoeBlock"


def test_a_leaf_hook_returning_a_bare_string_is_an_error_naming_its_plugin(dirs, tokenizer_for):
    path = dirs["looped_moe"]
    with pytest.raises(PluginError, match="_BadLeaves.*must return a list of classes or class names"):
        _zero3_explain(path, tokenizer_for(path), _BadLeaves())


# -- real DeepSpeed ZeRO-3, world size 2, one launch for every family -----------------------------


@pytest.fixture(scope="module")
def world2(dirs, tokenizer_for, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    sft_dirs = {}
    for family in TIED:  # step-1 outputs: resized to 48 rows, so a checkpoint fills every row
        sft_dirs[family] = str(root / f"{family}-sft")
        tok = tokenizer_for(dirs[family])
        ModelBuilder(AutoModelForCausalLM, dirs[family], tok).build().save_pretrained(sft_dirs[family])
        tok.save_pretrained(sft_dirs[family])
    checks = [f"family:{f}" for f in (*MODERN_FAMILIES, "gpt2")]
    checks += [f"deferred:{f}" for f in TIED] + [f"lora:{f}" for f in LORA] + ["looped_moe"]
    spec = {"dirs": dirs, "sft_dirs": sft_dirs, "ds": DS, "checks": checks, "train": list(MODERN_FAMILIES)}
    # A hang (ranks waiting in mismatched collectives) is killed at the timeout and fails every test here.
    return run_ranks(WORKER, spec, 2, root, timeout=300)


def _ok(results, check):
    for r in results:
        assert r[check]["ok"], f"rank {r['rank']} check {check!r} failed:\n{r[check]['error']}"
    return [r[check] for r in results]


@pytest.mark.zero3
@pytest.mark.parametrize("family", (*MODERN_FAMILIES, "gpt2"))
def test_zero3_build_gathered_equals_from_pretrained(world2, family):
    ranks = _ok(world2, f"family:{family}")
    for facts in ranks:
        assert facts["unpartitioned"] == [] and facts["dtypes"] == ["torch.bfloat16"]
        assert facts["keys_equal"] and facts["unequal"] == []
        assert facts["grown"] and all(rows == 48 and finite for rows, finite in facts["grown"].values())
        assert all(facts["invariants"].values()), facts["invariants"]
        assert facts["leaf_modules"] == 0  # fused or dense: nothing to flag
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["tied"] is bool(make_config(family).tie_word_embeddings)
    if family in MOE_FAMILIES:
        assert any("experts fused" in a for a in ranks[0]["after_load"])


@pytest.mark.zero3
@pytest.mark.parametrize("family", MODERN_FAMILIES)
def test_training_step_with_different_inputs_per_rank(world2, family):
    ranks = _ok(world2, f"family:{family}")
    assert ranks[0]["inputs"] != ranks[1]["inputs"]
    for facts in ranks:
        assert all(math.isfinite(loss) for loss in facts["losses"]), facts["losses"]
        assert facts["leaf_modules_trained"] == 0  # fused MoE experts train without any leaf
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank's loss is its own batch's


@pytest.mark.zero3
@pytest.mark.parametrize("family", TIED)
def test_tied_embeddings_stay_one_tensor_under_zero3(world2, family):
    for facts in _ok(world2, f"family:{family}") + _ok(world2, f"deferred:{family}"):
        assert facts["tied"] is True
        assert facts["invariants"]["tied"] is True


@pytest.mark.zero3
@pytest.mark.parametrize("family", LORA)
def test_lora_under_bf16_zero3_trains_only_the_adapters(world2, family):
    ranks = _ok(world2, f"lora:{family}")
    for facts in ranks:
        assert facts["unpartitioned"] == [] and facts["dtypes"] == ["torch.bfloat16"]  # adapters included
        assert facts["adapters"] and facts["trainable"] == facts["adapters"]
        assert all(math.isfinite(loss) for loss in facts["losses"])
        assert facts["changed"] and set(facts["changed"]) <= set(facts["adapters"])
        assert any("lora_B" in n for n in facts["changed"])
    assert ranks[0]["changed"] == ranks[1]["changed"]


@pytest.mark.zero3
def test_looped_experts_as_leaf_modules_train_with_different_routing_per_rank(world2):
    ranks = _ok(world2, "looped_moe")
    for facts in ranks:
        assert facts["leaves"] == [True, True]
        assert any("LoopedMoeBlock" in a for a in facts["after_load"])
        assert not [w for w in facts["warnings"] if "routed experts" in w]
        assert all(math.isfinite(loss) for loss in facts["losses"])
        assert any("LoopedMoeBlock" in w and "hangs" in w for w in facts["unguarded_warnings"])
    # the hazard was real: the ranks called different experts
    assert ranks[0]["calls"] != ranks[1]["calls"]
