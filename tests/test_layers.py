"""The layer rules of docs/architecture.md ("Layer rules" table), checked on the package's own source: imports
(lazy ones included), implementation strings and registry lookups by name (tests/layer_rules.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from layer_rules import broken_rules, part_of, read_rules

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def test_no_edge_crosses_a_layer_rule():
    broken = broken_rules(ROOT / "src", DOC)
    assert not broken, "edges that break the layer rules of docs/architecture.md:\n" + "\n".join(broken)


def test_the_table_names_only_its_own_parts_and_existing_paths():
    rules = read_rules(DOC)
    parts = {rule.part for rule in rules}
    assert len(parts) == len(rules), "a part has two rows"
    for rule in rules:
        assert rule.where, f"{rule.part}: no files"
        assert not (rule.imports | rule.lazy_imports | rule.loads) - parts, f"{rule.part}: names an unknown part"
        for path in rule.where:
            assert (ROOT / "src" / path).exists(), f"{rule.part}: {path} does not exist"
    assert part_of("tca/backends/torch/impl.py", rules) == "torch"
    assert part_of("tca/backends/torch/__init__.py", rules) == "declarations"
    assert part_of("tca/plan.py", rules) == "core"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A tiny tca package under tmp_path/src with the given modules (and every __init__.py they need)."""
    src = tmp_path / "src"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in {p.parent for p in src.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return src


DECLARATION = """
    from ..registry import Backend
    SPEC = Backend(name="{name}", implementation="tca.backends.{name}.impl:Impl")
"""


@pytest.mark.parametrize(
    ("module", "text", "expected"),
    [
        ("tca/backends/flash/impl.py", "def f():\n    from ..torch import impl\n",
         "flash lazily imports torch: tca/backends/flash/impl.py:2 -> tca/backends/torch/impl.py"),
        ("tca/backends/flash/impl.py", "from .. import registry\nX = registry.get('torch').load()\n",
         "flash loads through the registry torch: tca/backends/flash/impl.py:2 -> tca/backends/torch/impl.py"),
        ("tca/backends/flash/impl.py",
         "from .. import registry\ndef f(q):\n    name = 'triton' if q else 'torch'\n    return registry.get(name)\n",
         "flash loads through the registry torch: tca/backends/flash/impl.py:4 -> tca/backends/torch/impl.py"),
        ("tca/backends/triton/ops.py", "X = 'tca.reference:ReferenceBackend'\n",
         "triton names oracle: tca/backends/triton/ops.py:1 -> tca/reference/__init__.py"),
        ("tca/backends/common/x.py", "from ...serving import plugin\n",
         "common imports serving: tca/backends/common/x.py:1 -> tca/serving/__init__.py; "
         "tca/backends/common/x.py:1 -> tca/serving/plugin.py"),
        ("tca/models/x.py", "import tca.reference.selection\n",
         "models imports oracle: tca/models/x.py:1 -> tca/reference/selection.py"),
        ("tca/serving/plugin.py", "from ..backends import registry\nX = registry.resolve('reference', 1, 2, 3)\n",
         "serving loads through the registry oracle: tca/serving/plugin.py:2 -> tca/reference/__init__.py"),
    ],
)
def test_the_checker_sees_each_kind_of_edge(tmp_path, module, text, expected):
    files = {
        "tca/backends/registry.py": "class Backend:\n    pass\n",
        "tca/backends/torch/__init__.py": DECLARATION.format(name="torch"),
        "tca/backends/torch/impl.py": "",
        "tca/backends/reference.py": "from .registry import Backend\n"
                                     "SPEC = Backend(name='reference', implementation='tca.reference:ReferenceBackend')\n",
        "tca/reference/selection.py": "",
        "tca/serving/plugin.py": "",
        module: text,
    }
    src = _package(tmp_path, files)
    assert broken_rules(src, DOC) == [expected]
