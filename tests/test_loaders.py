"""Load backends: which one a build picks, the errors before any work, the page-cache probe, and
from_pretrained by assignment (the path instanttensor's tensors take), checked against from_pretrained.

instanttensor itself needs a CUDA device; CI has none, so its reads run in the GPU benchmark
(``benchmarks/run.py --cases llama3-8b``). Everything around them runs here, on real models and files.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfbuilder import BuilderInputError, ModelBuilder
from hfbuilder.loaders import (
    Read,
    cached_fraction,
    choose_io,
    choose_loader,
    device_source,
    instanttensor_installed,
)
from hfbuilder.plugins.load import torch_dtype
from hfbuilder.pretrained import build_on_meta, load_by_assignment, pretrained_dtype
from hfbuilder.testing import FAMILIES, make_model, make_tokenizer
from hfbuilder.weights import open_checkpoint


@pytest.fixture
def absent(monkeypatch):
    """instanttensor not installed, whatever this environment has."""
    monkeypatch.setitem(sys.modules, "instanttensor", None)


@pytest.fixture
def present(tmp_path, monkeypatch):
    """An importable ``instanttensor`` package (a stand-in: selection never imports it)."""
    (tmp_path / "site" / "instanttensor").mkdir(parents=True)
    (tmp_path / "site" / "instanttensor" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "instanttensor", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("llama")), make_tokenizer(41)


def test_auto_picks_instanttensor_only_when_installed_and_on_cuda(present):
    assert instanttensor_installed()
    assert choose_loader("auto", "cuda").name == "instanttensor"
    assert choose_loader("auto", "cuda:1").name == "instanttensor"
    for device in (None, "cpu", "meta"):
        assert choose_loader("auto", device).name == "safetensors"
    assert choose_loader("safetensors", "cuda").name == "safetensors"
    # instanttensor reads safetensors only: a DeepSpeed-Chat pytorch_model.bin goes through torch.load.
    assert choose_loader("auto", "cuda", "bin").name == "torch.load"
    assert choose_loader("instanttensor", "cuda", "bin").name == "torch.load"


def test_auto_falls_back_when_not_installed(absent):
    assert not instanttensor_installed()
    choice = choose_loader("auto", "cuda")
    assert choice.name == "safetensors" and "hfbuilder[fast]" in choice.why


def test_auto_on_cpu_builds_as_today(llama):
    path, tok = llama
    builder = ModelBuilder(AutoModelForCausalLM, path, tok)
    model, report = builder.build_with_report()
    facts = report.stage("load").facts
    assert facts["loader"] == "safetensors" and "load_gbps" not in facts  # a CPU build maps files, copies nothing
    assert builder.explain().stage("load").facts["loader"] == "safetensors"
    assert next(model.parameters()).device.type == "cpu"


def test_instanttensor_requested_off_cuda_or_not_installed_fails_before_work(llama, absent):
    path, tok = llama
    builder = ModelBuilder(AutoModelForCausalLM, path, tok).with_loader("instanttensor")
    with pytest.raises(BuilderInputError, match="CUDA devices only, but the build's device is None"):
        builder.build()
    with pytest.raises(BuilderInputError, match="CUDA devices only, but the build's device is 'cpu'"):
        builder.on_device("cpu").build()
    explanation = builder.explain()
    assert not explanation.ok and any("CUDA devices only" in e for e in explanation.errors)
    with pytest.raises(BuilderInputError, match=r"not installed: pip install 'hfbuilder\[fast\]'"):
        builder.on_device("cuda").build()


def test_loader_settings(llama):
    path, tok = llama
    builder = ModelBuilder(AutoModelForCausalLM, path, tok)
    assert builder.with_loader("safetensors", io="direct").options == {"loader": "safetensors", "loader_io": "direct"}
    assert builder.with_options(loader="instanttensor").settings["load"]["loader"] == "instanttensor"
    with pytest.raises(BuilderInputError, match="'auto', 'safetensors', 'instanttensor', 'transformers'"):
        builder.with_loader("fast")
    with pytest.raises(BuilderInputError, match="'auto', 'buffered', 'direct'"):
        builder.with_loader("auto", io="sideways")


def test_page_cache_probe_and_io_choice(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(8 << 20))
    files = [str(file)]
    file.read_bytes()
    assert cached_fraction(files) == 1.0
    assert choose_io("auto", files)[0] == "buffered"
    assert choose_io("direct", files) == ("direct", "load.io='direct'")
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    share = cached_fraction(files)
    if share == 1.0:
        pytest.skip("this filesystem keeps the file in memory (tmpfs)")
    assert share < 0.9
    mode, why = choose_io("auto", files)
    assert mode == "direct" and "cold disk" in why
    assert cached_fraction(files) == share  # asking reads nothing: the file stays cold


def _assign(path: str, model_class=AutoModelForCausalLM):
    config = AutoConfig.from_pretrained(path)
    reader = open_checkpoint(path)
    dtype = torch_dtype(pretrained_dtype(None, config, (reader.info(k).dtype for k in reader.keys())))
    model = build_on_meta(model_class, config, dtype)
    done = load_by_assignment(model, path, reader, Read("safetensors", reader.files, "cpu"), "cpu")
    assert not isinstance(done, str), done
    return done


@pytest.mark.parametrize("family", FAMILIES)
def test_assignment_gives_what_from_pretrained_gives(tmp_path, family):
    path = make_model(family, tmp_path / family, dtype=torch.float16)
    want = AutoModelForCausalLM.from_pretrained(path)
    done = _assign(path)
    got = done.model
    assert done.missing == [] and done.bytes > 0
    assert dict(got.named_parameters()).keys() == dict(want.named_parameters()).keys()
    for kind in ("named_parameters", "named_buffers"):
        expected = dict(getattr(want, kind)())
        for name, t in getattr(got, kind)():
            assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
    tied = {n for n, p in want.named_parameters(remove_duplicate=False)} - {n for n, _ in want.named_parameters()}
    assert {n for n, p in got.named_parameters(remove_duplicate=False)} - {n for n, _ in got.named_parameters()} == tied
    assert not got.training and got.config.name_or_path == path and got.config.dtype == want.config.dtype
    assert got.generation_config.to_dict() == want.generation_config.to_dict()


def test_assignment_initializes_what_the_checkpoint_lacks(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_model("llama", tmp_path / "m")
    state = load_file(os.path.join(path, "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    done = _assign(path)
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert done.missing == sorted(info["missing_keys"]) == ["lm_head.weight"]
    assert "lm_head.weight" in done.initialized and torch.isfinite(done.model.lm_head.weight).all()


def test_device_source_is_the_reader_itself_without_instanttensor(llama):
    path, _ = llama
    reader = open_checkpoint(path)
    source, choice, loaded = device_source(reader, "cpu", "auto", "auto")
    assert source is reader and choice.name == "safetensors" and loaded is None


def test_cpu_build_assigns_the_files_memory_map_and_transformers_loader_calls_from_pretrained(llama):
    """On the CPU a plain build is the architecture on the meta device assigned views of the memory-mapped
    files (what from_pretrained leaves on the CPU, without its per-tensor machinery); loader
    ``transformers`` is from_pretrained itself. Both give the same model."""
    path, tok = llama
    model, report = ModelBuilder(AutoModelForCausalLM, path, tok).build_with_report()
    assert "memory-mapped from the files" in " ".join(report.stage("load").actions)
    reference, report = ModelBuilder(AutoModelForCausalLM, path, tok).with_loader("transformers").build_with_report()
    assert report.stage("load").facts["loader"] == "transformers"
    assert any("from_pretrained" in a for a in report.stage("load").actions)
    # No copy: the same parameters are views of the mapped file (all but the two the resize stage grew).
    mapped = in_file_mapping(model)
    assert mapped == in_file_mapping(reference) and len(mapped) == len(list(model.parameters())) - 2
    want, got = reference.state_dict(), model.state_dict()
    rows = AutoConfig.from_pretrained(path).vocab_size  # the resize stage's new rows are drawn at random
    assert got.keys() == want.keys() and all(torch.equal(got[k][:rows], want[k][:rows]) for k in want)
    assert not model.training and model.generation_config.to_dict() == reference.generation_config.to_dict()


def test_transformers_loader_is_refused_nowhere_and_the_checkpoint_stage_reads_itself(llama):
    path, tok = llama
    reader = open_checkpoint(path)
    source, choice, loaded = device_source(reader, "cpu", "transformers", "auto")
    assert source is reader and choice.name == "safetensors" and loaded is None
    assert choose_loader("transformers", "cuda").name == "transformers"


def in_file_mapping(model) -> set[str]:
    """The parameters whose memory lies in a mapping of a ``.safetensors`` file (/proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, stop))
    return {n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in spans)}
