"""The layer rules of docs/architecture.md, checked from the package's own imports (lazy ones included).

Backends sit side by side (none imports another), the oracle is imported by no production code, the shared
core imports no backend, and nothing below the API imports it or the models.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PARTS = [  # (part, path prefix under src/), most specific first
    ("oracle", "tca/backends/reference.py"), ("oracle", "tca/reference/"),
    ("torch", "tca/backends/torch/"), ("triton", "tca/backends/triton/"), ("flash", "tca/backends/flash/"),
    ("common", "tca/backends/common/"), ("registry", "tca/backends/"), ("models", "tca/models/"),
    ("face", "tca/commands/"), ("face", "tca/eval/"), ("face", "tca/cli.py"),
    ("api", "tca/api.py"), ("api", "tca/__init__.py"), ("api", "tca/validation.py"), ("core", "tca/"),
]
NEVER = {
    (a, b)
    for a, targets in {
        "torch": ("oracle", "triton", "flash"),
        "triton": ("oracle", "torch", "flash"),
        "flash": ("oracle", "torch", "triton"),
        "common": ("oracle", "torch", "triton", "flash", "api", "models"),
        "models": ("oracle",),
        "core": ("api", "models"),
    }.items()
    for b in targets
}
# Decode compression still lives in the torch backend; it moves to backends/common with the cache.
KNOWN = {("tca/backends/flash/impl.py", "tca/backends/torch/decode.py")}


def _part(rel: str) -> str:
    return next(p for p, prefix in PARTS if rel == prefix or rel.startswith(prefix))


def _target(path: Path, level: int, name: str) -> Path | None:
    if level:
        base = path.parent
        for _ in range(level - 1):
            base = base.parent
        target = base.joinpath(*name.split(".")) if name else base
    elif name.startswith("tca"):
        target = SRC.joinpath(*name.split("."))
    else:
        return None
    return next((c for c in (target.with_suffix(".py"), target / "__init__.py") if c.exists()), None)


def _edges():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [module] + [f"{module}.{a.name}" if module else a.name for a in node.names]
                targets = [_target(path, node.level, n) for n in names]
            elif isinstance(node, ast.Import):
                targets = [_target(path, 0, a.name) for a in node.names]
            else:
                continue
            for target in filter(None, targets):
                yield path.relative_to(SRC).as_posix(), target.relative_to(SRC).as_posix()


def test_no_import_crosses_a_layer_rule():
    broken = sorted(
        f"{src} -> {dst}" for src, dst in set(_edges()) if (_part(src), _part(dst)) in NEVER and (src, dst) not in KNOWN
    )
    assert not broken, "imports that cross the layer rules (docs/architecture.md):\n" + "\n".join(broken)
