"""The ``hfbuilder`` command (``app``), its describing commands (``info``) and its console helpers."""

from .app import build_parser, exit_code, main

__all__ = ["build_parser", "exit_code", "main"]
