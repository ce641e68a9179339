"""The layer checker of docs/architecture.md: reads the rules from the doc's "Layer rules" table and every edge
between the package's modules from their source (pure `ast`, nothing imported), and lists the edges that break
a rule.

An edge is one of:
    import   a static import, lazy ones inside functions included ("lazily" in the table allows only those);
    name     a "tca.x.y:Name" implementation string (what the registry loads on first use);
    lookup   registry.get, or routing's choose / route / resolve / decode_backend, called with a backend's name as a
             literal string, or with a variable that the same module assigns such literals to
             (`name = "triton" if ... else "torch"`): it loads that backend.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

LOADING_CALLS = ("get", "choose", "route", "resolve", "decode_backend")
IMPLEMENTATION = re.compile(r"^(tca(?:\.\w+)+):\w+$")


@dataclass(frozen=True)
class Rule:
    part: str
    where: tuple[str, ...]  # path prefixes under src/ ("tca/models/") or files ("tca/api.py")
    imports: frozenset[str]  # parts it may import at module level and lazily
    lazy_imports: frozenset[str]  # parts it may import only inside a function
    loads: frozenset[str]  # parts it may load by name (implementation strings, registry lookups)


@dataclass(frozen=True)
class Edge:
    source: str  # path under src/
    target: str
    kind: str  # "import", "name" or "lookup"
    line: int
    lazy: bool = False


def read_rules(doc: Path) -> list[Rule]:
    """The rows of the table under the "## Layer rules" heading of `doc`."""
    text = doc.read_text()
    section = text.split("\n## Layer rules", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # past the header and its rule
    rules = []
    for row in rows:
        part, where, imports, loads = (cell.strip() for cell in row.strip("|").split("|"))
        listed = [p.strip() for p in imports.split(",") if p.strip() not in ("", "—")]
        rules.append(Rule(
            part=part.strip("`* "),
            where=tuple(re.findall(r"`([^`]+)`", where)),
            imports=frozenset(p for p in listed if not p.endswith("(lazily)")),
            lazy_imports=frozenset(p.removesuffix("(lazily)").strip() for p in listed if p.endswith("(lazily)")),
            loads=frozenset(p.strip() for p in loads.split(",") if p.strip() not in ("", "—")),
        ))
    return rules


def part_of(rel: str, rules: list[Rule]) -> str | None:
    """The part whose most specific prefix holds `rel` (a file named exactly beats a folder)."""
    best = None
    for rule in rules:
        for prefix in rule.where:
            if (rel == prefix or (prefix.endswith("/") and rel.startswith(prefix))) and (
                best is None or len(prefix) > len(best[0])
            ):
                best = (prefix, rule.part)
    return best[1] if best else None


def _module_file(src: Path, dotted: str) -> Path | None:
    target = src.joinpath(*dotted.split("."))
    return next((c for c in (target.with_suffix(".py"), target / "__init__.py") if c.exists()), None)


def _relative(path: Path, src: Path, level: int, name: str) -> Path | None:
    base = path.parent
    for _ in range(level - 1):
        base = base.parent
    dotted = ".".join(base.relative_to(src).parts + ((name,) if name else ()))
    return _module_file(src, dotted)


class _Visitor(ast.NodeVisitor):
    def __init__(self, path: Path, src: Path, backends: dict[str, Path], tree: ast.Module):
        self.path, self.src, self.backends = path, src, backends
        self.depth = 0  # > 0 inside a function: its imports are lazy
        self.assigned = _assigned_strings(tree)
        self.edges: list[tuple[Path | str, str, int, bool]] = []  # (file, or a backend's name), kind, line, lazy

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target, kind, node):
        if target is not None:
            self.edges.append((target, kind, node.lineno, self.depth > 0))

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] == "tca":
                self._add(_module_file(self.src, alias.name), "import", node)

    def visit_ImportFrom(self, node):
        module = node.module or ""
        if not node.level and module.split(".")[0] != "tca":
            return
        for name in [module] + [f"{module}.{a.name}" if module else a.name for a in node.names]:
            found = _relative(self.path, self.src, node.level, name) if node.level else _module_file(self.src, name)
            self._add(found, "import", node)

    def visit_Constant(self, node):
        match = IMPLEMENTATION.match(node.value) if isinstance(node.value, str) else None
        if match:
            self._add(_module_file(self.src, match.group(1)), "name", node)

    def visit_Call(self, node):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        first = node.args[0] if node.args else None
        if called in LOADING_CALLS and first is not None:
            names = _strings(first) or self.assigned.get(getattr(first, "id", None), set())
            for name in sorted(names & self.backends.keys()):
                self._add(self.backends[name], "lookup", node)
        self.generic_visit(node)


def _strings(node) -> set[str]:
    """The string literals an expression can evaluate to: a literal, or a conditional between literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    return set()


def _assigned_strings(tree) -> dict[str, set[str]]:
    """Each variable of a module -> the string literals assigned to it anywhere in the module."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found.setdefault(target.id, set()).update(_strings(node.value))
    return found


def backend_names(src: Path) -> dict[str, str]:
    """Each declared backend's name -> its implementation's module (from the `Backend(name=..., implementation=...)`
    declarations, read statically)."""
    found = {}
    for path in sorted((src / "tca" / "backends").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Backend":
                fields = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
                if "name" in fields and "implementation" in fields:
                    found[fields["name"]] = fields["implementation"].split(":")[0]
    return found


def edges(src: Path) -> list[Edge]:
    """Every edge between two modules of the package under `src`."""
    backends = {}
    for name, module in backend_names(src).items():
        file = _module_file(src, module)
        if file is not None:
            backends[name] = file
    out = []
    for path in sorted((src / "tca").rglob("*.py")):
        tree = ast.parse(path.read_text())
        visitor = _Visitor(path, src, backends, tree)
        visitor.visit(tree)
        for target, kind, line, lazy in visitor.edges:
            out.append(Edge(path.relative_to(src).as_posix(), target.relative_to(src).as_posix(), kind, line, lazy))
    return out


def broken_rules(src: Path, doc: Path) -> list[str]:
    """One line per broken rule (source part -> target part, by kind), naming every edge that breaks it."""
    rules = read_rules(doc)
    by_part = {rule.part: rule for rule in rules}
    broken: dict[tuple[str, str, str], list[str]] = {}
    found_edges = edges(src)
    unplaced = sorted({e.source for e in found_edges if part_of(e.source, rules) is None})
    for edge in found_edges:
        source, target = part_of(edge.source, rules), part_of(edge.target, rules)
        if source is None or target is None or source == target:
            continue
        rule = by_part[source]
        if edge.kind == "import":
            allowed = target in rule.imports or (edge.lazy and target in rule.lazy_imports)
            kind = "lazily imports" if edge.lazy else "imports"
        else:
            allowed = target in rule.loads
            kind = "names" if edge.kind == "name" else "loads through the registry"
        if not allowed:
            broken.setdefault((source, kind, target), []).append(f"{edge.source}:{edge.line} -> {edge.target}")
    lines = [f"{s} {kind} {t}: " + "; ".join(sorted(set(found))) for (s, kind, t), found in sorted(broken.items())]
    return lines + [f"{rel} belongs to no part of the table" for rel in unplaced]
