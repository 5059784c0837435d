"""``RewardModel``: DeepSpeed-Chat's reward/critic model, same contract, same numbers.

This module imports torch at the top, so :mod:`hfbuilder.plugins.reward` (the head,
loaded with every builder) re-exports it lazily.

What is kept from DeepSpeed-Chat, on purpose:

- attribute and state-dict names (``rwtransformer.*``, ``v_head.weight``), with
  ``v_head`` registered first as there, so step-2 checkpoints and DeepSpeed
  optimizer states move both ways;
- the pairwise loss and end scores, computed with the same tensor operations in the
  same order, so they are bit-for-bit equal.

What differs:

- ``v_head`` takes the base model's dtype and device (DeepSpeed-Chat leaves an fp32
  head beside an fp16 base, which works only after ``deepspeed.initialize`` casts it);
- the per-sample ``nonzero().item()`` search for the end and divergence positions is
  done for the whole batch at once (one host sync instead of several per sample);
- bad inputs (odd batch, no shared prefix, ``prompt_length < 2``) raise
  :class:`~hfbuilder.BuilderInputError` instead of ``assert``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BuilderInputError, HFBuilderError


def value_head_dim(config: Any) -> int:
    """The width of the hidden states the base model returns (OPT projects to ``word_embed_proj_dim``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("word_embed_proj_dim", "hidden_size", "n_embd"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise HFBuilderError(
        f"cannot size the reward head: the {type(config).__name__} has none of word_embed_proj_dim, "
        "hidden_size or n_embd"
    )


def base_for_reward(model: nn.Module) -> nn.Module:
    """The transformer body that returns hidden states: ``model`` itself, or the base inside a causal LM.

    Scoring an LM's logits as if they were hidden states gives a model that trains
    but means nothing, so anything else is an error.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None or get_out() is None:
        return model  # AutoModel: already the body
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        out = getattr(base, "get_output_embeddings", None)
        if out is None or out() is None:
            return base
    raise HFBuilderError(
        f"the reward head needs a model that returns hidden states, and {type(model).__name__} has an LM head "
        "whose base model cannot be found (model.base_model); build with AutoModel instead of a causal-LM class"
    )


def _first_index(mask: torch.Tensor, default: int) -> torch.Tensor:
    """Per row, the index of the first True in ``mask``, or ``default`` where there is none."""
    if mask.shape[-1] == 0:
        return torch.full(mask.shape[:-1], default, dtype=torch.long, device=mask.device)
    found = mask.any(-1)
    first = mask.to(torch.int8).argmax(-1)  # argmax returns the first maximal index
    return torch.where(found, first, torch.full_like(first, default))


def _end_index(ids: torch.Tensor, pad_id: int, skip: int) -> torch.Tensor:
    """Index of the ``(skip + 1)``-th pad token per row, or the sequence length (DeepSpeed-Chat's end)."""
    is_pad = ids == pad_id
    nth = is_pad & (is_pad.cumsum(-1) == skip + 1)
    return _first_index(nth, ids.shape[-1])


class RewardModel(nn.Module):
    """A transformer body with a scalar value head: DeepSpeed-Chat's ``RewardModel``.

    ``RewardModel(base_model, tokenizer, num_padding_at_beginning=0, compute_fp32_loss=False)``
    is DeepSpeed-Chat's constructor. ``v_head`` lets a builder pass a head made on the
    meta device or under ``deepspeed.zero.Init``; ``pad_token_id`` replaces the
    tokenizer when there is none.
    """

    def __init__(
        self,
        base_model: nn.Module,
        tokenizer: Any = None,
        num_padding_at_beginning: int = 0,
        compute_fp32_loss: bool = False,
        *,
        v_head: nn.Module | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self.config = base_model.config
        self.num_padding_at_beginning = num_padding_at_beginning
        if v_head is None:
            ref = next(base_model.parameters(), None)
            v_head = nn.Linear(
                value_head_dim(self.config),
                1,
                bias=False,
                device=ref.device if ref is not None else None,
                dtype=ref.dtype if ref is not None else None,
            )
        # Registered before rwtransformer, as in DeepSpeed-Chat: parameter order is
        # what DeepSpeed's optimizer checkpoints are keyed by.
        self.v_head = v_head
        self.rwtransformer = base_model
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            raise BuilderInputError("the reward model needs a pad token id: the tokenizer has no pad_token_id")
        self.PAD_ID = int(pad_token_id)
        self.compute_fp32_loss = compute_fp32_loss
        #: ``(mean, std)`` of the rewards when the checkpoint recorded them (OpenRLHF's config.json),
        #: else None. Values stay raw: OpenRLHF applies ``(r - mean) / std`` only with its
        #: ``normalize_reward`` on, so the caller decides.
        self.reward_normalization: tuple[float, float] | None = None

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.rwtransformer.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.rwtransformer.gradient_checkpointing_disable()

    def _values(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        position_ids: torch.Tensor | None,
        head_mask: Any,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool,
    ) -> torch.Tensor:
        extra = {
            k: v
            for k, v in (("past_key_values", past_key_values), ("position_ids", position_ids), ("head_mask", head_mask))
            if v is not None
        }
        outputs = self.rwtransformer(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=use_cache, **extra
        )
        return self.v_head(outputs[0]).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Pairwise loss: the first half of the batch is chosen, the second half rejected."""
        if input_ids is None or input_ids.dim() != 2:
            raise BuilderInputError("RewardModel.forward needs 2-D input_ids: chosen rows, then rejected rows")
        if input_ids.shape[0] == 0 or input_ids.shape[0] % 2:
            raise BuilderInputError(
                f"RewardModel.forward needs an even, non-empty batch (chosen then rejected), got {input_ids.shape[0]} rows"
            )
        rewards = self._values(
            input_ids, attention_mask, past_key_values, position_ids, head_mask, inputs_embeds, use_cache
        )
        bs = input_ids.shape[0] // 2
        seq_len = input_ids.shape[1]
        chosen_ids, rejected_ids = input_ids[:bs], input_ids[bs:]
        chosen_rewards, rejected_rewards = rewards[:bs], rewards[bs:]

        # Where each sequence ends (OPT pads the first token, hence num_padding_at_beginning)
        # and where each pair starts to differ; identical pairs score their last token.
        c_ind = _end_index(chosen_ids, self.PAD_ID, self.num_padding_at_beginning)
        r_ind = _end_index(rejected_ids, self.PAD_ID, self.num_padding_at_beginning)
        differs = chosen_ids != rejected_ids
        has_divergence = differs.any(-1)
        r_ind = torch.where(has_divergence, r_ind, c_ind)
        end_ind = torch.where(has_divergence, torch.maximum(c_ind, r_ind), torch.full_like(c_ind, seq_len))
        divergence_ind = _first_index(differs, seq_len - 1)

        # Python indexing with c_ind - 1 == -1 picks the last token; so does % seq_len.
        chosen_mean_scores = chosen_rewards.gather(1, ((c_ind - 1) % seq_len).unsqueeze(1)).squeeze(1)
        rejected_mean_scores = rejected_rewards.gather(1, ((r_ind - 1) % seq_len).unsqueeze(1)).squeeze(1)

        starts, ends = divergence_ind.tolist(), end_ind.tolist()
        if 0 in starts:
            rows = [i for i, s in enumerate(starts) if s == 0]
            raise BuilderInputError(
                f"chosen and rejected sequences differ at their first token in pair(s) {rows}; "
                "the pairwise loss needs a shared prompt before they diverge"
            )
        loss: Any = 0.0
        for i in range(bs):  # the same slices and reductions as DeepSpeed-Chat: equal to the last bit
            c_truncated = chosen_rewards[i, starts[i] : ends[i]]
            r_truncated = rejected_rewards[i, starts[i] : ends[i]]
            if self.compute_fp32_loss:
                c_truncated, r_truncated = c_truncated.float(), r_truncated.float()
            loss += -nn.functional.logsigmoid(c_truncated - r_truncated).mean()
        loss = loss / bs
        return {
            "loss": loss,
            "chosen_mean_scores": chosen_mean_scores,
            "rejected_mean_scores": rejected_mean_scores,
        }

    def forward_value(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        head_mask: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        return_value_only: bool = False,
        prompt_length: int = 0,
        use_cache: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-token values; with ``return_value_only=False`` also the value of each answer's last token."""
        values = self._values(
            input_ids, attention_mask, past_key_values, position_ids, head_mask, inputs_embeds, use_cache
        )
        if return_value_only:
            return values
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length <= 1:
            raise BuilderInputError(
                f"forward_value needs prompt_length > 1 to find each answer's end score, got {prompt_length!r}"
            )
        if input_ids is None:
            raise BuilderInputError("forward_value needs input_ids to find each answer's end score")
        seq_len = input_ids.shape[1]
        # Only the answer is searched for padding, so left padding of the prompt does not count.
        answer_end = _first_index(input_ids[:, prompt_length:] == self.PAD_ID, seq_len - prompt_length) + prompt_length
        chosen_end_scores = values.gather(1, (answer_end - 1).unsqueeze(1)).squeeze(1)
        return {"values": values, "chosen_end_scores": chosen_end_scores}


__all__ = ["RewardModel", "base_for_reward", "value_head_dim"]
