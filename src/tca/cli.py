"""Command line: `python -m tca <command>`; each command lives in tca/commands/<command>.py."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

# Listed here so `--help` shows them all; each module is imported only to build its parser.
COMMANDS = ("info", "demo", "calibrate", "eval", "bench")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), like the commands' own checks; status 2.
    `commands` maps each subcommand to its parser."""

    commands: dict[str, argparse.ArgumentParser]  # set by build_parser on the top-level parser

    def error(self, message: str):
        missing = re.fullmatch(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
        if missing and missing.group(1) in self._option_string_actions:  # say what the value is
            message = f"{missing.group(1)} needs a value: {self._option_string_actions[missing.group(1)].help}"
        elif message == "the following arguments are required: command":
            message = f"name a command: {', '.join(COMMANDS)}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    from tca import __version__

    parser = Parser(prog="python -m tca", description="TCA-Attention tools")
    parser.add_argument("--version", action="version", version=f"tca {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}
    for name in COMMANDS:
        module = importlib.import_module(f"tca.commands.{name}")
        parser.commands[name] = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(parser.commands[name])
    return parser


def _unrecognized(parser: Parser, command: str, extra: list[str]):
    """Options the command does not take: say which, and which commands do take them (status 2)."""
    options = [item.split("=")[0] for item in extra if item.startswith("-")]
    message = f"unrecognized arguments: {' '.join(extra)}"
    if options:
        elsewhere = [name for name, sub in parser.commands.items() if options[0] in sub._option_string_actions]
        where = f" ({' and '.join(elsewhere)} {'takes' if len(elsewhere) == 1 else 'take'} it)" if elsewhere else ""
        message = f"{command} has no option {options[0]}{where}; unrecognized: {' '.join(extra)}"
    parser.commands[command].error(message)


def main(argv=None) -> int:
    """Run one command. Bad arguments or files print as one line (status 2); Ctrl-C prints one line (status
    130); a closed stdout (`| head`) ends quietly."""
    from tca.backends.registry import BackendChoiceWarning
    from tca.commands._args import UsageError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, args.command, extra)
    with warnings.catch_warnings():
        # the commands print which backend runs; the library's notice would repeat it
        warnings.simplefilter("ignore", BackendChoiceWarning)
        try:
            return importlib.import_module(f"tca.commands.{args.command}").run(args)
        except UsageError as error:
            print(f"python -m tca {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            module = importlib.import_module(f"tca.commands.{args.command}")
            hint = getattr(module, "interrupted_hint", lambda args: "")(args)
            print(f"\npython -m tca {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # the reader stopped early (e.g. `python -m tca info | head`): send the rest nowhere, no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
