"""Installed distributions for the plugin tests: a module and a dist-info with an hfbuilder entry point."""

from __future__ import annotations

import textwrap


def make_dist(root, dist, module, source, entry_value=None, entry_name=None):
    """A real installed distribution under ``root`` (put ``root`` on the path): ``module``.py holding
    ``source``, and ``dist``'s dist-info declaring the entry point ``entry_name`` (default: ``dist``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hfbuilder]\n{entry_name or dist} = {entry_value or module}\n")
