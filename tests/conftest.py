"""Shared fixtures: tiny real models of five families, saved to disk once per session."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests control plugin loading themselves; an installed third-party plugin must not leak in.
os.environ.setdefault("HFBUILDER_DISABLE_PLUGIN_AUTOLOAD", "1")
# DeepSpeed JIT-builds a CPU op on first use; keep the build per environment so that
# several checkouts sharing ~/.cache/torch_extensions don't force each other to rebuild.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

from hfbuilder.testing import FAMILIES, make_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(family, **kw)`` -> path of a saved tiny causal LM (cached per arguments)."""
    cache: dict[tuple, str] = {}

    def make(family: str, **kwargs) -> str:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}-model")
            cache[key] = make_model(family, path, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tokenizer_for():
    """``tokenizer_for(path)`` -> the tokenizer saved beside a tiny model."""
    from transformers import AutoTokenizer

    return lambda path: AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
