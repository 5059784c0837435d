"""The ``checkpoint`` stage: load the whole (wrapped) model's weights from a checkpoint, strictly.

``.with_checkpoint(path)`` puts it in the plan, after the head, so the keys it
matches are the final model's: ``rwtransformer.*`` and ``v_head.weight`` for a
DeepSpeed-Chat step-2 reward model. DeepSpeed-Chat ignores every key that does not
match, so a typo leaves a ``v_head`` random without a word; here missing keys,
unexpected keys and shape mismatches are a :class:`~hfbuilder.CheckpointError`
that lists them.

Without ZeRO-3 the model was built on the meta device, so loading is assigning:
each parameter becomes the checkpoint's tensor, memory-mapped from a safetensors
file (or a zip ``.bin``) and converted only if its dtype differs. Nothing is
initialized and then overwritten. Under ZeRO-3 the work goes to
``hfbuilder.zero3.load_checkpoint_into_partitions``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint_io import CheckpointReader, find_checkpoint, open_checkpoint
from ..context import PROVENANCE_CHECKPOINT, PROVENANCE_RESIZED, BuildContext
from ..errors import CheckpointError
from ..hookspecs import hookimpl
from ..loaders import LoaderChoice, device_source
from ..settings import Settings, setting
from ..stage import Stage


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    path: str | None = setting(None, option="checkpoint",
                               doc="load the whole (wrapped) model's weights from this file or directory")
    strict: bool = setting(True, doc="missing or unexpected keys are an error; False: warnings, and materialize "
                                     "initializes what is missing")
    mmap: bool = setting(True, doc="keep tensors memory-mapped from the file; False copies them out")

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        super().__post_init__()

#: Keys transformers itself never reports as unexpected: buffers that old checkpoints saved.
ALWAYS_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
_LIST_AT_MOST = 20


@dataclass
class LoadPlan:
    """How the checkpoint's keys map onto the model's state dict."""

    #: model state-dict name -> checkpoint key, one entry per distinct tensor.
    sources: dict[str, str] = field(default_factory=dict)
    #: names that share one tensor (tied weights), when there is more than one.
    tied: list[list[str]] = field(default_factory=list)
    #: name -> (rows in the checkpoint, rows in the model), for embeddings the resize stage grew.
    partial_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    #: model name -> checkpoint key, where transformers' renamings map a legacy key.
    renamed: dict[str, str] = field(default_factory=dict)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_AT_MOST])
    return shown + (f", ... and {len(names) - _LIST_AT_MOST} more" if len(names) > _LIST_AT_MOST else "")


def _ignore_patterns(model: Any) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """The model's own ``_keys_to_ignore_on_load_missing/unexpected`` (transformers' exceptions)."""
    missing: set[str] = set()
    unexpected: set[str] = set(ALWAYS_IGNORED_UNEXPECTED)
    for module in model.modules():
        missing |= set(getattr(module, "_keys_to_ignore_on_load_missing", None) or ())
        unexpected |= set(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())

    def compile_(patterns: set[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(f"(?:{p})" for p in sorted(patterns))) if patterns else None

    return compile_(missing), compile_(unexpected)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", None) or t.shape)  # ZeRO-3 keeps the full shape in ds_shape


def legacy_names(model: Any, keys: list[str], expected: set[str]) -> dict[str, str]:
    """model name -> checkpoint key, for keys ``save_pretrained`` wrote under a legacy name.

    transformers 5 renames some weights when it loads (GPT-NeoX's ``embed_out`` is
    ``lm_head``) and renames them back when it saves. Only its plain renamings are
    applied here; checkpoints that need tensors merged or split are reported as
    mismatched keys.
    """
    unmatched = [k for k in keys if k not in expected]
    if not unmatched:
        # transformers builds its table of renamings (about a thousand compiled patterns) on
        # first use: a checkpoint whose every key matches must not pay for it.
        return {}
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # pragma: no cover - older transformers: nothing to rename
        return {}
    found: dict[str, str] = {}
    roots = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    for prefix, pm in roots:
        if any(prefix != p and (p == "" or prefix.startswith(p + ".")) for p, _ in roots):
            continue  # an enclosing transformers model already covers it
        head = f"{prefix}." if prefix else ""
        renamings = [t for t in get_model_conversion_mapping(pm) if type(t) is WeightRenaming]
        for key in unmatched:
            if key.startswith(head):
                name = head + apply_renamings(key[len(head):], renamings)
                if name != key and name in expected and name not in found:
                    found[name] = key
    return found


def match_keys(model: Any, reader: CheckpointReader, resized: dict[int, tuple[int, int]] | None = None) -> LoadPlan:
    """Compare the model's state dict with the checkpoint's keys and shapes; reads no tensor data."""
    resized = resized or {}
    plan = LoadPlan()
    groups: dict[int, list[str]] = {}
    tensors: dict[int, Any] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    expected = {n for names in groups.values() for n in names}
    where = {n: n for n in expected if n in reader}
    where.update({n: k for n, k in legacy_names(model, reader.keys(), expected).items() if n not in where})
    plan.renamed = {n: k for n, k in where.items() if n != k}
    ignore_missing, ignore_unexpected = _ignore_patterns(model)
    for tid, names in groups.items():
        if len(names) > 1:
            plan.tied.append(names)
        present = [n for n in names if n in where]
        if not present:
            if ignore_missing is not None and all(ignore_missing.search(n) for n in names):
                plan.ignored.extend(names)
            else:
                plan.missing.append(names[0])
            continue
        name = present[0]
        want = _shape(tensors[tid])
        have = reader.info(where[name]).shape
        if have != want:
            grown = resized.get(tid)
            if grown is not None and have == (grown[0], *want[1:]) and want[0] == grown[1]:
                plan.partial_rows[name] = grown
            else:
                plan.mismatched.append((name, have, want))
                continue
        plan.sources[name] = where[name]
        for other in present[1:]:
            if reader.info(where[other]).shape != have:
                plan.mismatched.append((other, reader.info(where[other]).shape, want))
    used = set(where.values())
    for key in reader.keys():
        if key not in used:
            if ignore_unexpected is not None and ignore_unexpected.search(key):
                plan.ignored.append(key)
            else:
                plan.unexpected.append(key)
    return plan


def _splits(key: str) -> list[tuple[str, str]]:
    head, dot, rest = key.partition(".")
    return [("", key)] + ([(head + dot, rest)] if dot else [])


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Say so when the keys differ only by a leading component (a bare LM loaded into a reward model...)."""
    if not missing or not unexpected:
        return ""
    by_rest: dict[str, set[str]] = {}
    for key in unexpected:
        for prefix, rest in _splits(key):
            by_rest.setdefault(rest, set()).add(prefix)
    counts: dict[tuple[str, str], int] = {}
    for key in missing:
        for model_prefix, rest in _splits(key):
            for ckpt_prefix in by_rest.get(rest, ()):
                if model_prefix != ckpt_prefix:
                    counts[(model_prefix, ckpt_prefix)] = counts.get((model_prefix, ckpt_prefix), 0) + 1
    if not counts:
        return ""
    (model_prefix, ckpt_prefix), hits = max(counts.items(), key=lambda item: item[1])
    if hits * 2 < len(missing):
        return ""
    return (
        f"\nhint: the keys differ only in their first part: the model has {model_prefix or '(nothing)'!r} where the "
        f"checkpoint has {ckpt_prefix or '(nothing)'!r}. with_checkpoint() expects the state dict of the model being "
        "built (head included). To start from a plain transformers model (e.g. the SFT output), build without "
        ".with_checkpoint() so from_pretrained reads it; to load a wrapped model, add the same head first."
    )


def check_plan(plan: LoadPlan, reader: CheckpointReader, model: Any, strict: bool, ctx: BuildContext) -> None:
    problems = []
    if plan.missing and strict:
        problems.append(f"missing from the checkpoint ({len(plan.missing)}): {_listing(plan.missing)}")
    if plan.unexpected and strict:
        problems.append(f"unexpected in the checkpoint ({len(plan.unexpected)}): {_listing(plan.unexpected)}")
    if plan.mismatched:
        shown = [f"{n}: checkpoint {list(have)} vs model {list(want)}" for n, have, want in plan.mismatched]
        problems.append(f"shape mismatch ({len(shown)}): {_listing(shown)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {reader.file} does not match {type(model).__name__}:\n  "
            + "\n  ".join(problems)
            + _prefix_hint(plan.missing, plan.unexpected)
        )
    if plan.missing:
        ctx.warn(f"checkpoint {reader.file} lacks {len(plan.missing)} tensor(s), initialized later: {_listing(plan.missing)}")
    if plan.unexpected:
        ctx.warn(f"checkpoint {reader.file} has {len(plan.unexpected)} tensor(s) the model does not use: "
                 f"{_listing(plan.unexpected)}")


def _set_tensor(model: Any, name: str, value: Any) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


def assign_from_checkpoint(model: Any, plan: LoadPlan, reader: CheckpointReader, *, device: Any = None,
                           keep_dtype: bool = False, mmap: bool = True) -> int:
    """Make each tensor the checkpoint's (``load_state_dict(assign=True)``); returns the bytes loaded.

    ``device``: read each tensor straight onto it (None: memory-mapped on the CPU). ``keep_dtype``:
    keep floating tensors in the checkpoint's dtype (``dtype="auto"``) instead of the model's.
    ``mmap=False`` copies tensors out of the file.
    """
    import torch

    device = None if device in (None, "meta") else device
    current = model.state_dict(keep_vars=True)
    state: dict[str, Any] = {}
    nbytes = 0
    for name, key in plan.sources.items():
        tensor = reader.get_tensor(key, device=device)
        loaded = tensor
        like = current[name]
        if tensor.is_floating_point() and not keep_dtype:
            tensor = tensor.to(like.dtype)  # the dtype the model was built in: the setting's or the config's
        elif not tensor.is_floating_point() and tensor.dtype != like.dtype:
            tensor = tensor.to(like.dtype)
        if name in plan.partial_rows:
            old, new = plan.partial_rows[name]
            full = torch.empty((new, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            full[:old].copy_(tensor)
            tensor = full  # rows old:new are initialized by the materialize stage
        elif tensor is loaded and not mmap:
            tensor = tensor.clone()
        state[name] = tensor
        nbytes += tensor.numel() * tensor.element_size()
    model.load_state_dict(state, strict=False, assign=True)
    # Tied names share one tensor again (assign replaced only the one that was loaded).
    after = model.state_dict(keep_vars=True)
    for names in plan.tied:
        loaded_names = [n for n in names if n in state]
        if not loaded_names:
            continue
        source, value = loaded_names[0], after[loaded_names[0]]
        for other in names:
            if other == source:
                continue
            other_key = plan.renamed.get(other, other)
            if other_key in reader and not _same_values(reader, other_key, value):
                raise CheckpointError(
                    f"checkpoint {reader.file} holds tied weights {source!r} and {other!r} with different values"
                )
            _set_tensor(model, other, value)
    return nbytes


def _same_values(reader: CheckpointReader, key: str, value: Any) -> bool:
    import torch

    other = reader.get_tensor(key)
    if other.data_ptr() == value.data_ptr():
        return True
    value = value.detach()[: other.shape[0]] if other.dim() else value.detach()  # grown rows are not in the file
    return other.shape == value.shape and torch.equal(other.to(value.dtype), value)


class CheckpointStage(Stage):
    """Loads the checkpoint into the final model; only in the plan when a checkpoint was given."""

    name = "checkpoint"
    after = ("head", "resize")
    Settings = CheckpointSettings

    def enabled(self, settings: Any) -> bool:
        return settings(self.name).path is not None

    def check(self, ctx: BuildContext) -> None:
        find_checkpoint(ctx.settings(self.name).path)  # a missing or unknown checkpoint fails before any work
        if ctx.zero3 and importlib.util.find_spec("hfbuilder.zero3") is None:
            raise CheckpointError(
                "loading a checkpoint under ZeRO-3 needs hfbuilder.zero3.load_checkpoint_into_partitions, "
                "which this installation lacks"
            )

    def explain(self, ctx: BuildContext) -> list[str]:
        settings = ctx.settings(self.name)
        fmt, file = find_checkpoint(settings.path)
        strict = settings.strict
        how = "into ZeRO-3 partitions" if ctx.zero3 else "by assignment onto the meta-device model (mmap, no init)"
        return [f"load every weight from {file} ({fmt}) {how}; {'strict' if strict else 'non-strict'} key matching"]

    def run(self, ctx: BuildContext) -> None:
        settings = ctx.settings(self.name)
        reader = open_checkpoint(settings.path)
        ctx.call_on_exit(reader.close)
        resized = {id(w): (old, new) for w, old, new in ctx.resized_rows}
        plan = match_keys(ctx.model, reader, resized)
        check_plan(plan, reader, ctx.model, settings.strict, ctx)
        ctx.load_plan = plan
        if ctx.zero3:
            from ..zero3 import load_checkpoint_into_partitions

            load_checkpoint_into_partitions(ctx.model, reader, ctx)
            ctx.note(f"loaded {len(plan.sources)} tensors from {reader.file} into ZeRO-3 partitions")
        else:
            load = ctx.settings("load")
            device = None if load.device in (None, "meta") else load.device
            start = time.perf_counter()
            started, ctx.weights_read = ctx.weights_read, None
            try:
                source, how, loaded = device_source(reader, device, load.loader, load.io, started)
            except CheckpointError as exc:
                if load.loader != "auto":
                    raise
                ctx.warn(f"{exc}; read with safetensors instead")
                source, how, loaded = reader, LoaderChoice("safetensors", "instanttensor's read failed"), None
            nbytes = assign_from_checkpoint(ctx.model, plan, source, device=device, keep_dtype=ctx.dtype == "auto",
                                            mmap=settings.mmap)
            seconds = time.perf_counter() - start
            ctx.rows_to_fill.update(plan.partial_rows)
            ctx.note(f"assigned {len(plan.sources)} tensors ({nbytes / 2**20:.1f} MiB) from {reader.file} ({reader.format})")
            ctx.fact("loader", how.name)
            if device not in (None, "cpu") and seconds > 0:
                nbytes, seconds = (loaded.bytes, loaded.seconds) if loaded is not None else (nbytes, seconds)
                ctx.fact("load_bytes", nbytes)
                ctx.fact("load_gbps", round(nbytes / seconds / 1e9, 2))
                ctx.note(f"read {nbytes / 1e9:.2f} GB onto {device} in {seconds:.3f} s "
                         f"({nbytes / seconds / 1e9:.1f} GB/s) with {how.name} ({how.why})")
        self._record(ctx, plan)

    def _record(self, ctx: BuildContext, plan: LoadPlan) -> None:
        group_of = {n: names for names in plan.tied for n in names}
        label: dict[str, str] = {}
        for source in plan.sources:
            if source in plan.partial_rows:
                old, new = plan.partial_rows[source]
                text = f"{PROVENANCE_CHECKPOINT}+{PROVENANCE_RESIZED}[{old}:{new}]"
            else:
                text = PROVENANCE_CHECKPOINT
            for name in group_of.get(source, [source]):
                label[name] = text
        for name, _ in ctx.model.named_parameters():
            if name in label:
                ctx.report.provenance[name] = label[name]
        if plan.ignored:
            ctx.note(f"ignored as transformers does: {_listing(plan.ignored)}")
        if plan.renamed:
            ctx.note(f"legacy names renamed as transformers does: {_listing([f'{k} -> {n}' for n, k in plan.renamed.items()])}")
        if plan.partial_rows:
            rows = ", ".join(f"{n}[{old}:{new}]" for n, (old, new) in plan.partial_rows.items())
            ctx.note(f"rows added by resize are not in the checkpoint and are left to materialize: {rows}")


@hookimpl
def hfbuilder_stages() -> list[Stage]:
    return [CheckpointStage()]
