"""Subcommands of `python -m tca`: one module each, with `configure(parser)`, `run(args) -> int` and a `HELP` line."""
