"""The project speaks of itself only: docs, README, sources, tests and benchmarks name no issue numbers, no folders outside the
repository, no commits or work sessions (how or when the work was done)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(
    path
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "src").rglob("*.py"),
                 *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    if path != Path(__file__).resolve()  # this file spells the patterns out
)
# (pattern, what it is). "session" alone is allowed where it means a nox session.
FORBIDDEN = [
    (r"\bissues? #?\d+", "an issue number"),
    (r"\bthe (?:\w+ )?issue's\b", "a reference to an issue"),
    (r"/work/|\.\./shared/|/tmp/|/scratch/", "a folder outside the repository"),
    (r"\bcommit [0-9a-f]{7}|\([0-9a-f]{7}\)", "a commit id"),
    (r"\b(?:this|next|same|GPU) session\b", "a work session"),
    (r"device budget|no device time", "how the work was done"),
]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_text_speaks_of_the_project_only(path):
    text = path.read_text(encoding="utf-8")
    found = [f"{what}: {m.group(0)!r}" for pattern, what in FORBIDDEN for m in re.finditer(pattern, text, re.IGNORECASE)]
    assert not found, f"{path.relative_to(ROOT)}: " + "; ".join(found)


def test_install_commands_install_tca_from_its_source():
    """The name `tca` on PyPI belongs to an unrelated package: no command in the docs installs tca by that name."""
    wrong = []
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL):
            for line in block.splitlines():
                for command in line.split("#")[0].split("&&"):
                    words = [w.strip("'\"") for w in command.split()]
                    if words[:2] == ["pip", "install"] and any(w == "tca" or w.startswith("tca[") for w in words):
                        wrong.append(f"{path.name}: {command.strip()}")
    assert not wrong, wrong


def test_ci_runs_the_readmes_test_command():
    """The README starts with two commands (the demo, the tests); .ci/run runs the second one as written."""
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert commands[1] in ci, (commands[1], ci)
