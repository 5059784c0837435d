"""Strict keys: which checkpoint tensor fills which model tensor, and what does not fit.

DeepSpeed-Chat ignores every key that does not match, so a typo leaves a ``v_head``
random without a word. Here :func:`match_keys` compares the model's tensors with the
checkpoint's keys and shapes (headers only) and :func:`check_plan` turns what does
not fit into one :class:`~hfbuilder.CheckpointError` listing every problem, before
any tensor is read. Both the checkpoint stage and ZeRO-3's partition loader use them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from .keys import map_keys
from .reader import Reader
from .tied import tensor_groups

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
    #: checkpoint keys transformers would convert (merge or split), which a plain load cannot; also unexpected.
    converted: list[str] = field(default_factory=list)
    #: (name, checkpoint dtype, model dtype) where one is a float and the other is not: bytes that would load as garbage.
    wrong_dtype: list[tuple[str, str, str]] = field(default_factory=list)
    #: model name -> the file its checkpoint tensor is in, for the names listed as problems above.
    files: dict[str, str] = field(default_factory=dict)


def listing(names: list[str]) -> str:
    """At most a screenful of names, for messages."""
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


def dtype_kind(dtype: str) -> str:
    """"float", "complex", "bool" or "int": values of one kind cannot be read as another."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype.startswith(("float", "bfloat")):
        return "float"
    return "complex" if dtype.startswith("complex") else "bool" if dtype == "bool" else "int"


def match_keys(model: Any, reader: Reader, grown: Mapping[int, tuple[int, int]] | None = None, *,
               prefixes: bool = False) -> LoadPlan:
    """Compare the model's tensors with the checkpoint's keys and shapes; reads no tensor data.

    ``grown`` maps ``id(tensor)`` to ``(rows in the checkpoint, rows in the model)`` for
    matrices the resize stage grew: their checkpoint rows load, the new ones are left to
    the caller. ``prefixes`` adds ``from_pretrained``'s base-model prefix rule (see
    :func:`~hfbuilder.weights.keys.map_keys`).
    """
    grown = grown or {}
    plan = LoadPlan()
    keys = list(reader.keys())
    groups = tensor_groups(model)
    keymap = map_keys(model, keys, prefixes=prefixes, groups=groups)
    where = keymap.sources()  # model name -> checkpoint key
    plan.renamed = {n: k for n, k in where.items() if n != k}
    plan.converted = list(keymap.converted)
    ignore_missing, ignore_unexpected = _ignore_patterns(model)
    for group in groups:
        names = list(group.names)
        if len(names) > 1:
            plan.tied.append(names)
        present = [n for n in names if n in where]
        if not present:
            if ignore_missing is not None and all(ignore_missing.search(n) for n in names):
                plan.ignored.extend(names)
            else:
                plan.missing.append(names[0])
            continue
        name, want = present[0], group.shape
        info = reader.info(where[name])
        have = tuple(info.shape)
        model_dtype = str(group.tensor.dtype).removeprefix("torch.")
        if dtype_kind(info.dtype) != dtype_kind(model_dtype):
            plan.wrong_dtype.append((name, info.dtype, model_dtype))
            plan.files[name] = info.file
            continue
        if have != want:
            rows = grown.get(id(group.tensor))
            if rows is not None and have == (rows[0], *want[1:]) and want[0] == rows[1]:
                plan.partial_rows[name] = rows
            else:
                plan.mismatched.append((name, have, want))
                plan.files[name] = info.file
                continue
        plan.sources[name] = where[name]
        for other in present[1:]:
            other_info = reader.info(where[other])
            if tuple(other_info.shape) != have:
                plan.mismatched.append((other, tuple(other_info.shape), want))
                plan.files[other] = other_info.file
    used = set(where.values())
    for key in keys:
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


def _where(plan: LoadPlan, name: str, source: str) -> str:
    """Which file and key a problem is in, when the message would not say it otherwise."""
    key = plan.renamed.get(name, name)
    file = plan.files.get(name, "")
    parts = ([f"key {key!r}"] if key != name else []) + ([f"in {file}"] if file and file != source else [])
    return f" ({', '.join(parts)})" if parts else ""


def check_plan(plan: LoadPlan, *, strict: bool, source: str, model_name: str) -> list[str]:
    """Raise a :class:`CheckpointError` listing every problem; return what to warn about instead.

    Shape mismatches and dtypes of another kind (integers where the model has floats) are always errors. Missing and unexpected keys are errors when
    ``strict``, warnings otherwise. ``source`` names the checkpoint, ``model_name`` the model.
    """
    problems = []
    if plan.missing and strict:
        problems.append(f"missing from the checkpoint ({len(plan.missing)}): {listing(plan.missing)}")
    if plan.unexpected and strict:
        problems.append(f"unexpected in the checkpoint ({len(plan.unexpected)}): {listing(plan.unexpected)}")
    if plan.mismatched:
        shown = [f"{n}: checkpoint {list(have)} vs model {list(want)}{_where(plan, n, source)}"
                 for n, have, want in plan.mismatched]
        problems.append(f"shape mismatch ({len(shown)}): {listing(shown)}")
    if plan.wrong_dtype:
        shown = [f"{n}: checkpoint {have} vs model {want}{_where(plan, n, source)}" for n, have, want in plan.wrong_dtype]
        problems.append(f"dtype of another kind ({len(shown)}; its bytes would load as garbage): {listing(shown)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match {model_name}:\n  "
            + "\n  ".join(problems)
            + _prefix_hint(plan.missing, plan.unexpected)
        )
    warnings = []
    if plan.missing:
        warnings.append(f"checkpoint {source} lacks {len(plan.missing)} tensor(s), initialized later: "
                        f"{listing(plan.missing)}")
    if plan.unexpected:
        warnings.append(f"checkpoint {source} has {len(plan.unexpected)} tensor(s) the model does not use: "
                        f"{listing(plan.unexpected)}")
    return warnings


__all__ = ["ALWAYS_IGNORED_UNEXPECTED", "LoadPlan", "check_plan", "dtype_kind", "listing", "match_keys"]
