"""The typed contract between stages: a stage written only against docs/plugins.md can replace a built-in."""

from __future__ import annotations

import torch
from transformers import AutoModel

from hfbuilder import ModelBuilder, Stage
from hfbuilder.context import BuildContext


class ContractResize(Stage):
    """A third party's resize, using only what docs/plugins.md documents: its settings and ``resized_rows``."""

    name = "contract_resize"
    replaces = "resize"

    def run(self, ctx: BuildContext) -> None:
        settings = ctx.settings("resize")
        model = ctx.model
        weight = model.get_input_embeddings().weight
        old = weight.shape[0]
        new = settings.multiple * -(-len(ctx.tokenizer) // settings.multiple)
        if new <= old:
            return
        deferred = weight.is_meta
        model.resize_token_embeddings(new, mean_resizing=settings.mean_resizing and not deferred)
        if deferred:  # the documented hand-over: grown matrices whose values the checkpoint stage fills
            matrices = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
            ctx.resized_rows = [(w, old, new) for w in {id(w): w for w in matrices}.values()]


def _step2(tmp_path, model_dir, tokenizer_for):
    """A step-2 reward model saved before the vocabulary was rounded up (45 rows; the critic needs 48)."""
    path = model_dir("gpt_neox")
    tok = tokenizer_for(path)
    rm = ModelBuilder(AutoModel, path, tok).with_head("reward").without_stage("resize").build()
    with torch.no_grad():
        rm.v_head.weight.copy_(torch.linspace(-1, 1, rm.v_head.weight.numel()).view_as(rm.v_head.weight))
    out = tmp_path / "step2"
    rm.rwtransformer.config.save_pretrained(out)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in rm.state_dict().items()}, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    return str(out), tok, rm


def test_a_replaced_resize_keeps_the_critics_grown_rows_filled_as_the_built_in_does(tmp_path, model_dir, tokenizer_for):
    path, tok, rm = _step2(tmp_path, model_dir, tokenizer_for)
    critic = ModelBuilder(AutoModel, path, tok).for_phase("critic")
    built_in, report = critic.build_with_report()
    replaced, replaced_report = critic.replace_stage(ContractResize).build_with_report()
    assert "contract_resize" in replaced_report.plan and "resize" not in replaced_report.plan
    assert built_in.rwtransformer.get_input_embeddings().weight.shape[0] == 48
    old = rm.rwtransformer.get_input_embeddings().weight
    grown = built_in.rwtransformer.get_input_embeddings().weight
    torch.testing.assert_close(grown[45:], old.mean(0, keepdim=True).expand(3, -1))  # the mean, not garbage
    assert built_in.state_dict().keys() == replaced.state_dict().keys()
    for key, value in built_in.state_dict().items():
        assert torch.equal(replaced.state_dict()[key], value), key
    assert not report.failed_invariants() and not replaced_report.failed_invariants()
