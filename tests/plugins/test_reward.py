"""The reward head: DeepSpeed-Chat's contract and numbers, on tiny real models and on hypothesis pairs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hfbuilder import BuilderInputError, HFBuilderError, ModelBuilder
from hfbuilder.plugins.reward import RewardModel
from hfbuilder.testing import EOS_ID, PAD_ID
from hfbuilder.testing.dschat import end_scores, pairwise

from .conftest import REWARD_FAMILIES as FAMILIES


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def pairs_batch(npb: int) -> torch.Tensor:
    """Two chosen/rejected pairs with right padding (and a leading pad for OPT-style inputs)."""
    lead = [PAD_ID] * npb
    chosen = [lead + [5, 6, 7, 8, EOS_ID, PAD_ID, PAD_ID], lead + [5, 9, 10, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    rejected = [lead + [5, 6, 11, EOS_ID, PAD_ID, PAD_ID, PAD_ID], lead + [5, 9, 12, 13, 14, 15, EOS_ID]]
    return torch.tensor(chosen + rejected)


@pytest.mark.parametrize("family", [f for f, _ in FAMILIES])
def test_forward_matches_deepspeed_chat_bit_for_bit(reward_models, family):
    model, npb, _, _ = reward_models[family]
    ids = pairs_batch(npb)
    mask = (ids != PAD_ID).long()
    out = model(ids, attention_mask=mask)
    rewards = model.v_head(model.rwtransformer(ids, attention_mask=mask)[0]).squeeze(-1)
    ref = pairwise(ids, rewards, PAD_ID, npb)
    for key in ("loss", "chosen_mean_scores", "rejected_mean_scores"):
        exact(out[key], ref[key])
    # gradients too: the same graph, so the same numbers
    out["loss"].backward()
    ours = model.v_head.weight.grad.clone()
    model.zero_grad()
    rewards = model.v_head(model.rwtransformer(ids, attention_mask=mask)[0]).squeeze(-1)
    pairwise(ids, rewards, PAD_ID, npb)["loss"].backward()
    exact(ours, model.v_head.weight.grad)
    model.zero_grad()


@pytest.mark.parametrize("family", [f for f, _ in FAMILIES])
def test_forward_value_matches_deepspeed_chat(reward_models, family):
    model, npb, _, _ = reward_models[family]
    ids = pairs_batch(npb)
    mask = (ids != PAD_ID).long()
    values = model.forward_value(ids, mask, return_value_only=True)
    assert values.shape == ids.shape
    for prompt_length in (2, 3, ids.shape[1], ids.shape[1] + 2):
        out = model.forward_value(ids, mask, prompt_length=prompt_length)
        exact(out["values"], values)
        exact(out["chosen_end_scores"], end_scores(ids, values, PAD_ID, prompt_length))


def test_contract_attributes_keys_and_dtype(model_dir, tokenizer_for):
    from transformers import AutoModel

    path = model_dir("opt")
    tok = tokenizer_for(path)
    model, report = ModelBuilder(AutoModel, path, tok).with_head("reward").with_dtype("bfloat16").build_with_report()
    assert isinstance(model, RewardModel)
    assert model.PAD_ID == tok.pad_token_id and model.num_padding_at_beginning == 0
    assert model.config is model.rwtransformer.config
    keys = list(model.state_dict())
    assert keys[0] == "v_head.weight" and all(k.startswith("rwtransformer.") for k in keys[1:])
    # OPT's hidden states are word_embed_proj_dim wide; the head follows the base's dtype and device
    assert model.v_head.weight.shape == (1, model.config.word_embed_proj_dim)
    assert model.v_head.bias is None
    assert model.v_head.weight.dtype == torch.bfloat16 == next(model.rwtransformer.parameters()).dtype
    assert report.provenance["v_head.weight"] == "head_init"
    assert all(k.startswith("rwtransformer.") for k, v in report.provenance.items() if v != "head_init")


def test_causal_lm_class_uses_its_base_model(model_dir, tokenizer_for, reward_models):
    from transformers import AutoModelForCausalLM

    path = model_dir("llama")
    tok = tokenizer_for(path)
    model = ModelBuilder(AutoModelForCausalLM, path, tok).with_head("reward").build()
    assert type(model.rwtransformer).__name__ == "LlamaModel"
    base_keys = set(reward_models["llama"][0].state_dict())
    assert set(model.state_dict()) == base_keys  # the LM head is not part of the reward model


def test_lm_without_findable_base_is_an_error():
    class Opaque(nn.Module):
        def get_output_embeddings(self):
            return nn.Linear(2, 2)

    from hfbuilder.plugins.reward_model import base_for_reward

    with pytest.raises(HFBuilderError, match="hidden states"):
        base_for_reward(Opaque())


def test_gradient_checkpointing_passthrough(reward_models):
    model = reward_models["gpt_neox"][0]
    model.gradient_checkpointing_enable()
    assert model.rwtransformer.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.rwtransformer.is_gradient_checkpointing


@pytest.mark.parametrize(
    "options, match",
    [
        ({"num_padding_at_beginning": -1}, "num_padding_at_beginning"),
        ({"num_padding_at_beginning": True}, "num_padding_at_beginning"),
        ({"compute_fp32_loss": "yes"}, "compute_fp32_loss"),
        ({"pad": 0}, "no option"),
    ],
)
def test_bad_head_options_fail_before_building(model_dir, tokenizer_for, options, match):
    from transformers import AutoModel

    path = model_dir("opt")
    builder = ModelBuilder(AutoModel, "/nonexistent/never-read", tokenizer_for(path)).with_head("reward", **options)
    with pytest.raises(BuilderInputError, match=match):
        builder.build()


def test_tokenizer_without_pad_is_an_error(model_dir, tokenizer_for):
    from transformers import AutoModel

    path = model_dir("opt")
    tok = tokenizer_for(path)
    tok.pad_token = None
    with pytest.raises(BuilderInputError, match="pad"):
        ModelBuilder(AutoModel, path, tok).with_head("reward").build()


def test_bad_forward_inputs_are_typed_errors(reward_models):
    model = reward_models["llama"][0]
    with pytest.raises(BuilderInputError, match="even"):
        model(torch.tensor([[2, 5, 3]]))
    with pytest.raises(BuilderInputError, match="first token"):
        model(torch.tensor([[5, 6, 3], [7, 6, 3]]))
    with pytest.raises(BuilderInputError, match="prompt_length"):
        model.forward_value(torch.tensor([[2, 5, 3]]), prompt_length=1)


# -- hypothesis: the loss on random chosen/rejected pairs ---------------------------


class _TableBase(nn.Module):
    """A stand-in transformer: hidden states are a fixed random table lookup (fast, deterministic)."""

    def __init__(self, vocab: int = 24, width: int = 8) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(hidden_size=width)
        self.table = nn.Embedding(vocab, width)

    def forward(self, input_ids, **kwargs):
        return (self.table(input_ids),)


@st.composite
def reward_batches(draw):
    npb = draw(st.sampled_from([0, 1]))
    bs = draw(st.integers(1, 4))
    seq_len = draw(st.integers(3, 12))
    kind = draw(st.sampled_from(["padded", "identical", "no_padding"]))
    token = st.integers(2, 23)  # never the pad id (0)
    rows_c, rows_r = [], []
    for _ in range(bs):
        prompt = [PAD_ID] * npb + [draw(token)]
        body = seq_len - len(prompt)
        c = [draw(token) for _ in range(body)]
        r = [draw(token) for _ in range(body)]
        if kind == "identical":
            r = list(c)
        elif kind == "padded":
            c_len, r_len = draw(st.integers(0, body)), draw(st.integers(0, body))
            c = c[:c_len] + [PAD_ID] * (body - c_len)
            r = r[:r_len] + [PAD_ID] * (body - r_len)
        rows_c.append(prompt + c)
        rows_r.append(prompt + r)
    return npb, torch.tensor(rows_c + rows_r), draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=reward_batches(), seed=st.integers(0, 2**16))
def test_pairwise_loss_equals_reference_on_random_pairs(batch, seed):
    npb, ids, fp32 = batch
    torch.manual_seed(seed)
    base = _TableBase()
    model = RewardModel(base, pad_token_id=PAD_ID, num_padding_at_beginning=npb, compute_fp32_loss=fp32)
    if fp32:
        model = model.to(torch.bfloat16)
    out = model(ids)
    rewards = model.v_head(base(ids)[0]).squeeze(-1)
    ref = pairwise(ids, rewards, PAD_ID, npb, fp32)
    for key in ("loss", "chosen_mean_scores", "rejected_mean_scores"):
        exact(out[key], ref[key])
    if bool((ids[: len(ids) // 2] == ids[len(ids) // 2 :]).all()):
        # identical pairs: only the last token is compared, with itself: -logsigmoid(0) = log 2
        torch.testing.assert_close(out["loss"].float(), torch.log(torch.tensor(2.0)))
