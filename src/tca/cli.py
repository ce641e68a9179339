"""Command line: `python -m tca <command>`; each command lives in tca/commands/<command>.py."""

from __future__ import annotations

import argparse
import importlib

# Listed here so `--help` shows them all; each module is imported only to build its parser.
COMMANDS = ("info", "demo", "calibrate", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tca", description="TCA-Attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"tca.commands.{name}")
        module.configure(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(f"tca.commands.{args.command}").run(args)
