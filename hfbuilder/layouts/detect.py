"""Which layout a checkpoint follows: detected from its keys, shapes and config.json, or forced.

Every registered layout is asked; exactly one must recognize the checkpoint. None is a
:class:`~hfbuilder.CheckpointError` that lists what the checkpoint holds (a plain base
model must never become a critic with a random head), and more than one is an error
naming each candidate and its evidence, so the user picks with ``layout=``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BuilderInputError, CheckpointError
from ..weights import CheckpointReader, open_checkpoint, read_json
from .base import Extras, KeyMap, Layout, Shapes
from .view import LayoutReader

AUTO = "auto"
_SHOWN = 6


@dataclass(frozen=True)
class Resolved:
    """The layout a checkpoint follows, why hfbuilder thinks so, and how its keys map."""

    path: str
    layout: Layout
    evidence: str
    key_map: KeyMap
    extras: Extras
    forced: bool = False
    #: the plugin that provides the layout, when known.
    provider: str = ""

    def open(self, main: CheckpointReader | None = None) -> LayoutReader:
        """The checkpoint under the value model's names (``main``: the already opened checkpoint)."""
        return LayoutReader(self.path, self.key_map, main)

    def describe(self) -> list[str]:
        how = "forced with layout=" if self.forced else "detected"
        lines = [f"layout {self.layout.name} ({how}): {self.evidence}", f"keys: {self.key_map.describe()}"]
        if self.key_map.files:
            lines.append(f"also reads {', '.join(os.path.basename(f) for f in self.key_map.files)}")
        if self.key_map.unused:
            lines.append(f"not used by the value model: {', '.join(self.key_map.unused)}")
        if self.extras.normalization is not None:
            mean, std = self.extras.normalization
            lines.append(f"reward normalization (mean={mean:g}, std={std:g}) kept as model.reward_normalization")
        return lines


def checkpoint_folder(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def checkpoint_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config.json beside a checkpoint, or None."""
    return read_json(os.path.join(checkpoint_folder(path), "config.json"))


def check_layout_name(name: Any, layouts: Mapping[str, Layout]) -> str:
    """``name`` if it is ``"auto"`` or a registered layout; otherwise an error listing them, closest first."""
    if name == AUTO or (isinstance(name, str) and name in layouts):
        return name
    known = sorted(layouts)
    close = difflib.get_close_matches(str(name), known, n=len(known), cutoff=0.0)
    raise BuilderInputError(f"unknown checkpoint layout {name!r}; valid layouts: {', '.join([AUTO, *close])}")


def resolve_layout(
    path: str | os.PathLike[str],
    layouts: Mapping[str, Layout],
    choice: str = AUTO,
    config: Mapping[str, Any] | None = None,
) -> Resolved:
    """The layout of the checkpoint at ``path``: ``choice`` when it names one, else the one that detects it.

    ``config`` is the checkpoint's config.json (read beside it when None). Reads headers only.
    """
    check_layout_name(choice, layouts)
    path = os.fspath(path)
    folder = checkpoint_folder(path)
    if config is None:
        config = checkpoint_config(path) or {}
    with open_checkpoint(path) as reader:
        shapes = {key: tuple(reader.info(key).shape) for key in reader.keys()}
    if choice != AUTO:
        layout = layouts[choice]
        try:
            key_map = layout.key_map(shapes, config, folder)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path} is not in layout {choice!r} (layout=): {exc}") from exc
        evidence = layout.detect(shapes, config, folder) or "its keys fit, though it would not have been detected"
        return Resolved(path, layout, evidence, key_map, layout.extras(config), forced=True)
    found = [(layout, why) for layout in layouts.values() if (why := layout.detect(shapes, config, folder))]
    if not found:
        raise CheckpointError(_headless(path, shapes, config, layouts))
    if len(found) > 1:
        listed = "\n  ".join(f"{layout.name}: {why}" for layout, why in found)
        raise CheckpointError(
            f"checkpoint {path} fits more than one reward/critic layout:\n  {listed}\n"
            f"Say which with layout= (with_checkpoint(path, layout=...), or --from for hfbuilder convert)."
        )
    layout, why = found[0]
    return Resolved(path, layout, why, layout.key_map(shapes, config, folder), layout.extras(config))


def _headless(path: str, shapes: Shapes, config: Mapping[str, Any], layouts: Mapping[str, Layout]) -> str:
    groups: dict[str, list[str]] = {}
    for key in shapes:
        groups.setdefault(key.partition(".")[0], []).append(key)
    parts = []
    for first, keys in list(groups.items())[:_SHOWN]:
        if len(keys) <= 2:
            parts.extend(f"{k} {list(shapes[k])}" for k in keys)
        else:
            parts.append(f"{len(keys)} keys under {first}.")
    if len(groups) > _SHOWN:
        parts.append(f"... and {len(groups) - _SHOWN} more groups")
    archs = config.get("architectures")
    found = (f"config.json architectures {archs}; " if archs else "no config.json architectures; ") + ", ".join(parts)
    looked = "\n  ".join(f"{layout.name}: {layout.framework}" for layout in layouts.values())
    return (
        f"checkpoint {path} holds no reward/critic value head that hfbuilder recognizes, so a model built from it "
        f"would score with a random head.\nFound: {found}\nLooked for:\n  {looked}\n"
        "To start a critic from a plain model with a fresh head, build the 'reward' phase (or with_head('reward') "
        "without with_checkpoint()); to read another framework's layout, register one through "
        "hfbuilder_reward_layouts, or force one with layout=."
    )


__all__ = ["AUTO", "Resolved", "check_layout_name", "checkpoint_config", "checkpoint_folder", "resolve_layout"]
