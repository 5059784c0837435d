"""DeepSpeed-Chat's model building, written out with transformers, torch and DeepSpeed calls only.

The reference hfbuilder's tests compare against and its benchmarks race: the algorithm of
DeepSpeed-Chat's ``dschat/utils/model/model_utils.py`` (``create_hf_model``,
``create_critic_model``), ``dschat/utils/model/reward_model.py`` (``RewardModel``) and
``dschat/utils/utils.py`` (``load_state_dict_into_model``), step for step. It deliberately
keeps DeepSpeed-Chat's behaviour, quirks included: four dropout keys, pad := the config's
``eos_token_id``, a resize to exactly the next multiple of 8 (shrinking if needed), a critic
whose every weight is randomly initialized before the step-2 ``pytorch_model.bin`` overwrites
it, an fp32 ``v_head`` made outside ``zero.Init``, and a per-sample loop for the rewards.

It must not import hfbuilder: a reference that shares code with what it checks cannot catch
that code's mistakes.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout")


def configure_dropout(model_config: Any, dropout: float | None) -> None:
    if dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(model_config, key):
                setattr(model_config, key, dropout)


def create_hf_model(
    model_class: Any, model_name_or_path: str, tokenizer: Any, ds_config: dict | None = None,
    rlhf_training: bool = False, dropout: float | None = None,
) -> Any:  # fmt: skip
    """``create_hf_model``: config, dropout, ZeRO-3 construction, weights, end/pad ids, resize.

    The ``HfDeepSpeedConfig`` lives in a local, as in DeepSpeed-Chat: transformers holds it by
    weak reference, so ZeRO-3 construction is on for this call only.
    """
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(model_name_or_path)
    configure_dropout(model_config, dropout)
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive by this local, as in DeepSpeed-Chat)
    else:
        dschf = None  # noqa: F841
    if rlhf_training:  # the weights come later, from the step-2 checkpoint
        model = model_class.from_config(model_config)
    else:
        model = model_class.from_pretrained(model_name_or_path, config=model_config)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model


# -- the reward model -----------------------------------------------------------------------------


def _nth_pad_or_len(ids: torch.Tensor, pad_id: int, skip: int) -> int:
    positions = (ids == pad_id).nonzero()
    return positions[skip].item() if len(positions) > skip else ids.shape[0]


def pairwise(input_ids: torch.Tensor, rewards: torch.Tensor, pad_id: int, npb: int, fp32: bool = False) -> dict:
    """``RewardModel.forward`` after the value head: the pairwise loss and the end scores.

    ``input_ids``/``rewards`` are (2 * batch) x seq, the chosen half first.
    """
    bs = input_ids.shape[0] // 2
    chosen_scores, rejected_scores = [], []
    loss = 0.0
    for i in range(bs):
        chosen_id, rejected_id = input_ids[i], input_ids[bs + i]
        chosen_reward, rejected_reward = rewards[i], rewards[bs + i]
        c_ind = _nth_pad_or_len(chosen_id, pad_id, npb)
        divergence = (chosen_id != rejected_id).nonzero()
        if len(divergence) == 0:
            end_ind = rejected_reward.size(-1)
            divergence_ind = end_ind - 1
            r_ind = c_ind
        else:
            r_ind = _nth_pad_or_len(rejected_id, pad_id, npb)
            end_ind = max(c_ind, r_ind)
            divergence_ind = divergence[0]
        assert divergence_ind > 0
        c_trunc = chosen_reward[divergence_ind:end_ind]
        r_trunc = rejected_reward[divergence_ind:end_ind]
        chosen_scores.append(chosen_reward[c_ind - 1])
        rejected_scores.append(rejected_reward[r_ind - 1])
        if fp32:
            c_trunc, r_trunc = c_trunc.float(), r_trunc.float()
        loss += -F.logsigmoid(c_trunc - r_trunc).mean()
    return {
        "loss": loss / bs,
        "chosen_mean_scores": torch.stack(chosen_scores),
        "rejected_mean_scores": torch.stack(rejected_scores),
    }


def end_scores(input_ids: torch.Tensor, values: torch.Tensor, pad_id: int, prompt_length: int) -> torch.Tensor:
    """``RewardModel.forward_value``'s ``chosen_end_scores``: the value at each answer's last token."""
    seq_len = input_ids.shape[1]
    out = []
    for i in range(values.size(0)):
        pads = (input_ids[i][prompt_length:] == pad_id).nonzero()
        c_ind = pads[0].item() + prompt_length if len(pads) > 0 else seq_len
        out.append(values[i][c_ind - 1])
    return torch.stack(out)


class RewardModel(nn.Module):
    """DeepSpeed-Chat's ``RewardModel``: the base model under ``rwtransformer`` and a ``v_head``.

    The head is a plain ``nn.Linear`` in the default dtype, made wherever the constructor
    runs: under ZeRO-3 it is neither partitioned nor in the config's dtype.
    """

    def __init__(self, base_model: Any, tokenizer: Any, num_padding_at_beginning: int = 0,
                 compute_fp32_loss: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.config = base_model.config
        self.num_padding_at_beginning = num_padding_at_beginning
        if hasattr(self.config, "word_embed_proj_dim"):  # OPT's output width
            self.v_head = nn.Linear(self.config.word_embed_proj_dim, 1, bias=False)
        else:
            self.config.n_embd = self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd
            self.v_head = nn.Linear(self.config.n_embd, 1, bias=False)
        self.rwtransformer = base_model
        self.PAD_ID = tokenizer.pad_token_id
        self.compute_fp32_loss = compute_fp32_loss

    def _hidden(self, input_ids: Any, past_key_values: Any, attention_mask: Any, head_mask: Any,
                inputs_embeds: Any, use_cache: bool) -> torch.Tensor:  # fmt: skip
        kwargs = {} if self.config.model_type == "llama" else {"head_mask": head_mask}
        outputs = self.rwtransformer(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                                     inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)  # fmt: skip
        return outputs[0]

    def forward(self, input_ids: Any = None, past_key_values: Any = None, attention_mask: Any = None,
                position_ids: Any = None, head_mask: Any = None, inputs_embeds: Any = None,
                use_cache: bool = False) -> dict:  # fmt: skip
        hidden = self._hidden(input_ids, past_key_values, attention_mask, head_mask, inputs_embeds, use_cache)
        rewards = self.v_head(hidden).squeeze(-1)
        assert len(input_ids.shape) == 2
        return pairwise(input_ids, rewards, self.PAD_ID, self.num_padding_at_beginning, self.compute_fp32_loss)

    def forward_value(self, input_ids: Any = None, attention_mask: Any = None, past_key_values: Any = None,
                      position_ids: Any = None, head_mask: Any = None, inputs_embeds: Any = None,
                      return_value_only: bool = False, prompt_length: int = 0, use_cache: bool = False) -> Any:  # fmt: skip
        hidden = self._hidden(input_ids, past_key_values, attention_mask, head_mask, inputs_embeds, use_cache)
        values = self.v_head(hidden).squeeze(-1)
        if return_value_only:
            return values
        assert prompt_length > 1, "prompt_length must be greater than 1 to help select the end score"
        return {"values": values, "chosen_end_scores": end_scores(input_ids, values, self.PAD_ID, prompt_length)}


# -- the critic ------------------------------------------------------------------------------------


def load_state_dict_into_model(model_to_load: nn.Module, state_dict: dict, start_prefix: str = "",
                               zero_stage: int = 0) -> list[str]:  # fmt: skip
    """Module by module, non-strict; under ZeRO-3 each module's own parameters are gathered,
    rank 0 copies the values in, and they are re-partitioned on exit."""
    import deepspeed

    metadata = getattr(state_dict, "_metadata", None)
    state_dict = state_dict.copy()
    if metadata is not None:
        state_dict._metadata = metadata
    error_msgs: list[str] = []

    def load(module: nn.Module, state_dict: dict, prefix: str = "") -> None:
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        args = (state_dict, prefix, local_metadata, True, [], [], error_msgs)
        if len([key for key in state_dict if key.startswith(prefix)]) > 0:
            if zero_stage == 3:
                named_parameters = dict(module.named_parameters(prefix=prefix[:-1], recurse=False))
                params_to_gather = [named_parameters[k] for k in state_dict.keys() if k in named_parameters]
                if len(params_to_gather) > 0:
                    with deepspeed.zero.GatheredParameters(params_to_gather, modifier_rank=0):
                        if torch.distributed.get_rank() == 0:
                            module._load_from_state_dict(*args)
            else:
                module._load_from_state_dict(*args)
        for name, child in module._modules.items():
            if child is not None:
                load(child, state_dict, prefix + name + ".")

    load(model_to_load, state_dict, prefix=start_prefix)
    del state_dict
    return error_msgs


def create_critic_model(
    model_name_or_path: str, tokenizer: Any, ds_config: dict | None, num_padding_at_beginning: int = 0,
    rlhf_training: bool = False, dropout: float | None = None, zero_stage: int = 0, compute_fp32_loss: bool = False,
) -> RewardModel:  # fmt: skip
    """``create_critic_model``: the base model (randomly initialized when ``rlhf_training``), the
    reward head, and, for step 3, the step-2 ``pytorch_model.bin`` that every rank reads whole."""
    from transformers import AutoModel

    critic_model = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config, rlhf_training, dropout)
    critic_model = RewardModel(critic_model, tokenizer, num_padding_at_beginning=num_padding_at_beginning,
                               compute_fp32_loss=compute_fp32_loss)  # fmt: skip
    if rlhf_training:
        model_ckpt_path = os.path.join(model_name_or_path, "pytorch_model.bin")
        assert os.path.exists(model_ckpt_path), f"Cannot find model checkpoint at {model_ckpt_path}"
        model_ckpt_state_dict = torch.load(model_ckpt_path, map_location="cpu")
        load_state_dict_into_model(critic_model, model_ckpt_state_dict, "", zero_stage=zero_stage)
    return critic_model


__all__ = [
    "DROPOUT_KEYS", "RewardModel", "configure_dropout", "create_critic_model", "create_hf_model", "end_scores",
    "load_state_dict_into_model", "pairwise",
]  # fmt: skip
