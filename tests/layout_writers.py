"""A tiny Llama reward model written the way each framework writes it, for the layout tests.

Each writer follows the framework's own save code (read from its repository): DeepSpeed-Chat's
``save_hf_format``, OpenRLHF's ``save_model`` after ``train_rm``, transformers'
``save_pretrained`` of its classifiers, TRL's ``AutoModelForCausalLMWithValueHead.save_pretrained``
and LLaMA-Factory's ``fix_valuehead_checkpoint``. The head is known (``W``, ``B``), so every
framework's per-token value is ``last_hidden_state @ W.T + b`` with ``b`` its bias or 0.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

HIDDEN = 16
W = (torch.linspace(-1.0, 1.0, HIDDEN) * 0.5).view(1, HIDDEN)
B = torch.tensor([0.375])
MEAN, STD = 0.5, 2.0

#: layout -> whether the framework's head has a bias.
LAYOUTS = {"dschat": False, "openrlhf": False, "hf-seqcls": False, "hf-tokencls": True, "trl": True,
           "llamafactory": True}


def _body(lm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm_state.items() if k.startswith("model.")}


def write(layout: str, out: str, base: str) -> str:
    """Write the tiny Llama at ``base`` plus the known head into ``out`` as ``layout``'s framework does."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.makedirs(out, exist_ok=True)
    lm = AutoModelForCausalLM.from_pretrained(base)
    state = lm.state_dict()
    config = AutoConfig.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    if layout == "dschat":  # torch.save(RewardModel(AutoModel).state_dict()), the base config, the vocabulary
        sd = {"rwtransformer." + k.removeprefix("model."): v for k, v in _body(state).items()}
        sd["v_head.weight"] = W.clone()
        torch.save(sd, os.path.join(out, "pytorch_model.bin"))
        config.to_json_file(os.path.join(out, "config.json"))
    elif layout in ("openrlhf", "openrlhf-old"):  # save_pretrained of RewardModel(LlamaPreTrainedModel)
        prefix = "score" if layout == "openrlhf" else "value_head"
        sd = {**_body(state), f"{prefix}.weight": W.clone()}
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        data = config.to_dict()
        data.update(architectures=["RewardModel"], normalize_reward=True, mean=MEAN, std=STD)
        if layout == "openrlhf":
            data["value_head_prefix"] = prefix  # train_rm writes it; models before 2024-06 lack it
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(data, fh)
    elif layout in ("hf-seqcls", "hf-tokencls"):
        from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

        cls = LlamaForSequenceClassification if layout == "hf-seqcls" else LlamaForTokenClassification
        config.num_labels = 1
        model = cls(config)
        head = {"score.weight": W.clone(), **({"score.bias": B.clone()} if layout == "hf-tokencls" else {})}
        model.load_state_dict({**_body(state), **head}, strict=True)
        model.save_pretrained(out)
    elif layout == "trl":  # the wrapper's state_dict (LM + v_head.*) through the LM's save_pretrained
        lm.save_pretrained(out, state_dict={**state, "v_head.summary.weight": W.clone(),
                                            "v_head.summary.bias": B.clone()})
    elif layout == "llamafactory":  # the LM through save_pretrained, the head beside it
        lm.save_pretrained(out)
        save_file({"v_head.summary.weight": W.clone(), "v_head.summary.bias": B.clone()},
                  os.path.join(out, "value_head.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    tok.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=4)
def _hidden(base: str) -> torch.Tensor:
    from transformers import AutoModel

    ids, mask = inputs()
    with torch.no_grad():
        return AutoModel.from_pretrained(base).eval()(ids, attention_mask=mask).last_hidden_state


def expected_values(base: str, bias: bool) -> torch.Tensor:
    """Each framework's per-token values on :func:`inputs`, in plain torch: hidden states @ W.T + b."""
    return (_hidden(base) @ W.T).squeeze(-1) + (B if bias else 0.0)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows (pad id 0), as every framework scores them."""
    ids = torch.tensor([[2, 5, 9, 12, 7, 3, 0, 0], [2, 8, 6, 4, 11, 13, 21, 3]])
    return ids, (ids != 0).long()


def tensors_of(path: str, layout: str | None = None) -> tuple[str, dict[str, Any]]:
    """(detected layout, RewardModel name -> tensor) of a checkpoint, through hfbuilder's layouts."""
    from hfbuilder.layouts import BUILTIN_LAYOUTS, resolve_layout

    resolved = resolve_layout(path, {lay.name: lay for lay in BUILTIN_LAYOUTS}, layout or "auto")
    with resolved.open() as view:
        return resolved.layout.name, {k: view.get(k).clone() for k in view.keys()}
