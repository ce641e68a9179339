"""Command line: `python -m tca <command>`; each command lives in tca/commands/<command>.py."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

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
    """Run one command. Bad arguments or files print as one line (status 2); a closed stdout (`| head`) ends
    quietly."""
    from tca.backends.registry import BackendChoiceWarning
    from tca.commands._args import UsageError

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # the commands print which backend runs; the library's notice would repeat it
        warnings.simplefilter("ignore", BackendChoiceWarning)
        try:
            return importlib.import_module(f"tca.commands.{args.command}").run(args)
        except UsageError as error:
            print(f"python -m tca {args.command}: error: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            # the reader stopped early (e.g. `python -m tca info | head`): send the rest nowhere, no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
