"""The one grouping of tied tensors: every distinct tensor once, all its names, the same order everywhere."""

from __future__ import annotations

import torch
import transformers as tf

from hfbuilder.testing import make_config
from hfbuilder.weights import set_tensor, tensor_groups, tied_groups


class Shared(torch.nn.Module):
    """One module reached under two names, a tied parameter, and buffers of both kinds."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 2)
        self.b = self.a  # the same module twice
        self.c = torch.nn.Linear(2, 2)
        self.c.weight = self.a.weight  # a tied parameter
        self.register_buffer("kept", torch.zeros(1))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)


def test_groups_follow_state_dict_names_and_order():
    model = Shared()
    groups = tensor_groups(model)
    order = list(model.state_dict())
    assert sorted(n for g in groups for n in g.names) == sorted(order)
    assert [g.name for g in groups] == sorted((g.name for g in groups), key=order.index)  # first names in order
    assert [list(g.names) for g in groups] == [["kept"], ["a.weight", "b.weight", "c.weight"], ["a.bias", "b.bias"],
                                               ["c.bias"]]
    assert [g.is_parameter for g in groups] == [False, True, True, True]
    assert groups[1].tensor is model.a.weight and groups[1].name == "a.weight" and groups[1].shape == (2, 2)
    assert tied_groups(model) == [["a.weight", "b.weight", "c.weight"], ["a.bias", "b.bias"]]


def test_non_persistent_buffers_only_when_asked():
    model = Shared()
    assert "scratch" not in {n for g in tensor_groups(model) for n in g.names}
    assert ["scratch"] in [list(g.names) for g in tensor_groups(model, non_persistent=True)]


def test_tied_embeddings_of_a_real_model():
    with torch.device("meta"):
        opt = tf.AutoModelForCausalLM.from_config(make_config("opt"))  # lm_head tied to embed_tokens
        llama = tf.AutoModelForCausalLM.from_config(make_config("llama"))  # untied
    assert tied_groups(opt) == [["model.decoder.embed_tokens.weight", "lm_head.weight"]]
    assert tied_groups(llama) == []
    assert len(tensor_groups(opt)) == len({id(t) for t in opt.state_dict(keep_vars=True).values()})


def test_set_tensor_replaces_one_name_only():
    model = Shared()
    new = torch.nn.Parameter(torch.ones(2, 2))
    set_tensor(model, "c.weight", new)
    assert model.c.weight is new and model.a.weight is not new
    set_tensor(model, "kept", torch.ones(1))
    assert torch.equal(model.kept, torch.ones(1))

