"""`python -m tca info`: versions, the machine, and every backend with its status and reasons."""

from __future__ import annotations

import importlib.metadata
import platform

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


HELP = "versions and backends with their status and reasons"


def configure(parser) -> None:
    pass


def run(args) -> int:
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
              f"head_dims={row['head_dims']} decode={'yes' if row['decode'] else 'no'} "
              f"gradients={'no' if 'gradients' in row['lacks'] else 'yes'}")
        print(f"  {'':10s} {row['summary']}")
        for reason in row["reasons"]:
            print(f"  {'':10s} - {reason}")
    return 0
