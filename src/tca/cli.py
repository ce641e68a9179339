"""Command line: `python -m tca info | ...` (one subcommand per job)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(args) -> int:
    """Versions, the machine, and every backend with its status and reasons."""
    import tca
    from tca.backends import registry

    print(f"tca {tca.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    for package in ("einops", "triton", "flash-attn", "flash-attn-4", "transformers"):
        print(f"  {package:14s} {_version(package)}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"  cuda device    {cuda}")
    print("backends (backend='auto' tries them top to bottom):")
    for row in registry.report():
        status = "available" if row["usable"] else "unavailable"
        dtypes = ",".join(row["dtypes"])
        print(f"  {row['name']:10s} {status:11s} devices={','.join(row['devices'])} dtypes={dtypes} "
              f"head_dims={row['head_dims']} decode={'yes' if row['decode'] else 'no'}")
        print(f"  {'':10s} {row['summary']}")
        for reason in row["reasons"]:
            print(f"  {'':10s} - {reason}")
    return 0


COMMANDS = {"info": info}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tca", description="TCA-Attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backends with their status")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
