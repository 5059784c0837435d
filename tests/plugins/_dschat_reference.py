"""DeepSpeed-Chat's reward formulas, written out as the per-sample loop it uses.

The tests compare hfbuilder's ``RewardModel`` against this, bit for bit. It works on
a ``rewards``/``values`` tensor (batch x seq) so hypothesis can feed it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _nth_pad_or_len(ids: torch.Tensor, pad_id: int, skip: int) -> int:
    positions = (ids == pad_id).nonzero()
    return positions[skip].item() if len(positions) > skip else ids.shape[0]


def pairwise(input_ids: torch.Tensor, rewards: torch.Tensor, pad_id: int, npb: int, fp32: bool = False) -> dict:
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
    seq_len = input_ids.shape[1]
    out = []
    for i in range(values.size(0)):
        pads = (input_ids[i][prompt_length:] == pad_id).nonzero()
        c_ind = pads[0].item() + prompt_length if len(pads) > 0 else seq_len
        out.append(values[i][c_ind - 1])
    return torch.stack(out)
