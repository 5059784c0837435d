"""The ``resize`` stage: round the vocabulary up to a multiple of 8 (or of ``resize_multiple``)."""

from __future__ import annotations

import math

from ..context import PROVENANCE_RESIZED, BuildContext
from ..errors import BuilderInputError
from ..hookspecs import hookimpl
from ..stage import Stage


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
    """``resize_token_embeddings`` to ``multiple * ceil(len(tokenizer) / multiple)``.

    Options: ``resize_multiple`` (default 8); ``resize_allow_shrink`` (default False:
    a vocabulary already larger, such as Qwen2's padded one, is kept; DeepSpeed-Chat
    shrinks it); ``mean_resizing`` (default True, transformers' default).
    """

    name = "resize"
    after = ("token_align",)

    def check(self, ctx: BuildContext) -> None:
        multiple = ctx.options.get("resize_multiple", 8)
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise BuilderInputError(f"resize_multiple must be a positive int, got {multiple!r}")
        try:
            len(ctx.tokenizer)
        except TypeError:
            raise BuilderInputError(f"the tokenizer {type(ctx.tokenizer).__name__} has no len()") from None

    def _target(self, ctx: BuildContext, current: int | None) -> int:
        return target_vocab(
            len(ctx.tokenizer),
            current,
            ctx.options.get("resize_multiple", 8),
            bool(ctx.options.get("resize_allow_shrink", False)),
        )

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
            rounded = target_vocab(n_tok, None, ctx.options.get("resize_multiple", 8), True)
            why = f"kept though {rounded} would do: resize_allow_shrink is off" if current and current > rounded else "unchanged"
            return [f"vocabulary stays {current} ({why}; len(tokenizer) = {n_tok})"]
        model = ctx.model
        if model is not None and hasattr(model, "resize_token_embeddings"):
            # The dry run's model is on the meta device: resizing it costs nothing and leaves
            # later stages' explain() the real shapes (tied or not, the count is exact).
            before = sum(p.numel() for p in model.parameters())
            model.resize_token_embeddings(target, mean_resizing=False)
            ctx.fact("parameters_added", sum(p.numel() for p in model.parameters()) - before)
        if ctx.options.get("deferred") and not ctx.zero3:
            how = "deferred, filled by the checkpoint or materialize stage"
        else:
            how = "mean-initialized" if ctx.options.get("mean_resizing", True) else "randomly initialized"
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
        mean_resizing = bool(ctx.options.get("mean_resizing", True))
        # A deferred build has its embeddings on the meta device: there are no rows to
        # average yet. The new rows stay deferred; the checkpoint or materialize stage fills them.
        deferred = not ctx.zero3 and weight.is_meta
        if ctx.zero3 and hasattr(weight, "ds_id"):
            from ..zero3 import resize_token_embeddings

            # Built for a strict checkpoint, the old rows hold no values yet: nothing to average.
            undefined = bool(ctx.state.get("zero3_values_undefined"))
            resize_token_embeddings(model, target, ctx.ds_config, mean_resizing=mean_resizing and not undefined)
            how = "partitioned; new rows drawn on rank 0 and broadcast"
            if undefined:
                how += "; not mean-resized: the old rows come from the checkpoint after this stage"
        else:
            model.resize_token_embeddings(target, mean_resizing=mean_resizing and not deferred)
            how = "transformers"
        if target > current:
            mark_resized(ctx, model, current, target)
            if deferred:
                matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                            if m is not None}
                ctx.state["resized_rows"] = [(w, current, target) for w in matrices.values()]
                ctx.note(f"rows {current}:{target} deferred (meta device) until the checkpoint or materialize stage")
        ctx.note(f"resize_token_embeddings {current} -> {target} ({how})")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [ResizeStage()]
