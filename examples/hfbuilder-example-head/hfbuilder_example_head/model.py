"""The module the head builds: a transformer body and a ``Linear(hidden, n_objectives)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MultiObjectiveRewardModel(nn.Module):
    def __init__(self, base: nn.Module, objectives: tuple[str, ...], pad_token_id: int) -> None:
        super().__init__()
        self.objectives = objectives
        self.pad_token_id = pad_token_id
        self.transformer = base
        text = base.config.get_text_config()
        width = getattr(text, "word_embed_proj_dim", None) or text.hidden_size
        ref = next(base.parameters())
        # Same dtype and device as the base: on a deferred build that is the meta
        # device, and hfbuilder's materialize stage initializes it (reset_parameters).
        self.score = nn.Linear(width, len(objectives), bias=False, device=ref.device, dtype=ref.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> dict:
        hidden = self.transformer(input_ids, attention_mask=attention_mask, **kwargs)[0]
        values = self.score(hidden)
        not_pad = (input_ids != self.pad_token_id).long()
        last = (not_pad * torch.arange(input_ids.shape[1], device=input_ids.device)).argmax(-1)
        scores = values[torch.arange(values.shape[0], device=values.device), last]
        return {"scores": scores, "values": values}
