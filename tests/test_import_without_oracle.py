"""`import tca` loads no module of the oracle (tca.reference): production code never needs the readable
definition, and a fresh interpreter shows whether anything pulls it in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_import_tca_loads_no_reference_module():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    code = (
        "import sys, tca\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('tca.reference'))\n"
        "assert not loaded, loaded\n"
        "assert callable(tca.reference.attention)  # still reachable, loaded on first use\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
