"""Hypothesis: any valid dropout reaches every module; any tokenizer length gives the rounded vocab."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from hfbuilder import ModelBuilder
from hfbuilder.plugins.resize import target_vocab
from hfbuilder.testing import make_tokenizer

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(p=st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_any_valid_dropout(model_dir, tokenizer_for, p):
    path = model_dir("gpt2")
    model = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_dropout(p).build()
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {p}
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == p


@SETTINGS
@given(n_words=st.integers(min_value=0, max_value=120), allow_shrink=st.booleans())
def test_any_tokenizer_length(model_dir, n_words, allow_shrink):
    path = model_dir("llama")  # vocab 45
    tok = make_tokenizer(n_words)
    model = ModelBuilder(AutoModelForCausalLM, path, tok).with_options(resize_allow_shrink=allow_shrink).build()
    rounded = 8 * math.ceil(len(tok) / 8)
    expected = rounded if allow_shrink else max(rounded, 45)
    assert model.get_input_embeddings().weight.shape[0] == expected
    assert model.get_output_embeddings().weight.shape[0] == expected
    assert model.config.vocab_size == expected


@given(n=st.integers(1, 10**6), current=st.integers(1, 10**6), multiple=st.integers(1, 256), shrink=st.booleans())
def test_target_vocab_arithmetic(n, current, multiple, shrink):
    t = target_vocab(n, current, multiple, shrink)
    assert t >= n
    if shrink or t != current:
        assert t % multiple == 0 and t - n < multiple
    if not shrink:
        assert t >= current
