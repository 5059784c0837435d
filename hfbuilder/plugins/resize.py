"""The ``resize`` stage: round the vocabulary up to a multiple of 8 (or of ``resize_multiple``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..context import PROVENANCE_RESIZED, BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..settings import Settings, setting
from ..stage import Stage


@dataclass(frozen=True)
class ResizeSettings(Settings):
    multiple: int = setting(8, min=1, max=1 << 16, doc="round len(tokenizer) up to a multiple of this")
    allow_shrink: bool = setting(False, doc="shrink a vocabulary already larger than needed (DeepSpeed-Chat "
                                            "does; Qwen's padded vocabularies are kept otherwise)")
    mean_resizing: bool = setting(True, option="mean_resizing", doc="new rows start at the mean of the old ones (transformers' "
                                            "default); False: the model's init")


def target_vocab(n_tokens: int, current: int | None, multiple: int, allow_shrink: bool) -> int:
    """``multiple * ceil(n_tokens / multiple)``, but never below ``current`` unless shrinking is allowed."""
    target = multiple * math.ceil(n_tokens / multiple)
    if current is not None and current > target and not allow_shrink:
        return current
    return target


def current_vocab(config) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


def mark_resized(ctx: BuildContext, model, old: int, new: int) -> None:
    """Record in the provenance map that the embedding matrices gained rows ``old:new``."""
    resized = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied LM head too
        if id(p) in resized:
            source = ctx.report.provenance.get(name, "pretrained")
            ctx.report.provenance[name] = f"{source}+{PROVENANCE_RESIZED}[{old}:{new}]"


class ResizeStage(Stage):
    """``resize_token_embeddings`` to ``multiple * ceil(len(tokenizer) / multiple)``."""

    name = "resize"
    Settings = ResizeSettings
    after = ("token_align",)

    def check(self, ctx: BuildContext) -> None:
        try:
            len(ctx.tokenizer)
        except TypeError:
            raise BuilderInputError(f"the tokenizer {type(ctx.tokenizer).__name__} has no len()") from None

    def _target(self, ctx: BuildContext, current: int | None) -> int:
        settings = ctx.settings(self.name)
        return target_vocab(len(ctx.tokenizer), current, settings.multiple, settings.allow_shrink)

    def _decide(self, ctx: BuildContext, current: int | None) -> int:
        """The target vocabulary, with the facts and the shrink warning that explain and run share."""
        target = self._target(ctx, current)
        ctx.fact("vocab_size_before", current)
        ctx.fact("vocab_size", target)
        if current is not None and target < current:
            ctx.warn(f"shrinking the vocabulary from {current} to {target} rows (resize_allow_shrink)")
        return target

    def explain(self, ctx: BuildContext) -> list[str]:
        current = current_vocab(ctx.config)
        target = self._decide(ctx, current)
        n_tok = len(ctx.tokenizer)
        if current is None or target == current:
            rounded = target_vocab(n_tok, None, ctx.settings(self.name).multiple, True)
            why = f"kept though {rounded} would do: resize_allow_shrink is off" if current and current > rounded else "unchanged"
            return [f"vocabulary stays {current} ({why}; len(tokenizer) = {n_tok})"]
        model = ctx.model
        if model is not None and hasattr(model, "resize_token_embeddings"):
            # The dry run's model is on the meta device: resizing it costs nothing and leaves
            # later stages' explain() the real shapes (tied or not, the count is exact).
            before = sum(p.numel() for p in model.parameters())
            model.resize_token_embeddings(target, mean_resizing=False)
            ctx.fact("parameters_added", sum(p.numel() for p in model.parameters()) - before)
        if ctx.settings("load").deferred and not ctx.zero3:
            how = "deferred, filled by the checkpoint or materialize stage"
        else:
            how = "mean-initialized" if ctx.settings(self.name).mean_resizing else "randomly initialized"
        new = f"; rows {current}:{target} {how}" if target > current else ""
        return [f"resize_token_embeddings {current} -> {target} (len(tokenizer) = {n_tok}){new}"]

    def run(self, ctx: BuildContext) -> None:
        model = ctx.model
        weight = model.get_input_embeddings().weight
        current = tuple(getattr(weight, "ds_shape", weight.shape))[0]  # a partitioned weight's shape is (0,)
        target = self._decide(ctx, current)
        if target == current:
            # Not even transformers' resize: under ZeRO-3 it rebuilds the matrices at the same size.
            ctx.note(f"vocabulary already {current}: unchanged")
            return
        mean_resizing = ctx.settings(self.name).mean_resizing
        # A deferred build has its embeddings on the meta device: there are no rows to
        # average yet. The new rows stay deferred; the checkpoint or materialize stage fills them.
        deferred = not ctx.zero3 and weight.is_meta
        if ctx.zero3 and hasattr(weight, "ds_id"):
            from ..zero3 import resize_token_embeddings

            # Built for a strict checkpoint, the old rows hold no values yet: nothing to average.
            undefined = ctx.values_undefined
            resize_token_embeddings(model, target, ctx.ds_config, mean_resizing=mean_resizing and not undefined)
            how = "partitioned; new rows drawn on rank 0 and broadcast"
            if undefined:
                how += "; not mean-resized: the old rows come from the checkpoint after this stage"
        else:
            model.resize_token_embeddings(target, mean_resizing=mean_resizing and not deferred)
            how = "transformers"
        if target > current:
            mark_resized(ctx, model, current, target)
            # A checkpoint loaded after this stage may hold the old row count (saved before a resize,
            # or by a framework that does not resize): it fills the old rows, and the new ones are
            # filled from them, as on the meta device, so under ZeRO-3 too.
            later = ctx.zero3 and ctx.settings("load").deferred and ctx.settings("checkpoint").path is not None
            if deferred or later:
                matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                            if m is not None}
                ctx.resized_rows = [(w, current, target) for w in matrices.values()]
            if deferred:
                ctx.note(f"rows {current}:{target} deferred (meta device) until the checkpoint or materialize stage")
        ctx.note(f"resize_token_embeddings {current} -> {target} ({how})")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [ResizeStage()]
