"""A tiny causal LM whose MoE blocks call their experts one module at a time.

transformers 5 fuses the experts of its own MoE families into one module of 3-D weights,
but remote-code models (and transformers 4's Mixtral and Qwen-MoE) keep them as an
``nn.ModuleList`` and call only the experts that received tokens. Under ZeRO-3 that is
the case that hangs: ranks routing differently gather different parameters. This model
reproduces it in a few hundred parameters, registered with the Auto classes under
``model_type`` :data:`LOOPED_MOE`, so ``ModelBuilder(AutoModelForCausalLM, path, tok)``
builds it like any family.
"""

from __future__ import annotations

from typing import Any

LOOPED_MOE = "hfbuilder_looped_moe"

_classes: dict[str, Any] = {}


def looped_moe_classes() -> dict[str, Any]:
    """``{"config": ..., "model": ..., "block": ...}``, registered with the Auto classes (once).

    Defined on first use so that importing :mod:`hfbuilder.testing` imports neither torch
    nor transformers. Every process that loads a saved model of this type (each rank) calls
    it first, as it would import a remote-code module.
    """
    if _classes:
        return _classes
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class LoopedMoeConfig(PretrainedConfig):
        model_type = LOOPED_MOE

        def __init__(self, vocab_size: int = 45, hidden_size: int = 16, intermediate_size: int = 16,
                     num_hidden_layers: int = 2, num_experts: int = 8, num_experts_per_tok: int = 1,
                     initializer_range: float = 0.02, tie_word_embeddings: bool = False, **kwargs: Any) -> None:
            self.vocab_size = vocab_size
            self.hidden_size = hidden_size
            self.intermediate_size = intermediate_size
            self.num_hidden_layers = num_hidden_layers
            self.num_experts = num_experts
            self.num_experts_per_tok = num_experts_per_tok
            self.initializer_range = initializer_range
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    class LoopedExpert(nn.Module):
        def __init__(self, config: LoopedMoeConfig) -> None:
            super().__init__()
            self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
            self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(nn.functional.silu(self.up(x)))

    class LoopedMoeBlock(nn.Module):
        """Router plus experts called in a loop, only those that got tokens."""

        def __init__(self, config: LoopedMoeConfig) -> None:
            super().__init__()
            self.top_k = config.num_experts_per_tok
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
            self.experts = nn.ModuleList(LoopedExpert(config) for _ in range(config.num_experts))
            self.calls: list[int] = []  # expert indices called, in order, for tests to compare across ranks

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            flat = hidden.reshape(-1, hidden.shape[-1])
            probs = self.gate(flat).float().softmax(-1)
            weights, chosen = probs.topk(self.top_k, dim=-1)
            out = torch.zeros_like(flat)
            for e in chosen.unique().tolist():
                self.calls.append(e)
                rows, slot = torch.where(chosen == e)
                y = self.experts[e](flat[rows]) * weights[rows, slot, None].to(flat.dtype)
                out = out.index_add(0, rows, y)
            return out.reshape(hidden.shape)

    class LoopedMoeLayer(nn.Module):
        def __init__(self, config: LoopedMoeConfig) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(config.hidden_size)
            self.mlp = LoopedMoeBlock(config)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden + self.mlp(self.norm(hidden))

    class LoopedMoePreTrainedModel(PreTrainedModel):
        config_class = LoopedMoeConfig
        base_model_prefix = "model"

    class LoopedMoeModel(LoopedMoePreTrainedModel):
        def __init__(self, config: LoopedMoeConfig) -> None:
            super().__init__(config)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(LoopedMoeLayer(config) for _ in range(config.num_hidden_layers))
            self.norm = nn.LayerNorm(config.hidden_size)
            self.post_init()

        def get_input_embeddings(self) -> nn.Module:
            return self.embed_tokens

        def set_input_embeddings(self, value: nn.Module) -> None:
            self.embed_tokens = value

        def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            hidden = self.embed_tokens(input_ids)
            for layer in self.layers:
                hidden = layer(hidden)
            return self.norm(hidden)

    class LoopedMoeForCausalLM(LoopedMoePreTrainedModel):
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

        def __init__(self, config: LoopedMoeConfig) -> None:
            super().__init__(config)
            self.model = LoopedMoeModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_input_embeddings(self) -> nn.Module:
            return self.model.embed_tokens

        def set_input_embeddings(self, value: nn.Module) -> None:
            self.model.embed_tokens = value

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

        def set_output_embeddings(self, value: nn.Module) -> None:
            self.lm_head = value

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
            logits = self.lm_head(self.model(input_ids))
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
                )
            return CausalLMOutput(loss=loss, logits=logits)

    AutoConfig.register(LOOPED_MOE, LoopedMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(LoopedMoeConfig, LoopedMoeForCausalLM, exist_ok=True)
    _classes.update(config=LoopedMoeConfig, model=LoopedMoeForCausalLM, block=LoopedMoeBlock)
    return _classes


__all__ = ["LOOPED_MOE", "looped_moe_classes"]
