"""RLHF phases, the DeepSpeed-Chat critic drop-in, and the lora / fp32_loss / freeze stages."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import hfbuilder
from hfbuilder import BuilderInputError, ModelBuilder, Phase, Stage
from hfbuilder.compat import create_critic_model
from hfbuilder.plugins.reward import RewardModel


@pytest.fixture(scope="module")
def opt(model_dir, tokenizer_for):
    path = model_dir("opt")
    return path, tokenizer_for(path)


@pytest.fixture(scope="module")
def step2(tmp_path_factory, opt):
    """A DeepSpeed-Chat step-2 output directory (pytorch_model.bin of the RewardModel)."""
    path, tok = opt
    out = tmp_path_factory.mktemp("step2")
    rm = create_critic_model(path, tok, None, num_padding_at_beginning=1)
    with torch.no_grad():
        rm.v_head.weight.fill_(0.25)
    torch.save(rm.state_dict(), out / "pytorch_model.bin")
    rm.config.to_json_file(str(out / "config.json"))
    tok.save_pretrained(str(out))
    return str(out), rm


def lm_builder(opt):
    from transformers import AutoModelForCausalLM

    path, tok = opt
    return ModelBuilder(AutoModelForCausalLM, path, tok)


def test_phases_are_registered_plugins(opt):
    names = sorted(lm_builder(opt)._plugins().phases())
    assert names == ["actor", "critic", "reference", "reward", "reward_eval", "sft"]


@pytest.mark.parametrize(
    "phase, options, plan_tail, expected",
    [
        ("sft", {"dropout": 0.0}, "resize", {"dropout": 0.0}),
        ("actor", {"dropout": 0.1}, "resize", {"dropout": 0.1}),
        ("reference", {}, "freeze", {"dropout": 0.0, "freeze": True}),
        ("reward", {"num_padding_at_beginning": 1}, "head", {"head": "reward"}),
        ("critic", {}, "materialize", {"head": "reward", "deferred": True}),
        ("reward_eval", {}, "freeze", {"head": "reward", "freeze": True, "dropout": 0.0}),
    ],
)
def test_each_phase_sets_its_stages(opt, step2, phase, options, plan_tail, expected):
    if phase in ("critic", "reward_eval"):
        options = {**options, "model_name_or_path": step2[0]}
    builder = lm_builder(opt).for_phase(phase, **options)
    assert builder.plan()[-1] == plan_tail
    for key, value in expected.items():
        assert builder.options[key] == value


def test_reference_is_frozen_in_eval_mode(opt):
    model = lm_builder(opt).for_phase("reference").build()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.dropout == 0.0 and model.config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_critic_and_reward_eval_load_the_step2_checkpoint(opt, step2):
    path, rm = step2
    base = lm_builder(opt)  # one base builder derives both, unchanged
    critic = base.for_phase("critic", model_name_or_path=path, num_padding_at_beginning=1, dropout=0.0).build()
    scorer = base.for_phase("reward_eval", model_name_or_path=path, num_padding_at_beginning=1).build()
    assert base.options == {}
    for model in (critic, scorer):
        assert isinstance(model, RewardModel) and model.num_padding_at_beginning == 1
        for key, value in rm.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)
    assert any(p.requires_grad for p in critic.parameters())
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())


def test_phase_options_are_checked(opt):
    with pytest.raises(BuilderInputError, match="has no option"):
        lm_builder(opt).for_phase("reference", dropout=0.3)
    with pytest.raises(BuilderInputError, match="unknown phase"):
        lm_builder(opt).for_phase("ppo")


def test_a_plugin_overrides_a_phase_by_name(opt):
    @dataclass(frozen=True)
    class MarkSettings(hfbuilder.Settings):
        custom_actor: bool = hfbuilder.setting(False, option="custom_actor", doc="marks the custom actor")

    class Mark(Stage):
        name = "mark"
        after = ("resize",)
        Settings = MarkSettings

        def run(self, ctx):
            pass

    class Plugin:
        @hfbuilder.hookimpl
        def hfbuilder_stages(self):
            return [Mark()]

        @hfbuilder.hookimpl
        def hfbuilder_phases(self):
            return [Phase("actor", settings={"mark": {"custom_actor": True}})]

    builder = lm_builder(opt).with_plugin(Plugin()).for_phase("actor")
    assert builder.options == {"custom_actor": True}


def test_create_critic_model_matches_deepspeed_chat_semantics(opt, step2):
    path, rm = step2
    _, tok = opt
    fresh = create_critic_model(opt[0], tok, None, num_padding_at_beginning=1)  # step 2: pretrained base
    assert isinstance(fresh, RewardModel) and fresh.num_padding_at_beginning == 1
    loaded = create_critic_model(path, tok, None, num_padding_at_beginning=1, rlhf_training=True, dropout=0.0)
    for key, value in rm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded.config.dropout == 0.0
    with pytest.warns(UserWarning, match="follows the config"):
        create_critic_model(opt[0], tok, None, zero_stage=3)


# -- lora, fp32_loss, freeze -----------------------------------------------------------


def test_lora_through_peft_keeps_the_reward_model(opt):
    from transformers import AutoModel

    path, tok = opt
    model, report = (
        ModelBuilder(AutoModel, path, tok)
        .with_head("reward")
        .with_lora(r=2, target_modules=["q_proj", "v_proj"], only_optimize_lora=True)
        .build_with_report()
    )
    assert isinstance(model, RewardModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "v_head.weight" in trainable  # the head trains with the adapters, as in DeepSpeed-Chat step 2
    assert all("lora_" in n for n in trainable - {"v_head.weight"}) and len(trainable) == 9
    assert sum(v == "adapter_init" for v in report.provenance.values()) == 8
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 5, 7, 3, 0]])
    assert torch.isfinite(model(ids)["loss"])


def test_lora_without_only_optimize_keeps_everything_trainable(opt):
    model = lm_builder(opt).with_lora(r=2, alpha=4.0, dropout=0.1).build()
    assert all(p.requires_grad for p in model.parameters())
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, "rank"), ({"alpha": -1}, "alpha"), ({"dropout": 2}, "dropout"),
     ({"target_modules": [""]}, "target_modules"), ({"only_optimize_lora": 1}, "only_optimize_lora")],
)
def test_bad_lora_arguments(opt, kwargs, match):
    with pytest.raises(BuilderInputError, match=match):
        lm_builder(opt).with_lora(**kwargs)


def test_fp32_loss_on_a_low_precision_causal_lm(opt):
    model = lm_builder(opt).with_dtype("bfloat16").with_fp32_loss().build()
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 3]])
    out = model(input_ids=ids, labels=ids)
    assert out.loss.dtype == torch.float32
    logits = model(input_ids=ids).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert "labels" in str(__import__("inspect").signature(model.forward))


def test_fp32_loss_on_the_reward_model_and_not_elsewhere(opt):
    from transformers import AutoModel

    path, tok = opt
    assert ModelBuilder(AutoModel, path, tok).with_head("reward").with_fp32_loss().build().compute_fp32_loss
    with pytest.raises(BuilderInputError, match="causal LMs and reward models"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ModelBuilder(AutoModel, path, tok).with_fp32_loss().build()
