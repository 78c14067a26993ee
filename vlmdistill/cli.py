"""The `vlmdistill` command line.

    vlmdistill plugins [-v]             installed plugins, one line each (-v: their config fields)
    vlmdistill train RECIPE.yaml [--set training.max_steps=10 ...] [--dry-run]
    vlmdistill demo [PLUGIN] [-- demo arguments]     (default: lingudistill)
    vlmdistill eval elevater ...        zero-shot evaluation (see `vlmdistill eval elevater -h`)
    vlmdistill eval str ...             text-recognition word accuracy on LMDB benchmarks

Plugins may add sub-commands through their `commands` attribute ({"name": "module:function"}).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable

from .errors import VLMDistillError
from .registry import get_plugin, list_plugins

DEFAULT_DEMO = "lingudistill"


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def cmd_plugins(args) -> int:
    for name in list_plugins():
        cls = get_plugin(name)
        print(f"{name:14s} {cls.description}")
        if args.verbose:
            for field, type_name, default, help_text in cls.config_class.describe():
                print(f"    {field:24s} {type_name:28s} default={default!r}  {help_text}")
            print()
    return 0


def cmd_train(args) -> int:
    from .recipes import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        from .recipes import check_recipe, training_arguments

        training_arguments(recipe)  # TrainingArguments' own cross-field checks, without building any model
        for line in check_recipe(recipe):
            print(line)
        print(json.dumps(recipe.to_dict(), indent=2, default=str))
        return 0
    from .run_report import summary_table

    summary = run_recipe(recipe, progress=True)
    if summary.get("already_finished"):
        print(f"{recipe.output_dir} holds a finished run of this recipe; nothing was trained")
    print(summary_table(summary.get("log_history", [])))
    for label, key in (("steps", "global_step"), ("resumed from", "resumed_from"), ("student", "student"),
                       ("wrapper", "final"), ("log", "log_file")):
        if summary.get(key) is not None:
            print(f"{label + ':':14s}{summary[key]}")
    if summary.get("plots"):
        print(f"{'plots:':14s}{os.path.dirname(next(iter(summary['plots'].values())))}/ "
              f"({', '.join(summary['plots'])})")
    return 0


def cmd_demo(args) -> int:
    cls = get_plugin(args.plugin)
    if not cls.demo:
        print(f"plugin {args.plugin!r} has no demo", file=sys.stderr)
        return 2
    return int(_resolve(cls.demo)(list(args.demo_args)) or 0)


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluation harnesses")
    inner = parser.add_subparsers(dest="harness", required=True)
    # each harness on its own: one that cannot be imported does not hide the other
    try:
        from vlmdistill.eval.elevater.cli import add_elevater_parser
    except ImportError:
        pass
    else:
        add_elevater_parser(inner)
    from vlmdistill.eval.text_recognition import add_str_parser   # imports only the standard library

    add_str_parser(inner)


def _plugin_commands() -> dict[str, str]:
    commands = {}
    for name in list_plugins():
        commands.update(getattr(get_plugin(name), "commands", {}) or {})
    return commands


BUILT_IN = ("plugins", "train", "demo", "eval")


def build_parser(plugin_commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmdistill", description="Distillation plugins for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each plugin's config fields")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("train", help="run a YAML recipe")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.max_steps=10")
    p.add_argument("--dry-run", action="store_true", help="validate and print the recipe, then stop")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="run a plugin's demo experiment")
    p.add_argument("plugin", nargs="?", default=DEFAULT_DEMO)
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="arguments passed to the demo")
    p.set_defaults(func=cmd_demo)

    _add_eval(sub)
    for name, target in (_plugin_commands() if plugin_commands is None else plugin_commands).items():
        p = sub.add_parser(name, help=f"plugin command ({target.split(':')[0]})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, target=target: int(_resolve(target)(list(a.rest)) or 0))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A built-in command needs no plugin loaded to parse its arguments (`eval ... --help` stays fast).
    commands = {} if argv and argv[0] in BUILT_IN else _plugin_commands()
    if argv and argv[0] in commands:
        # Plugin commands parse their own arguments (including --help).
        try:
            return int(_resolve(commands[argv[0]])(argv[1:]) or 0)
        except VLMDistillError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser(commands if argv and argv[0] in BUILT_IN else None)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VLMDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
