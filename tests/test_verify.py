"""The provenance map and the post-build invariants (hfbuilder.verify)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

import hfbuilder
from hfbuilder import (
    BuildContext,
    BuilderInputError,
    CheckpointError,
    Head,
    InvariantError,
    InvariantWarning,
    ModelBuilder,
    Stage,
    hookimpl,
)
from hfbuilder.context import (
    PROVENANCE_CHECKPOINT,
    PROVENANCE_HEAD_INIT,
    PROVENANCE_INITIALIZED,
    PROVENANCE_PRETRAINED,
    PROVENANCE_UNINITIALIZED,
    provenance_origin,
)
from hfbuilder.verify import VerifySettings, check_invariants


class Scored(nn.Module):
    """A reward-style wrapper: base model plus a scalar head on the last token."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.v_head = nn.Linear(base.config.hidden_size, 1, bias=False)


class CheckpointedHead(Head):
    """A head that must come from a checkpoint, like a critic's v_head."""

    name = "scored"

    def describe(self, ctx, **options):
        return ["v_head on the last token; expects its weights from the checkpoint"]

    def wrap(self, model, ctx, **options):
        ctx.expect("v_head.*", PROVENANCE_CHECKPOINT)
        return Scored(model)


class LoadCheckpoint(Stage):
    """A checkpoint stage of a third party: loads what the file has, records it."""

    name = "test_checkpoint"
    after = ("head",)

    @dataclass(frozen=True)
    class Settings(hfbuilder.Settings):
        path: str | None = hfbuilder.setting(None, option="test_checkpoint", doc="the file to load")

    def enabled(self, settings):
        return settings(self.name).path is not None

    def run(self, ctx):
        from safetensors.torch import load_file

        state = load_file(ctx.settings(self.name).path)
        ctx.model.load_state_dict(state, strict=False)
        for key in state:
            ctx.report.provenance[key] = PROVENANCE_CHECKPOINT


class CheckpointPlugin:
    @hookimpl
    def hfbuilder_heads(self):
        return [CheckpointedHead()]

    @hookimpl
    def hfbuilder_stages(self):
        return [LoadCheckpoint()]


def _scored(model_dir, tokenizer_for, checkpoint):
    path = model_dir("opt")
    return (
        ModelBuilder(AutoModel, path, tokenizer_for(path))
        .with_plugin(CheckpointPlugin())
        .with_head("scored")
        .with_options(test_checkpoint=str(checkpoint))
    )


def _save_scored(model_dir, tokenizer_for, path, with_v_head: bool):
    builder = _scored(model_dir, tokenizer_for, "unused").without_options("test_checkpoint")
    model = builder.with_options(invariants="off").build()
    state = {k: v.clone() for k, v in model.state_dict().items() if with_v_head or not k.startswith("v_head.")}
    save_file(state, path)
    return state


def test_every_parameter_has_a_provenance(family, model_dir, tokenizer_for):
    path = model_dir(family)
    model, report = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).build_with_report()
    assert set(report.provenance) == {name for name, _ in model.named_parameters()}
    assert {provenance_origin(v) for v in report.provenance.values()} == {PROVENANCE_PRETRAINED}
    assert [(r.name, r.passed) for r in report.invariants] == [
        ("finite", True), ("materialized", True), ("expected", True), ("tied", True)]
    resized = [k for k, v in report.provenance.items() if "+resized" in v]
    assert bool(resized) == (family != "qwen2")  # qwen2's padded vocabulary is kept


def test_head_missing_from_the_checkpoint_is_flagged(model_dir, tokenizer_for, tmp_path):
    ckpt = tmp_path / "no_v_head.safetensors"
    _save_scored(model_dir, tokenizer_for, ckpt, with_v_head=False)
    builder = _scored(model_dir, tokenizer_for, ckpt)
    assert "v_head on the last token" in str(builder.explain())

    with pytest.raises(InvariantError, match=r"v_head\.weight: expected from checkpoint .*'head_init'") as info:
        builder.build()
    report = info.value.report
    assert report.provenance["v_head.weight"] == PROVENANCE_HEAD_INIT
    assert report.provenance["base.decoder.layers.0.fc1.weight"] == PROVENANCE_CHECKPOINT
    assert [r.name for r in report.failed_invariants()] == ["expected"]

    with pytest.warns(InvariantWarning, match="v_head.weight"):
        model, report = builder.with_options(invariants="warn").build_with_report()
    assert isinstance(model, Scored) and report.failed_invariants()[0].name == "expected"
    assert any("invariant expected failed" in w for w in report.warnings)


def test_head_loaded_from_the_checkpoint_passes(model_dir, tokenizer_for, tmp_path):
    ckpt = tmp_path / "full.safetensors"
    state = _save_scored(model_dir, tokenizer_for, ckpt, with_v_head=True)
    model, report = _scored(model_dir, tokenizer_for, ckpt).build_with_report()
    assert not report.failed_invariants()
    assert report.provenance["v_head.weight"] == PROVENANCE_CHECKPOINT
    assert torch.equal(model.v_head.weight, state["v_head.weight"])


def test_a_head_renames_parameters_and_keeps_their_provenance(model_dir, tokenizer_for):
    path = model_dir("opt")
    builder = ModelBuilder(AutoModel, path, tokenizer_for(path)).with_plugin(CheckpointPlugin()).with_head("scored")
    model, report = builder.with_options(invariants="off").build_with_report()
    assert report.invariants == []
    assert report.provenance["base.decoder.layers.1.fc2.weight"] == PROVENANCE_PRETRAINED
    assert report.provenance["base.decoder.embed_tokens.weight"].startswith("pretrained+resized[")
    assert report.provenance["v_head.weight"] == PROVENANCE_HEAD_INIT
    assert set(report.provenance) == {n for n, _ in model.named_parameters()}


class Poison(Stage):
    name = "poison"
    after = ("resize",)

    def run(self, ctx):
        with torch.no_grad():
            next(ctx.model.parameters())[0, 0] = float("nan")


def test_nan_weights_fail_the_build(model_dir, tokenizer_for):
    path = model_dir("llama")
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_stage(Poison)
    with pytest.raises(InvariantError, match=r"finite: model\.embed_tokens\.weight holds NaN or inf"):
        builder.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InvariantWarning)
        _, report = builder.with_options(invariants="off").build_with_report()
    assert report.invariants == []


class PoisonLoaded(Stage):
    """NaN in a weight the build copied untouched from the checkpoint."""

    name = "poison_loaded"
    after = ("resize",)

    def run(self, ctx):
        with torch.no_grad():
            ctx.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")


def test_weights_read_from_files_are_checked_on_request(model_dir, tokenizer_for):
    path = model_dir("llama")
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_stage(PoisonLoaded)
    _, report = builder.build_with_report()  # by default only what the build wrote is read
    assert report.invariants[0].name == "finite" and report.invariants[0].passed
    with pytest.raises(InvariantError, match=r"layers\.0\.mlp\.up_proj\.weight holds NaN"):
        builder.with_options(check_finite="all").build()
    with pytest.raises(BuilderInputError, match="check_finite"):
        builder.with_options(check_finite="some").build()


class ClaimPretrained(Stage):
    """A buggy plugin: says a meta tensor was loaded."""

    name = "claim"
    after = ("resize",)

    def run(self, ctx):
        name = next(n for n, _ in ctx.model.named_parameters())
        ctx.report.provenance[name] = PROVENANCE_PRETRAINED


def test_deferred_weights_left_on_meta_are_uninitialized_not_an_error(model_dir, tokenizer_for):
    path = model_dir("gpt2")
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).deferred_weights()
    with pytest.warns(UserWarning, match="without a checkpoint"):
        _, report = builder.build_with_report()  # materialize initializes every weight
    assert {provenance_origin(v) for v in report.provenance.values()} == {PROVENANCE_INITIALIZED}
    assert not report.failed_invariants()

    meta = builder.without_stage("materialize")  # the caller loads the weights later
    model, report = meta.build_with_report()
    assert all(p.is_meta for p in model.parameters()) and not report.failed_invariants()
    assert {provenance_origin(v) for v in report.provenance.values()} == {PROVENANCE_UNINITIALIZED}
    with pytest.raises(InvariantError, match="materialized: transformer.wte.weight is on the meta device"):
        meta.with_stage(ClaimPretrained).build()


def test_bad_invariants_option_fails_before_any_work(model_dir, tokenizer_for):
    path = model_dir("opt")
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))
    with pytest.raises(BuilderInputError, match="invariants .*must be one of"):
        builder.with_options(invariants="maybe")  # refused where it is set, before any build
    with pytest.raises(BuilderInputError, match="invariants .*must be one of"):
        builder.configure("verify", invariants="maybe")


def test_expectation_matching_nothing_fails(model_dir, tokenizer_for):
    class Promise(Stage):
        name = "promise"
        after = ("resize",)

        def run(self, ctx):
            ctx.expect("score.*", PROVENANCE_CHECKPOINT)

    path = model_dir("opt")
    with pytest.raises(InvariantError, match="expects 'score.\\*' from checkpoint, but no parameter matches"):
        ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path)).with_stage(Promise).build()


def test_zero3_partitions_are_checked_locally():
    """Under ZeRO-3 a parameter's data is empty and its values live in ``ds_tensor``."""
    layer = nn.Linear(2, 2)
    for p in layer.parameters():
        p.ds_id = 0
        p.ds_tensor = torch.ones(3)
        p.data = torch.empty(0)
    layer.weight.ds_tensor[1] = float("inf")
    ctx = BuildContext(model_class=None, model_name_or_path="x", tokenizer=None, model=layer,
                       stage_settings={"verify": VerifySettings(check_finite="all")})  # file weights: on request
    ctx.report.provenance = {"weight": PROVENANCE_PRETRAINED, "bias": PROVENANCE_PRETRAINED}
    finite = check_invariants(ctx)[0]
    assert not finite.passed and finite.details == ["weight holds NaN or inf"]


def test_an_overflowing_fp16_sum_is_not_reported():
    """The finite check sums each tensor; a sum past fp16's range is confirmed elementwise."""
    layer = nn.Linear(1000, 100, bias=False).to(torch.float16)
    with torch.no_grad():
        layer.weight.fill_(10.0)  # sums to 1e6: inf in fp16, yet every element is finite
    ctx = BuildContext(model_class=None, model_name_or_path="x", tokenizer=None, model=layer,
                       stage_settings={"verify": VerifySettings(check_finite="all")})
    ctx.report.provenance = {"weight": PROVENANCE_PRETRAINED}
    assert check_invariants(ctx)[0].passed


def test_reward_model_from_a_checkpoint_without_v_head_is_flagged(model_dir, tokenizer_for, tmp_path):
    path = model_dir("opt")
    tok = tokenizer_for(path)
    rm = ModelBuilder(AutoModel, path, tok).with_head("reward", num_padding_at_beginning=1).build()
    step2 = tmp_path / "step2"
    step2.mkdir()
    save_file({k: v.contiguous() for k, v in rm.state_dict().items() if k != "v_head.weight"}, step2 / "model.safetensors")
    rm.config.to_json_file(str(step2 / "config.json"))
    critic = ModelBuilder(AutoModel, str(step2), tok).with_head("reward", num_padding_at_beginning=1)

    with pytest.raises(CheckpointError, match="v_head.weight"):  # strict by default: refused before use
        critic.with_checkpoint().build()

    lenient = critic.with_checkpoint(strict=False)
    with pytest.warns(UserWarning, match="v_head.weight"):
        _, report = lenient.build_with_report()
    assert report.provenance["v_head.weight"] == "initialized"  # the map says it is not the checkpoint's
    assert {v for k, v in report.provenance.items() if k != "v_head.weight"} == {PROVENANCE_CHECKPOINT}

    promised = lenient.with_options(expect={"v_head.*": PROVENANCE_CHECKPOINT})
    assert "expects 'v_head.*' from checkpoint (option expect)" in str(promised.explain())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(InvariantError, match=r"v_head\.weight: expected from checkpoint \(declared by option expect\)"):
            promised.build()
    with pytest.raises(BuilderInputError, match="option expect"):
        critic.with_options(expect={"v_head.*": "somewhere"}).explain()


def test_nan_in_a_pretrained_checkpoint_is_caught_where_promised(tmp_path, tokenizer_for):
    """CPU weights from a file are checked with check_finite="all"; weights the build wrote always."""
    from hfbuilder.testing import make_model

    path = make_model("llama", tmp_path / "nan")
    from safetensors.torch import load_file

    state = load_file(f"{path}/model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    builder = ModelBuilder(AutoModelForCausalLM, path, tokenizer_for(path))
    with pytest.raises(InvariantError, match="model.layers.0.mlp.up_proj.weight holds NaN or inf"):
        builder.with_options(check_finite="all").build()
    assert VerifySettings().check_finite == "auto"  # on the CPU: what the build wrote, as documented
    model, report = builder.with_options(invariants="warn").build_with_report()
    assert report.invariants[0].name == "finite"


def test_a_tensor_read_finite_is_not_read_again_while_it_is_that_tensor():
    """``ctx.read_finite`` (a load backend summed the tensor as it arrived) spares the second read,
    but only for the very tensor it checked: a replaced or cast parameter is read again."""
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")  # the reader would have seen it; the record says it did not
    settings = {"verify": VerifySettings(check_finite="all")}

    def finite(read_finite, provenance=PROVENANCE_PRETRAINED):
        ctx = BuildContext(model_class=None, model_name_or_path="x", tokenizer=None, model=layer,
                           stage_settings=settings)
        ctx.report.provenance = {"weight": provenance, "bias": PROVENANCE_PRETRAINED}
        ctx.read_finite.update(read_finite)
        return check_invariants(ctx)[0]

    record = (layer.weight, layer.weight.data_ptr())
    assert not finite({}).passed
    assert finite({"weight": record}).passed  # the record is trusted for that tensor
    assert not finite({"weight": (layer.bias, record[1])}).passed  # another parameter: read again
    assert not finite({"weight": (layer.weight, record[1] + 4)}).passed  # other memory (.data replaced): again
    assert not finite({"weight": record}, f"{PROVENANCE_PRETRAINED}+resized[0:1]").passed  # changed since


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_names_each_bad_tensor_once(dtype):
    from hfbuilder.weights import FiniteSums, nonfinite

    good, nan, inf = torch.ones(8, 4, dtype=dtype), torch.ones(8, 4, dtype=dtype), torch.ones(3, dtype=dtype)
    nan[2, 1], inf[0] = float("nan"), float("-inf")
    named = [("good", good), ("nan", nan), ("ints", torch.arange(4)), ("inf", inf), ("empty", torch.ones(0, dtype=dtype)),
             ("scalar", torch.tensor(float("nan"), dtype=dtype)), ("meta", torch.empty(2, device="meta"))]
    assert nonfinite(named) == ["nan", "inf", "scalar"]
    complex_bad = torch.ones(2, dtype=torch.complex64)
    complex_bad[1] = complex(float("inf"), 0)
    assert nonfinite([("c", complex_bad), ("c2", torch.ones(2, dtype=torch.complex64))]) == ["c"]
    sums = FiniteSums(1, "cpu")
    sums.add("a", good)
    sums.add("i", torch.arange(3))  # nothing to sum: no slot taken
    with pytest.raises(ValueError, match="holds 1 sums"):
        sums.add("b", good)
    assert sums.finite() == {"a", "i"}


def test_prewarming_the_finite_sums_touches_no_cpu_tensor_and_no_cuda():
    from hfbuilder.weights import FiniteSums

    FiniteSums.prewarm("cpu")  # nothing to load off CUDA
    assert not torch.cuda.is_initialized()
