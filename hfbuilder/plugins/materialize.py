"""The ``materialize`` stage: give every tensor still on the meta device real, initialized memory.

A deferred build makes the model on the meta device so that no time goes into
initializing weights a checkpoint overwrites. Whatever nothing filled (rows the
resize stage added, a head the checkpoint lacks, or everything when there is no
checkpoint) is initialized here with the model's own ``_init_weights``, the way
``from_pretrained`` initializes missing keys: loaded tensors carry transformers'
``_is_hf_initialized`` flag, which ``initialize_weights`` and its guarded
``init.*`` functions skip. Nothing is left as ``torch.empty`` garbage: new memory
starts as NaN and the stage fails if any survives initialization.

Under ZeRO-3 transformers builds inside ``zero.Init`` and initializes there, so
this stage has nothing to do.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..context import PROVENANCE_INITIALIZED, BuildContext
from ..errors import InvariantError
from ..hookspecs import hookimpl
from ..stage import Stage
from ..weights import set_tensor, tensor_groups
from ..weights.assign import fill_new_rows, init_std

_LIST_AT_MOST = 12
NO_CHECKPOINT = (
    "deferred weights without a checkpoint: the weights are randomly initialized, not pretrained; "
    "load them before training (e.g. .with_checkpoint(path))"
)


def _outermost_pretrained(model: Any) -> list[tuple[str, Any]]:
    from transformers import PreTrainedModel

    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(f"{n}.") or n == "" for n, _ in found):
            found.append((name, module))
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


#: Tensors up to this many elements (rotary ``inv_freq``, norms, a value head) are initialized in CPU
#: memory and then copied to the device: no device kernel runs for them, and in a fresh process
#: the first launch of each kernel costs milliseconds to load its code.
STAGE_ON_CPU = 1 << 16


def materialize(model: Any, device: Any, skip: Collection[str] = ()) -> list[str]:
    """Replace meta tensors with initialized ones; return the names initialized (one per tensor).

    ``skip``: names a checkpoint will fill (assigned after this), left on the meta device and
    marked initialized, so the model's init neither touches them nor waits for them.
    """
    import torch

    meta = [g for g in tensor_groups(model, non_persistent=True) if g.tensor.is_meta and not skip_group(g, skip)]
    if not meta:
        return []
    new_ids: set[int] = set()
    new_tensors: dict[str, Any] = {}
    names_of: dict[str, tuple[str, ...]] = {}
    touched_modules: set[str] = set()
    for group in meta:
        old = group.tensor
        where = "cpu" if old.numel() <= STAGE_ON_CPU else device
        data = torch.empty(old.shape, dtype=old.dtype, device=where)
        data.fill_(float("nan") if data.is_floating_point() or data.is_complex() else 0)
        new = torch.nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else data
        for full in group.names:  # every name of a tied tensor gets the one new tensor
            set_tensor(model, full, new)
            touched_modules.add(full.rpartition(".")[0])
        new_ids.add(id(new))
        new_tensors[group.name] = new
        names_of[group.name] = group.names

    # Loaded tensors (and those a checkpoint will fill) are marked initialized so transformers'
    # init skips them; the modules holding new tensors (and their parents, whose _init_weights
    # may reach into children) are unmarked so it visits them.
    flagged = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in new_ids and not getattr(t, "_is_hf_initialized", False):
            t._is_hf_initialized = True
            flagged.append(t)
    visit = {""}
    for name in touched_modules:
        for ancestor in [*_ancestors(name), name] if name else [""]:
            model.get_submodule(ancestor)._is_hf_initialized = False
            visit.add(ancestor)
    # Every other module holds only loaded tensors: marked done now, as transformers marks each module it
    # visits, so that its _init_weights is not called for nothing (most of the time, for an LLM's
    # few non-persistent buffers).
    for name, module in model.named_modules():
        if name not in visit:
            module._is_hf_initialized = True
    try:
        pretrained = _outermost_pretrained(model)
        with torch.no_grad():
            for _, pm in pretrained:
                pm.initialize_weights()
        for name in new_tensors:
            if not any(n == "" or name.startswith(f"{n}.") for n, _ in pretrained):
                _reset_foreign(model, name, new_ids)
    finally:
        for t in flagged:
            del t._is_hf_initialized
    left = [n for n, t in new_tensors.items() if t.is_floating_point() and bool(torch.isnan(t).any())]
    if left:
        raise InvariantError(
            f"these tensors were still uninitialized after the model's _init_weights: {left[:_LIST_AT_MOST]}; "
            "initialize them in your plugin (or give their module a reset_parameters())"
        )
    if str(device) != "cpu":
        for name, t in new_tensors.items():
            if t.device.type == "cpu":
                moved = t.to(device)
                if isinstance(t, torch.nn.Parameter):
                    moved = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
                for full in names_of[name]:
                    set_tensor(model, full, moved)
    return sorted(new_tensors)


def skip_group(group: Any, skip: Collection[str]) -> bool:
    return bool(skip) and any(n in skip for n in group.names)


def _reset_foreign(model: Any, name: str, new_ids: set[int]) -> None:
    """A tensor outside every transformers model (a head's): its module's own ``reset_parameters``."""
    owner_name = name.rpartition(".")[0]
    module = model.get_submodule(owner_name) if owner_name else model
    own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
    if not hasattr(module, "reset_parameters") or any(id(t) not in new_ids for t in own):
        raise InvariantError(
            f"cannot initialize {name!r}: it is outside every transformers model and its module "
            f"{type(module).__name__} has no reset_parameters() that would leave loaded tensors alone"
        )
    import torch

    with torch.no_grad():
        module.reset_parameters()


def fill_grown_rows(model: Any, pending: dict[str, tuple[int, int]], mean_resizing: bool) -> list[str]:
    """Rows the resize stage added and the checkpoint did not have: their mean, or transformers' normal init."""
    done = []
    for name, (old, new) in pending.items():
        fill_new_rows(model.get_parameter(name), old, new, mean_resizing, init_std(model))
        done.append(f"{name}[{old}:{new}]")
    return done


class MaterializeStage(Stage):
    """In the plan with deferred weights; runs after resize, head and checkpoint."""

    name = "materialize"
    after = ("resize", "head", "checkpoint")

    def enabled(self, settings: Any) -> bool:
        return settings("load").deferred

    def explain(self, ctx: BuildContext) -> list[str]:
        if ctx.zero3:
            return ["nothing: under ZeRO-3 transformers initializes inside zero.Init"]
        if ctx.settings("checkpoint").path is None:
            ctx.warn(NO_CHECKPOINT)
            return ["initialize every weight with the model's _init_weights (no checkpoint)"]
        return ["initialize whatever the checkpoint did not fill (reported by name)"]

    def run(self, ctx: BuildContext) -> None:
        has_checkpoint = ctx.settings("checkpoint").path is not None
        if not has_checkpoint:
            ctx.warn(NO_CHECKPOINT)
        if ctx.zero3:
            ctx.note("ZeRO-3: transformers initialized the model inside zero.Init; nothing to materialize")
            return
        device = ctx.settings("load").device
        device = "cpu" if device in (None, "meta") else device
        persistent = set(ctx.model.state_dict(keep_vars=True))
        made = materialize(ctx.model, device)
        # Non-persistent buffers (rotary inv_freq...) are never in a checkpoint: the model computes them.
        buffers = [n for n in made if n not in persistent]
        names = [n for n in made if n in persistent]
        if buffers:
            ctx.note(f"computed {len(buffers)} non-persistent buffer(s) with the model's _init_weights: {', '.join(buffers)}")
        if device != "cpu":
            ctx.model.to(device)  # buffers were built on the CPU (init_empty_weights(include_buffers=False))
        pending, ctx.rows_to_fill = ctx.rows_to_fill, {}
        rows = fill_grown_rows(ctx.model, pending, ctx.settings("resize").mean_resizing)
        initialized = set(names)
        for name, _ in ctx.model.named_parameters():
            if name in initialized or (ctx.report.provenance.get(name, "").startswith("uninitialized")):
                ctx.report.provenance[name] = PROVENANCE_INITIALIZED
        if not names and not rows:
            ctx.note("every tensor was filled; nothing to initialize")
            return
        shown = names[:_LIST_AT_MOST] + ([f"... and {len(names) - _LIST_AT_MOST} more"] if len(names) > _LIST_AT_MOST else [])
        if names:
            ctx.note(f"initialized {len(names)} tensor(s) with the model's _init_weights: {', '.join(shown)}")
        if rows:
            how = "the mean of the loaded rows" if ctx.settings("resize").mean_resizing else "a normal init"
            ctx.note(f"filled rows added by resize with {how}: {', '.join(rows)}")
        if has_checkpoint and names:
            ctx.warn(f"the checkpoint did not provide {len(names)} tensor(s); they were initialized: {', '.join(shown)}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [MaterializeStage()]
