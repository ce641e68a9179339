"""`python -m tca demo` end to end on a tiny random Qwen2 (seconds): a config without `head_dim` (Qwen2's derives
it from the hidden size), and every side timed over repeats with their spread."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import tca  # noqa: E402
from tca.cli import main  # noqa: E402
from tca.commands import _args  # noqa: E402
from tca.eval.tiny import ByteTokenizer  # noqa: E402


class CallableByteTokenizer(ByteTokenizer):
    """The byte tokenizer called like a transformers one (the passkey prompt does)."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=self.encode(text))


def tiny_qwen2():
    """2 layers, 4 query / 2 KV heads of dim 16, and no head_dim attribute on its config."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(config)
    return model.eval()


@pytest.fixture
def qwen2_demo(monkeypatch, tmp_path):
    """The demo's --model qwen2.5-0.5b replaced by the tiny Qwen2; returns the arguments of a run of its plan."""
    from tca.models import default_plan, model_shape

    model = tiny_qwen2()
    assert not hasattr(model.config, "head_dim")  # as transformers' Qwen2Config has it
    monkeypatch.setattr(_args.ModelChoice, "load", lambda self, *a, **k: (model, CallableByteTokenizer()))
    plan = tmp_path / "plan.json"
    default_plan(model_shape(model), tca.TCAConfig(block_size=16, window=64)).save(plan)
    return ["demo", "--model", "qwen2.5-0.5b", "--plan", str(plan), "--tokens", "256", "--max-new-tokens", "2"]


def test_demo_runs_a_model_whose_config_has_no_head_dim(qwen2_demo, capsys):
    assert main(qwen2_demo) == 0
    out = capsys.readouterr().out
    assert "16 x 4 bytes" in out  # head dim 64 / 4 heads, read through the model's shape
    assert "3 runs each: best, median, spread" in out and "median" in out and "%" in out


def test_demo_repeats_are_checked(qwen2_demo, capsys):
    assert main([*qwen2_demo, "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
