"""The commands that describe rather than build: ``plugins``, ``settings`` and ``inspect``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .console import EXIT_OK, import_plugin, print_json, stdout_to_stderr

log = logging.getLogger("hfbuilder.cli")


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..manager import DISABLE_AUTOLOAD_ENV, Plugins, autoload_disabled

    provided = Plugins([import_plugin(spec) for spec in args.plugin]).provided()
    if args.json:
        print_json({"autoload": not autoload_disabled(), "plugins": provided})
        return EXIT_OK
    if autoload_disabled():
        print(f"entry-point plugins not loaded ({DISABLE_AUTOLOAD_ENV} is set)")
    for name, info in provided.items():
        origin = info["source"] + (f", {info['distribution']}" if info["distribution"] else "")
        print(f"{name}  [{origin}]")
        for stage in info["stages"]:
            order = ", ".join(
                f"{rel} {', '.join(stage[rel])}" for rel in ("after", "before") if stage[rel]
            ) + (f", replaces {stage['replaces']}" if stage["replaces"] else "")
            print(f"    stage  {stage['name']}" + (f"  ({order.strip(', ')})" if order else ""))
        for kind in ("heads", "phases"):
            for item in info[kind]:
                print(f"    {kind[:-1]:<6} {item}")
        if info["dropout_keys"]:
            print(f"    dropout keys  {', '.join(info['dropout_keys'])}")
        others = [h for h in info["hooks"] if h not in ("hfbuilder_stages", "hfbuilder_heads", "hfbuilder_phases",
                                                        "hfbuilder_dropout_keys")]
        if others:
            print(f"    hooks  {', '.join(others)}")
    return EXIT_OK


def cmd_settings(args: argparse.Namespace) -> int:
    from ..manager import Plugins, settings_catalog
    from ..settings import fields_of, reference_markdown

    plugins = Plugins([import_plugin(spec) for spec in args.plugin])
    catalog = settings_catalog(plugins.stage_entries())
    if args.markdown:
        print(reference_markdown(catalog), end="")
        return EXIT_OK
    for stage in sorted(catalog.classes):
        for info in fields_of(stage, catalog.classes[stage]):
            print(f"{stage}.{info.name}  [{', '.join(info.flat)}]  {info.type} = {info.default!r}")
            print(f"    {info.doc}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..explain import human_bytes
    from ..weights import format_conflict, guess_layout, read_json, summarize

    progress = None
    if not args.quiet:
        from tqdm.auto import tqdm

        def progress(keys: Any) -> Any:
            return tqdm(keys, desc="headers", unit="tensor", file=sys.stderr)

    with stdout_to_stderr():
        ckpt = summarize(args.checkpoint, progress)
    conflict = format_conflict(args.checkpoint)
    if conflict:
        log.warning("%s", conflict)
    folder = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
    config = read_json(os.path.join(folder, "config.json"))
    layout = guess_layout(ckpt.tensors, config)
    reward = _reward_layout(args, config)
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    summary = {
        "checkpoint": args.checkpoint,
        "format": ckpt.format,
        "files": [f.to_dict() for f in ckpt.files],
        "layout": layout.name,
        "evidence": layout.evidence,
        "reward_layout": reward,
        "tensors": len(ckpt.tensors),
        "values": ckpt.values,
        "dtypes": dtypes,
        "architectures": (config or {}).get("architectures"),
    }
    if args.json:
        keys = [{"name": k, "shape": list(t.shape), "dtype": t.dtype} for k, t in ckpt.tensors.items()]
        print_json({**summary, "keys": keys})
        return EXIT_OK
    size = sum(f.bytes or 0 for f in ckpt.files)
    print(f"checkpoint: {args.checkpoint}")
    print(f"format:     {ckpt.format}, {len(ckpt.files)} file(s), {human_bytes(size)}")
    print(f"layout:     {layout.name} ({layout.evidence})")
    if reward["name"] is not None:
        print(f"as a critic: layout {reward['name']!r} ({reward['evidence']}); keys: {reward['keys']}")
    else:
        print(f"as a critic: no reward layout ({reward['evidence']})")
    print(f"tensors:    {len(ckpt.tensors)}, {ckpt.values:,} values; dtypes "
          + ", ".join(f"{d} ({n})" for d, n in sorted(dtypes.items())))
    width = max((len(k) for k in ckpt.tensors), default=4)
    print(f"{'key':<{width}}  {'shape':<16} dtype")
    for k, t in ckpt.tensors.items():
        print(f"{k:<{width}}  {str(list(t.shape)):<16} {t.dtype}")
    return EXIT_OK


def _reward_layout(args: argparse.Namespace, config: dict[str, Any] | None) -> dict[str, Any]:
    """What ``with_checkpoint(path, layout="auto")`` would decide, asking every registered reward layout
    (built-in, entry points, ``--plugin``): the layout, its evidence and key map, or why none."""
    from ..errors import CheckpointError
    from ..layouts import available_layouts
    from ..layouts.detect import resolve_layout

    plugins = [import_plugin(spec) for spec in getattr(args, "plugin", [])]
    layouts = {name: layout for name, (layout, _) in available_layouts(plugins).items()}
    try:
        resolved = resolve_layout(args.checkpoint, layouts, config=config or {})
    except CheckpointError as exc:
        why = str(exc).split("\n", 1)[0]
        return {"name": None, "evidence": why, "keys": None}
    return {"name": resolved.layout.name, "evidence": resolved.evidence, "keys": resolved.key_map.describe()}
