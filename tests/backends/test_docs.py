"""docs/backends.md is generated from the registry: it must match what the registry declares now."""

from __future__ import annotations

import pytest

from helpers import ROOT, load_script
from tca.backends.common.environment import triton_interpret

DOCS = ROOT / "docs"


@pytest.mark.skipif(triton_interpret(), reason="the interpreter changes what triton declares")
def test_backends_page_is_up_to_date():
    module = load_script("docs/generate_backends.py")
    assert module.main(["--check"]) == 0, "run: PYTHONPATH=src python docs/generate_backends.py"


def test_backends_page_lists_every_registered_backend():
    from tca.backends import registry

    text = (DOCS / "backends.md").read_text()
    for name in registry.names():
        assert f"| `{name}` |" in text
