"""``hfbuilder convert SRC OUT --to LAYOUT [--from LAYOUT]``: the command's arguments and its work.

Only the standard library is imported until the command runs, so ``hfbuilder --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

_NAMES = "dschat, openrlhf, hf-seqcls, hf-tokencls, trl, llamafactory (and any a plugin adds)"


def add_convert_parser(sub: Any, import_plugin: Callable[[str], Any]) -> None:
    """Add the ``convert`` command to the ``hfbuilder`` subcommands; ``import_plugin`` loads ``--plugin``."""
    parser = sub.add_parser(
        "convert", help="write a reward/critic checkpoint in another framework's layout",
        description="Read a reward or critic model saved by one framework and write it, atomically, the way "
                    f"another saves it: {_NAMES}. The tokenizer files are copied.",
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint directory (config.json beside the weights)")
    parser.add_argument("out", metavar="OUT", help="the directory to create")
    parser.add_argument("--to", required=True, metavar="LAYOUT", help=f"the layout to write: {_NAMES}")
    parser.add_argument("--from", dest="from_", metavar="LAYOUT", help="the source's layout (default: detected)")
    parser.add_argument("--drop-bias", action="store_true",
                        help="write a biased head into a layout without a bias (every value moves by the bias)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="register MODULE (or module:attr) for its layouts (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=lambda args: cmd_convert(args, import_plugin))


def cmd_convert(args: argparse.Namespace, import_plugin: Callable[[str], Any]) -> int:
    from .convert import convert

    result = convert(args.src, args.out, to=args.to, from_=args.from_, drop_bias=args.drop_bias,
                     plugins=[import_plugin(spec) for spec in args.plugin])
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


__all__ = ["add_convert_parser", "cmd_convert"]
