"""Reward/critic checkpoints of every framework: detected, loaded with the same values, converted both ways.

Each framework's checkpoint is written by its own save code's recipe (tests/layout_writers.py)
from one tiny Llama and one known head, so every per-token value has a plain-torch answer:
``last_hidden_state @ W.T + b``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModel

import hfbuilder
from hfbuilder import BuilderInputError, CheckpointError, ModelBuilder, PluginError
from hfbuilder.layouts import BUILTIN_LAYOUTS, KeyMap, Layout, resolve_layout

try:  # tests/ is a package on main
    from .layout_writers import LAYOUTS, MEAN, STD, B, W, expected_values, inputs, tensors_of, write
except ImportError:  # pragma: no cover - tests/ as plain rootdir modules
    from layout_writers import LAYOUTS, MEAN, STD, B, W, expected_values, inputs, tensors_of, write

BIASED = {name for name, bias in LAYOUTS.items() if bias}


@pytest.fixture(scope="module")
def base(model_dir):
    # 48 rows = 8 * ceil(len(tokenizer) / 8): what DeepSpeed-Chat resizes to before it loads.
    return model_dir("llama", vocab_size=48)


@pytest.fixture(scope="module")
def written(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: write(name, str(root / name), base) for name in [*LAYOUTS, "openrlhf-old"]}


def critic(path: str, **options):
    from transformers import AutoTokenizer

    return ModelBuilder(AutoModel, path, AutoTokenizer.from_pretrained(path)).for_phase("critic", **options)


@pytest.mark.parametrize("name", [*LAYOUTS, "openrlhf-old"])
def test_each_layout_loads_with_the_frameworks_values(base, written, name):
    layout = name.removesuffix("-old")
    model, report = critic(written[name]).build_with_report()
    ids, mask = inputs()
    with torch.no_grad():
        values = model.eval().forward_value(ids, attention_mask=mask, return_value_only=True)
    torch.testing.assert_close(values, expected_values(base, LAYOUTS[layout]))
    assert ("v_head.bias" in model.state_dict()) == LAYOUTS[layout]
    assert {report.provenance[n] for n, _ in model.named_parameters()} == {"checkpoint"}
    assert report.stage("reward_layout").actions[0].startswith(f"layout {layout} (detected): ")
    assert report.stage("reward_layout").facts["reward_layout"] == layout
    assert model.reward_normalization == ((MEAN, STD) if layout == "openrlhf" else None)
    if layout in ("trl", "llamafactory"):
        assert "lm_head.weight" in " ".join(report.stage("checkpoint").actions)


def test_explain_names_the_layout_and_why(written):
    text = str(critic(written["openrlhf"]).explain())
    assert "layout openrlhf (detected): config.json value_head_prefix='score' and score.weight [1, 16]" in text
    assert "model.* -> rwtransformer.*; score.weight -> v_head.weight" in text
    assert "reward normalization (mean=0.5, std=2) kept as model.reward_normalization" in text
    text = str(critic(written["llamafactory"]).explain())
    assert "value_head.safetensors holds v_head.summary.weight [1, 16] and v_head.summary.bias [1]" in text
    assert "v_head has a bias, as the checkpoint's head does" in text


def test_transformers_classifiers_give_the_same_values(base, written):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    ids, mask = inputs()
    with torch.no_grad():
        tokencls = AutoModelForTokenClassification.from_pretrained(written["hf-tokencls"]).eval()
        ours = critic(written["hf-tokencls"]).build().eval()
        torch.testing.assert_close(ours.forward_value(ids, attention_mask=mask, return_value_only=True),
                                   tokencls(ids, attention_mask=mask).logits.squeeze(-1))
        seqcls = AutoModelForSequenceClassification.from_pretrained(written["hf-seqcls"]).eval()
        values = critic(written["hf-seqcls"]).build().eval().forward_value(ids, attention_mask=mask,
                                                                           return_value_only=True)
        last = (mask * torch.arange(ids.shape[1])).argmax(-1)  # the last token that is not padding
        torch.testing.assert_close(values[torch.arange(2), last], seqcls(ids, attention_mask=mask).logits[:, 0])


def test_a_plain_model_is_refused_never_given_a_random_head(model_dir):
    path = model_dir("llama")
    with pytest.raises(CheckpointError) as info:
        critic(path).build()
    text = str(info.value)
    assert "holds no reward/critic value head" in text and "random head" in text
    assert "config.json architectures ['LlamaForCausalLM']; lm_head.weight [45, 16], 20 keys under model." in text
    assert "build the 'reward' phase" in text
    with pytest.raises(CheckpointError, match="holds no reward/critic value head"):
        hfbuilder.convert(path, os.path.join(os.path.dirname(path), "never"), to="trl")


def test_ambiguous_checkpoints_name_every_candidate(written, tmp_path):
    import shutil

    both = tmp_path / "both"
    shutil.copytree(written["trl"], both)  # TRL's keys in the model, and LLaMA-Factory's file beside it
    shutil.copy(os.path.join(written["llamafactory"], "value_head.safetensors"), both)
    with pytest.raises(CheckpointError) as info:
        critic(str(both)).build()
    text = str(info.value)
    assert "fits more than one reward/critic layout" in text
    assert "trl: v_head.summary.weight [1, 16]" in text and "llamafactory: value_head.safetensors holds" in text
    model = critic(str(both), layout="trl").build()  # forcing one settles it
    assert torch.equal(model.v_head.bias, B)


def test_forced_layout_must_fit_and_be_known(written):
    with pytest.raises(CheckpointError, match="not in layout 'trl'.*no 'v_head.summary.weight'"):
        critic(written["openrlhf"], layout="trl").build()
    with pytest.raises(BuilderInputError, match="unknown checkpoint layout 'openrlfh'; valid layouts: auto, openrlhf"):
        critic(written["openrlhf"], layout="openrlfh").build()
    seqcls_as_openrlhf = critic(written["hf-seqcls"], layout="openrlhf").build()  # the same keys, forced
    assert torch.equal(seqcls_as_openrlhf.v_head.weight, W)


def _converted_values(layout: str, out: str, ids, mask):
    """The target framework's own model where transformers has it, else hfbuilder's critic."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    if layout in ("hf-seqcls", "hf-tokencls"):
        cls = AutoModelForSequenceClassification if layout == "hf-seqcls" else AutoModelForTokenClassification
        model, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        return model.eval()(ids, attention_mask=mask).logits.squeeze(-1)
    return critic(out).build().eval().forward_value(ids, attention_mask=mask, return_value_only=True)


def test_conversion_matrix_keeps_every_value(base, written, tmp_path):
    ids, mask = inputs()
    last = (mask * torch.arange(ids.shape[1])).argmax(-1)
    sources = {name: tensors_of(path)[1] for name, path in written.items() if name in LAYOUTS}
    for src, path in written.items():
        if src not in LAYOUTS:
            continue
        for dst in LAYOUTS:
            out = str(tmp_path / f"{src}-to-{dst}")
            if src in BIASED and dst not in BIASED:
                with pytest.raises(CheckpointError, match=f"has a bias \\(0.375\\) and {dst}'s head has none"):
                    hfbuilder.convert(path, out, to=dst)
                assert not os.path.exists(out) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
                continue
            result = hfbuilder.convert(path, out, to=dst)
            assert result.source == src and result.target == dst
            layout, got = tensors_of(out)
            assert layout == dst, (src, dst)  # the output is recognized as what it was written as
            want = dict(sources[src])
            if dst in BIASED and "v_head.bias" not in want:
                want["v_head.bias"] = torch.zeros(1)
                assert any("written as 0" in n for n in result.notes)
            assert sorted(got) == sorted(want), (src, dst)
            assert all(torch.equal(got[k], want[k]) for k in want), (src, dst)
            assert "tokenizer.json" in result.files
            normalization = [n for n in result.notes if "reward normalization" in n]
            if src == "openrlhf":
                assert ("carried" if dst == "openrlhf" else "dropped") in normalization[0]
            with torch.no_grad():
                values = _converted_values(dst, out, ids, mask)
            expected = expected_values(base, src in BIASED)
            if dst == "hf-seqcls":
                expected = expected[torch.arange(2), last]  # transformers pools at the last token
            torch.testing.assert_close(values, expected, msg=f"{src} -> {dst}")
    with open(tmp_path / "openrlhf-to-openrlhf" / "config.json") as fh:
        config = json.load(fh)
    assert (config["value_head_prefix"], config["mean"], config["std"]) == ("score", MEAN, STD)


def test_drop_bias_is_explicit_and_reported(written, tmp_path):
    result = hfbuilder.convert(written["trl"], tmp_path / "rm", to="hf-seqcls", drop_bias=True)
    assert any("bias 0.375 dropped" in n for n in result.notes)
    assert torch.equal(tensors_of(str(tmp_path / "rm"))[1]["v_head.weight"], W)


def test_dschat_output_is_what_step_3_loads(base, written, tmp_path, model_dir):
    """DeepSpeed-Chat's create_critic_model: from_config, resize to a multiple of 8, then the .bin."""
    from transformers import AutoConfig, AutoTokenizer

    from hfbuilder.plugins.reward_model import RewardModel

    out = tmp_path / "dschat"
    hfbuilder.convert(written["hf-seqcls"], out, to="dschat")
    assert {"config.json", "pytorch_model.bin", "tokenizer.json"} <= set(os.listdir(out))
    tok = AutoTokenizer.from_pretrained(out)
    body = AutoModel.from_config(AutoConfig.from_pretrained(out))
    body.resize_token_embeddings(8 * -(-len(tok) // 8))
    model = RewardModel(body, tok)
    model.load_state_dict(torch.load(out / "pytorch_model.bin", weights_only=True), strict=True)
    ids, mask = inputs()
    with torch.no_grad():
        values = model.eval().forward_value(ids, attention_mask=mask, return_value_only=True)
    torch.testing.assert_close(values, expected_values(base, False))
    small = write("hf-seqcls", str(tmp_path / "v45"), model_dir("llama"))  # 45 rows, DS-Chat resizes to 48
    notes = hfbuilder.convert(small, tmp_path / "dschat45", to="dschat").notes
    assert any("= 48 rows before loading, and rwtransformer.embed_tokens.weight has 45" in n for n in notes)


def test_convert_refuses_an_existing_output_and_bad_names(written, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(BuilderInputError, match="already exists"):
        hfbuilder.convert(written["trl"], tmp_path / "full", to="trl")
    with pytest.raises(BuilderInputError, match="valid layouts: auto, trl"):
        hfbuilder.convert(written["trl"], tmp_path / "o", to="trll")


class _Prefixed(Layout):
    """A third party's layout: the body under ``backbone.``, the head at ``reward_head``."""

    name = "acme"
    framework = "Acme RL: backbone.* and reward_head.weight"

    def detect(self, keys, config, folder):
        return "reward_head.weight" if "reward_head.weight" in keys else None

    def key_map(self, keys, config, folder):
        return KeyMap("backbone.", "reward_head.weight")

    def write(self, out_dir, export):
        from safetensors.torch import save_file

        state = {"backbone." + k.removeprefix("rwtransformer."): v.contiguous() for k, v in export.tensors.items()
                 if k.startswith("rwtransformer.")}
        save_file({**state, "reward_head.weight": export.tensors["v_head.weight"]}, f"{out_dir}/model.safetensors")
        with open(f"{out_dir}/config.json", "w") as fh:
            json.dump(dict(export.config), fh)
        return []


class AcmePlugin:
    @hfbuilder.hookimpl
    def hfbuilder_reward_layouts(self):
        return [_Prefixed]


def test_a_plugin_adds_a_layout_read_and_written_like_the_built_ins(base, written, tmp_path):
    out = tmp_path / "acme"
    hfbuilder.convert(written["openrlhf"], out, to="acme", plugins=[AcmePlugin()])
    with pytest.raises(CheckpointError, match="holds no reward/critic value head"):
        critic(str(out)).build()
    model, report = critic(str(out)).with_plugin(AcmePlugin()).build_with_report()
    assert "[layout from " in report.stage("reward_layout").actions[0]
    ids, mask = inputs()
    with torch.no_grad():
        values = model.eval().forward_value(ids, attention_mask=mask, return_value_only=True)
    torch.testing.assert_close(values, expected_values(base, False))

    class Twice:
        @hfbuilder.hookimpl
        def hfbuilder_reward_layouts(self):
            return [BUILTIN_LAYOUTS[0]]

    with pytest.raises(PluginError, match="two plugins provide reward layout 'dschat'"):
        critic(str(out)).with_plugin(Twice()).build()


def test_cli_convert(written, tmp_path, capsys):
    from hfbuilder.cli import main

    assert main(["convert", written["llamafactory"], str(tmp_path / "out"), "--to", "hf-tokencls", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["source"], result["target"]) == ("llamafactory", "hf-tokencls")
    assert main(["convert", written["llamafactory"], str(tmp_path / "o2"), "--to", "dschat"]) == 2
    assert "has a bias (0.375)" in capsys.readouterr().err
    assert resolve_layout(str(tmp_path / "out"), {x.name: x for x in BUILTIN_LAYOUTS}).layout.name == "hf-tokencls"


@pytest.mark.zero3
def test_zero3_streams_other_layouts_into_partitions(written, tmp_path):
    try:
        from .zero3_harness import run_ranks
    except ImportError:  # pragma: no cover - tests/ as plain rootdir modules
        from zero3_harness import run_ranks

    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "bf16": {"enabled": True}}
    cases = {name: written[name] for name in ("openrlhf", "llamafactory")}
    worker = os.path.join(os.path.dirname(__file__), "layouts_worker.py")
    for rank in run_ranks(worker, {"cases": cases, "ds": ds}, 2, tmp_path, timeout=300):
        for name in cases:
            facts = rank[name]
            assert facts["ok"], f"rank {rank['rank']} {name}:\n{facts.get('error')}"
            assert facts["layout"] == name and facts["loaded_into_partitions"]
            assert facts["unpartitioned"] == [] and facts["provenance"] == ["checkpoint"]
            assert facts["equal"] == facts["keys"] == facts["params"]  # every weight, the head's bias too
            assert ("v_head.bias" in facts["params"]) == (name == "llamafactory")
            assert facts["normalization"] == ([MEAN, STD] if name == "openrlhf" else None)
