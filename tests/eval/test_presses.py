"""The kvpress peers on the tiny model: each keeps what its rule says, on this transformers."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from tca.eval import presses as _presses  # noqa: E402

try:
    _presses.import_kvpress()  # kvpress, with its unused imports stood in for
except ImportError as error:
    pytest.skip(f"kvpress is not installed: {error}", allow_module_level=True)

from tca.eval.presses import PressMethod, held_positions, make_press, press_method  # noqa: E402
from tca.eval.tiny import tiny_llama  # noqa: E402


def _prefill(model, ids, press):
    from transformers import DynamicCache

    from tca.models import cache_kwargs

    dense, cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, dense))
        with press(model):
            model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    return dense, cache


def _positions(c, d, h: int) -> list[int]:
    """The dense positions of head h's kept keys (each kept key must equal exactly one dense key)."""
    match = (c.keys[0, h, :, None] == d.keys[0, h, None]).all(-1)  # [kept, L]
    assert (match.sum(-1) == 1).all()
    return sorted(match.float().argmax(-1).tolist())


def test_streamingllm_keeps_the_sinks_and_the_most_recent_tokens():
    model, _ = tiny_llama()
    L = 200
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(0))
    press = make_press(press_method("streamingllm", keep=0.5))
    dense, cache = _prefill(model, ids, press)
    kept = int(L * 0.5)
    positions = list(range(press.n_sink)) + list(range(L - (kept - press.n_sink), L))
    for d, c in zip(dense.layers, cache.layers, strict=True):
        assert c.keys.shape[-2] == kept
        for h in range(c.keys.shape[1]):
            assert _positions(c, d, h) == positions
    assert held_positions(model, cache) == 2 * 2 * kept  # layers x KV heads x kept


def test_snapkv_keeps_its_share_of_the_dense_keys_per_head():
    model, _ = tiny_llama()
    L = 300
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(1))
    dense, cache = _prefill(model, ids, make_press(press_method("snapkv", keep=0.25)))
    for d, c in zip(dense.layers, cache.layers, strict=True):
        assert c.keys.shape[-2] == int(L * 0.25)
        for h in range(c.keys.shape[1]):  # every kept key is one of the head's own dense keys, each once
            positions = _positions(c, d, h)
            assert len(set(positions)) == int(L * 0.25)
            assert L - 1 in positions  # the last token (in SnapKV's observation window) is kept


def test_press_methods_check_their_arguments():
    with pytest.raises(ValueError, match="unknown press 'h2o'"):
        PressMethod("x", "h2o", 0.5)
    with pytest.raises(ValueError, match="either keep"):
        PressMethod("x", "snapkv", 0.5, "tca-tau0.9")
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        press_method("snapkv", keep=1.5)
    assert press_method("snapkv", match="tca-tau0.9").name == "snapkv=tca-tau0.9"
    with pytest.raises(ValueError, match="needs a kept fraction"):
        make_press(press_method("snapkv", match="tca-tau0.9"))
    with pytest.raises(ValueError, match="runs a TCA method's plan"):
        PressMethod("x", "tca", 0.5)
    assert press_method("tca", match="tca-tau0.9").name == "tca-press=tca-tau0.9"
    with pytest.raises(ValueError, match="needs the plan of 'dense'"):
        make_press(press_method("tca", match="dense"))
