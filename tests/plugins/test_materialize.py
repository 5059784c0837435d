"""Deferred weights: built on meta, nothing initialized twice, nothing left as garbage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfbuilder
from hfbuilder import Head, InvariantError, ModelBuilder


@pytest.mark.parametrize("family", ["opt", "llama", "gpt_neox"])
def test_deferred_without_checkpoint_is_initialized_and_warns(model_dir, tokenizer_for, family):
    from transformers import AutoModelForCausalLM

    path = model_dir(family)
    with pytest.warns(UserWarning, match="randomly initialized, not pretrained"):
        model, report = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).deferred_weights().build_with_report()
    assert report.plan[-1] == "materialize"
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    assert set(report.provenance.values()) == {"initialized"}
    # transformers' own init: norms at one, embeddings ~ N(0, initializer_range)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    std = model.get_input_embeddings().weight.std().item()
    expected = getattr(model.config, "initializer_range", None) or model.config.init_std  # OPT: init_std
    assert 0.5 * expected < std < 2 * expected
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_load_stage_spends_no_init_on_deferred_weights(model_dir, tokenizer_for, monkeypatch):
    """The architecture is built on meta: no init function writes real memory before materialize."""
    from transformers import AutoModelForCausalLM
    from transformers import initialization as init

    path = model_dir("llama")
    written = []
    for fn in ("normal_", "uniform_", "zeros_", "ones_", "trunc_normal_"):
        original = getattr(init, fn)

        def spy(tensor, *args, _original=original, **kwargs):
            written.append(tensor.device.type)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(init, fn, spy)
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).deferred_weights()
    builder.without_stage("materialize").build()
    assert written and set(written) == {"meta"}
    written.clear()
    with pytest.warns(UserWarning, match="not pretrained"):
        builder.build()
    assert "cpu" in written  # materialize is where the (one) init happens


class _BareParamHead(Head):
    """A head whose extra tensor is a bare nn.Parameter with no reset_parameters: cannot be initialized."""

    name = "bare"

    def wrap(self, model, ctx, **options):
        class Wrapped(nn.Module):
            def __init__(self, base):
                super().__init__()
                self.base = base
                ref = next(base.parameters())
                self.scale = nn.Parameter(torch.empty(3, device=ref.device, dtype=ref.dtype))

        return Wrapped(model)


class _Plugin:
    @hfbuilder.hookimpl
    def hfbuilder_heads(self):
        return [_BareParamHead()]


def test_a_tensor_nothing_can_initialize_is_an_invariant_error(model_dir, tokenizer_for):
    from transformers import AutoModel

    path = model_dir("gpt_neox")
    builder = ModelBuilder(AutoModel, path, tokenizer_for(path)).with_plugin(_Plugin()).with_head("bare")
    with pytest.raises(InvariantError, match="scale"), pytest.warns(UserWarning):
        builder.deferred_weights().build()


def test_reward_head_on_deferred_build_is_initialized_by_reset_parameters(model_dir, tokenizer_for):
    from transformers import AutoModel

    path = model_dir("opt")
    with pytest.warns(UserWarning, match="not pretrained"):
        model, report = (
            ModelBuilder(AutoModel, path, tokenizer_for(path)).with_head("reward").deferred_weights().build_with_report()
        )
    bound = 1 / model.v_head.in_features**0.5  # nn.Linear's default (kaiming uniform) bound
    assert model.v_head.weight.abs().max() <= bound and model.v_head.weight.abs().sum() > 0
    assert report.provenance["v_head.weight"] == "initialized"
