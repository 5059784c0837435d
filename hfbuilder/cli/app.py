"""The ``hfbuilder`` command: plan, build, list plugins, inspect checkpoints.

Exit codes, for scripts:

==== =====================================================================
0    success
1    the build failed, or would fail (``plan``), or a post-build invariant failed
2    bad usage or input: arguments, paths, configs, tokenizer, checkpoint files
3    a plugin failed to load or conflicts with another (stage order, names)
130  interrupted
==== =====================================================================

Results go to stdout (``--json`` for programs); messages, warnings and progress bars
go to stderr. Only the standard library is imported at start-up, so ``--help`` is fast:
torch and transformers are imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..dsconfig import zero_stage_of
from ..errors import (
    BuilderInputError,
    CheckpointError,
    DistributedSetupError,
    HFBuilderError,
    InvariantError,
    PluginError,
    UnknownHeadError,
)
from ..layouts.cli import add_convert_parser
from .console import EXIT_OK, StageProgress, import_plugin, print_json, quiet_libraries, setup_logging, stdout_to_stderr
from .info import cmd_inspect, cmd_plugins, cmd_settings

log = logging.getLogger("hfbuilder.cli")

EXIT_FAILED, EXIT_USAGE, EXIT_PLUGIN, EXIT_INTERRUPTED = 1, 2, 3, 130
INPUT_ERRORS = (BuilderInputError, UnknownHeadError, CheckpointError, DistributedSetupError)


def exit_code(exc: BaseException) -> int:
    """The exit code for an error: 2 for bad input, 3 for plugins, 1 for everything else."""
    if isinstance(exc, PluginError):
        return EXIT_PLUGIN
    if isinstance(exc, INPUT_ERRORS):
        return EXIT_USAGE
    return EXIT_FAILED


# -- arguments -------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _probability(text: str) -> float:
    from ..plugins.dropout import DropoutSettings

    try:
        return DropoutSettings(p=float(text)).p  # type: ignore[return-value]
    except (ValueError, BuilderInputError) as exc:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from exc


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="model directory (config.json, weights) or hub name")
    parser.add_argument("--model-class", default="AutoModelForCausalLM", metavar="CLASS",
                        help="transformers class, or module.Class (default: AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer to load (default: PATH)")
    parser.add_argument("--phase", metavar="NAME", help="apply an RLHF phase (sft, reward, actor, ...) first")
    zero = parser.add_mutually_exclusive_group()
    zero.add_argument("--zero3", metavar="CFG", help="DeepSpeed JSON config asking for ZeRO stage 3")
    zero.add_argument("--deepspeed", metavar="CFG", help="any DeepSpeed JSON config")
    parser.add_argument("--dropout", type=_probability, metavar="P", help="set every dropout probability to P")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), help="parameter dtype")
    parser.add_argument("--device", metavar="DEV", help="load straight onto DEV (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--deferred", action="store_true", help="architecture only; weights deferred")
    parser.add_argument("--head", metavar="NAME", help="wrap the model in this head (e.g. reward)")
    parser.add_argument("--head-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="head option, JSON-parsed when possible (repeatable)")
    parser.add_argument("-o", "--option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="a setting: NAME=VALUE as .with_options() takes it (invariants=warn), or "
                             "STAGE.FIELD=VALUE as .configure() does (resize.multiple=16); VALUE is JSON when it "
                             "parses; see `hfbuilder settings` (repeatable)")
    _plugin_option(parser, "import MODULE (or module:attr) and register it with with_plugin")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model or tokenizer directory ships (auto_map); read it first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _plugin_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=f"{what} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfbuilder",
        description="Build Hugging Face models for RLHF with DeepSpeed, and explain what a build does.",
        epilog="Exit codes: 0 ok, 1 build failed (or would), 2 bad usage or input, 3 plugin error, 130 interrupted.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars; errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="explain what a build will do, reading no weights",
                          description="A dry run: each stage says what it will do. Reads config files and "
                                      "checkpoint headers, never weights.")
    _model_arguments(plan)
    plan.add_argument("--world-size", type=int, metavar="N", help="ranks for the ZeRO-3 memory estimate")
    plan.set_defaults(func=cmd_plan)

    build = sub.add_parser("build", help="build the model and save it with safetensors",
                           description="Build the model, check its invariants and save it (safetensors).")
    _model_arguments(build)
    build.add_argument("--save", metavar="OUT", help="directory to save the model and tokenizer into, "
                       "atomically; checked before the build")
    build.add_argument("--overwrite", action="store_true", help="replace the model OUT holds, whole")
    build.add_argument("--report", metavar="FILE", help="write the build report as JSON to FILE")
    build.set_defaults(func=cmd_build)

    plugins = sub.add_parser("plugins", help="list registered plugins, their stages and heads, and their origin")
    _plugin_option(plugins, "also register MODULE as with_plugin would")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of text")
    plugins.set_defaults(func=cmd_plugins)

    settings = sub.add_parser("settings", help="list every stage's settings: names, types, defaults",
                              description="The settings each registered stage declares, generated from their "
                                          "Settings dataclasses; -o NAME=VALUE and with_options() take these names.")
    _plugin_option(settings, "also register MODULE as with_plugin would")
    settings.add_argument("--markdown", action="store_true", help="print the docs/settings.md table")
    settings.set_defaults(func=cmd_settings)

    inspect = sub.add_parser("inspect", help="list a checkpoint's tensors and guess whose layout it follows",
                             description="Keys, shapes, dtypes and format of a checkpoint, from file headers; "
                                         "and whether it looks like DeepSpeed-Chat, OpenRLHF, TRL or plain HF.")
    inspect.add_argument("checkpoint", metavar="CKPT", help="a directory, a .safetensors/.bin file or an index .json")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    _plugin_option(inspect, "also register MODULE as with_plugin would: its reward layouts are asked too")
    inspect.set_defaults(func=cmd_inspect)
    add_convert_parser(sub, import_plugin)
    return parser


# -- helpers ---------------------------------------------------------------------------


def _model_class(name: str) -> Any:
    if "." in name or ":" in name:
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise BuilderInputError(f"--model-class {name!r} cannot be imported: {exc}") from exc
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError:
        raise BuilderInputError(f"--model-class {name!r} is not a transformers class (e.g. AutoModelForCausalLM)") from None


def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    from ..remote_code import refusal

    try:
        # Explicit, never None: None makes transformers ask on stdin whether to run the code.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, StrictDataclassError) as exc:  # the last: a config field of the wrong type
        refused = refusal(path, exc)
        if refused is not None:
            raise refused from exc
        raise BuilderInputError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def _builder(args: argparse.Namespace) -> Any:
    from ..builder import ModelBuilder

    if os.path.isfile(args.path):
        raise BuilderInputError(f"PATH {args.path!r} is a file; pass the model directory")
    if not os.path.exists(args.path) and args.path.startswith(("/", ".", "~")):
        raise BuilderInputError(f"PATH {args.path!r} does not exist")
    if args.quiet:
        quiet_libraries()
    tokenizer = _tokenizer(args.tokenizer or args.path, args.trust_remote_code)
    builder = ModelBuilder(_model_class(args.model_class), args.path, tokenizer)
    if args.trust_remote_code:
        builder = builder.with_options(trust_remote_code=True)
    for spec in args.plugin:
        builder = builder.with_plugin(import_plugin(spec))
    if args.phase:
        builder = builder.for_phase(args.phase)
    if args.zero3:
        builder = builder.with_zero3(args.zero3)
    elif args.deepspeed:
        builder = builder.with_deepspeed(args.deepspeed)
    if args.dropout is not None:
        builder = builder.with_dropout(args.dropout)
    if args.dtype:
        builder = builder.with_dtype(args.dtype)
    if args.device:
        builder = builder.on_device(args.device)
    if args.deferred:
        builder = builder.deferred_weights()
    if args.head:
        builder = builder.with_head(args.head, **dict(args.head_option))
    elif args.head_option:
        raise BuilderInputError("--head-option needs --head")
    for key, value in args.option:
        stage, dot, field = key.partition(".")
        builder = builder.configure(stage, **{field: value}) if dot else builder.with_options(**{key: value})
    return builder


# -- commands --------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    with stdout_to_stderr():
        explanation = _builder(args).explain(world_size=args.world_size)
    if args.json:
        print_json(explanation.to_dict())
    else:
        print(explanation)
    if explanation.exceptions:
        for error in explanation.errors:
            log.error("the build would fail: %s", error)
        return exit_code(explanation.exceptions[0])
    return EXIT_OK


def _write_report(path: str | None, report: Any) -> None:
    if path and report is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(report.to_json(indent=2))


def cmd_build(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.save:
        from ..save import check_out

        check_out(args.save, overwrite=args.overwrite)  # before the build, which may take an hour
    with stdout_to_stderr():
        builder = _builder(args)
        plan = builder.plan()
        with tqdm(total=len(plan), desc="build", unit="stage", disable=args.quiet, file=sys.stderr) as bar:
            try:
                model, report = builder.with_plugin(StageProgress(bar)).build_with_report()
            except InvariantError as exc:
                _write_report(args.report, exc.report)
                raise
        if args.save:
            from ..save import save_model

            saved = save_model(model, builder.tokenizer, args.save, overwrite=args.overwrite,
                               zero3=zero_stage_of(builder.ds_config) == 3)
            if saved is not None:
                log.info("saved %s to %s%s", ", ".join(saved.files), saved.path,
                         " (replacing the model there)" if saved.replaced else "")
        _write_report(args.report, report)
    if args.json:
        print_json({**report.to_dict(), "saved": args.save})
    else:
        print(report.format())
        if args.save:
            print(f"saved to {args.save}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_logging = setup_logging(args)
    try:
        return args.func(args)
    except HFBuilderError as exc:
        log.error("%s", exc)
        log.debug("traceback", exc_info=True)
        return exit_code(exc)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hfbuilder ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:  # a bug or an OS error: say what, traceback with -v
        log.error("%s: %s", type(exc).__name__, exc)
        log.info("traceback", exc_info=True)
        return EXIT_FAILED
    finally:
        restore_logging()


__all__ = ["build_parser", "exit_code", "main"]
