"""The TCA plugin inside real vLLM engines on a CUDA GPU (vLLM's CUDA build; in-process engines, bf16).

Greedy tokens are compared with vLLM's own FlashAttention backend (dense budgets, and every sequence below the
crossover) and with tca's transformers integration (default budgets). Two bf16 runs through different kernels
can part at a near-tie, so a comparison passes when the tokens are equal, or when they first differ where the
reference's two best candidates were within TIE nats of each other (a coin toss, not an error).

Shape letters: L prompt length.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # kv_usage() reads the layers of this process
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
vllm = pytest.importorskip("vllm", reason="needs vLLM's CUDA build (docs/serving_vllm.md)")

import tca.serving.vllm as plugin  # noqa: E402
from tca.serving.vllm.memory import kv_usage  # noqa: E402

TIE = 0.1  # nats between the reference's best two tokens under which a different choice is a near-tie
TCA = {"attention_backend": "CUSTOM", "enable_prefix_caching": False}
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 512}
SMALL_GEOMETRY = {"TCA_VLLM_BLOCK_SIZE": "16", "TCA_VLLM_WINDOW": "64"}
LENGTHS = (39, 300, 7, 1000, 2500)
VOCAB = 512
VARIABLES = ("TCA_VLLM_PLAN", "TCA_VLLM_BLOCK_SIZE", "TCA_VLLM_WINDOW", "TCA_VLLM_BACKEND", "TCA_VLLM_DENSE_BELOW")


def prompts(lengths=LENGTHS, vocab=VOCAB):
    return [{"prompt_token_ids": [(i * 7 + 3 + n) % vocab for i in range(n)]} for n in lengths]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A seeded random bf16 Llama (2 layers, 4 query / 2 KV heads, head dim 64) with peaked logits (few ties)."""
    from tca.models.tiny_random import tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama-gpu")
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=VOCAB,
                       max_position_embeddings=8192, initializer_range=0.2)
    model.to(torch.bfloat16).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", autouse=True)
def _plugin_registered():
    plugin.register()


def generate(model: str, engine: dict, environ: dict, monkeypatch, requests=None, max_tokens=16, **llm):
    """(greedy token ids, top-2 logprobs per step, the TCA layers' KV usage) of each request."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    # A fixed 1 GiB pool and a low utilization bound: in-process engines do not hand all their memory back.
    options = dict(enforce_eager=True, dtype="bfloat16", seed=0, gpu_memory_utilization=0.1,
                   kv_cache_memory_bytes=1 << 30, max_model_len=8192, skip_tokenizer_init=True)
    instance = vllm.LLM(model=model, **{**options, **engine, **llm})
    try:
        params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                     logprobs=2)
        outputs = instance.generate(requests or prompts(), params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [[sorted((p.logprob for p in step.values()), reverse=True) for step in o.outputs[0].logprobs]
                    for o in outputs]
        return tokens, logprobs, kv_usage()
    finally:
        del instance
        gc.collect()
        torch.cuda.empty_cache()


def assert_agree(reference, reference_logprobs, tokens):
    """Equal tokens, or a first difference at a near-tie of the reference (module docstring)."""
    for row, (want, got) in enumerate(zip(reference, tokens, strict=True)):
        if want == got:
            continue
        step = next(i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
        best = reference_logprobs[row][step]
        gap = best[0] - best[1] if len(best) > 1 else float("inf")
        assert gap < TIE, f"request {row} parts from the reference at step {step} with a margin of {gap:.3f} nats"


def test_dense_budgets_on_the_tca_path_give_flash_attention_tokens(tiny_llama, monkeypatch):
    """Dense budgets through TCA's selection, sparse prefill and decode state (crossover 0), chunked prefill
    and mixed batches: vLLM's FlashAttention tokens."""
    expected, logprobs, _ = generate(tiny_llama, CHUNKED, {}, monkeypatch)
    forced = {"TCA_VLLM_PLAN": "dense", "TCA_VLLM_DENSE_BELOW": "0", **SMALL_GEOMETRY}
    tokens, _, usage = generate(tiny_llama, {**TCA, **CHUNKED}, forced, monkeypatch)
    assert usage.prompts > 0 and usage.chunks > 0 and usage.decodes > 0
    assert usage.read_bytes == usage.dense_bytes
    assert_agree(expected, logprobs, tokens)


# Full CUDA graphs for decode-only batches, without torch.compile (a quick start); batches with prompts run eagerly.
GRAPHS = {"enforce_eager": False, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}


def test_decode_steps_replay_from_cuda_graphs(tiny_llama, monkeypatch):
    """Decode-only batches replay the batched decode step from full CUDA graphs: with dense budgets the tokens are
    FlashAttention's, with default budgets those of the same engine without graphs; the step's counters (added on
    the device) still count every decode."""
    from vllm.compilation.counter import compilation_counter

    expected, logprobs, _ = generate(tiny_llama, CHUNKED, {}, monkeypatch)
    forced = {"TCA_VLLM_PLAN": "dense", "TCA_VLLM_DENSE_BELOW": "0", **SMALL_GEOMETRY}
    captured = compilation_counter.num_cudagraph_captured
    tokens, _, usage = generate(tiny_llama, {**TCA, **CHUNKED, **GRAPHS}, forced, monkeypatch)
    assert compilation_counter.num_cudagraph_captured > captured
    assert usage.decodes > 0 and usage.read_bytes == usage.dense_bytes
    assert_agree(expected, logprobs, tokens)
    default = {"TCA_VLLM_PLAN": "default", "TCA_VLLM_DENSE_BELOW": "0", **SMALL_GEOMETRY}
    eager, eager_logprobs, _ = generate(tiny_llama, {**TCA, **CHUNKED}, default, monkeypatch)
    graphs, _, usage = generate(tiny_llama, {**TCA, **CHUNKED, **GRAPHS}, default, monkeypatch)
    assert 0 < usage.read_bytes < usage.dense_bytes
    assert_agree(eager, eager_logprobs, graphs)


def test_below_the_crossover_the_engine_is_vllms_own(tiny_llama, monkeypatch):
    """With the default crossover and an 8K context, every step is vLLM's FlashAttention: bit-equal tokens,
    no TCA row, and vLLM keeps its CUDA-graph support for attention."""
    from tca.serving.vllm.cuda import TCAFlashMetadataBuilder

    expected, _, _ = generate(tiny_llama, {}, {}, monkeypatch)
    before = kv_usage()
    tokens, _, after = generate(tiny_llama, TCA, {"TCA_VLLM_PLAN": "default"}, monkeypatch)
    assert tokens == expected
    assert (after.prompts, after.chunks, after.decodes) == (before.prompts, before.chunks, before.decodes)
    from vllm.v1.attention.backend import AttentionCGSupport

    assert TCAFlashMetadataBuilder.get_cudagraph_support(engine_config(8192), None) != AttentionCGSupport.NEVER
    long_context = TCAFlashMetadataBuilder.get_cudagraph_support(engine_config(131072), None)
    assert long_context == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE  # decode-only batches in full graphs


def engine_config(max_model_len: int):
    """What the builder reads of an engine's config: the context length and the attention shape (8B's)."""
    from types import SimpleNamespace

    model = SimpleNamespace(max_model_len=max_model_len, get_num_attention_heads=lambda parallel: 32,
                            get_num_kv_heads=lambda parallel: 8, get_head_size=lambda: 128)
    return SimpleNamespace(model_config=model, parallel_config=None)


@pytest.mark.xfail(strict=True, reason=(
    "known: on an H100 in bf16 the 1000-token request parted from tca's transformers path at step 5 with a margin "
    "of 0.81 nats (vLLM 0.26.0, 2026-12-07), not yet explained; the float32 twin on the CPU lane agrees"))
def test_default_budgets_give_tca_transformers_tokens(tiny_llama, monkeypatch):
    """Without chunking, default budgets compute what tca's transformers integration computes."""
    import transformers

    import tca
    from tca.models import TCACache, cache_kwargs, enable_tca

    requests = prompts((300, 1000, 2500))
    geometry = {"TCA_VLLM_PLAN": "default", "TCA_VLLM_DENSE_BELOW": "0", **SMALL_GEOMETRY}
    tokens, _, usage = generate(tiny_llama, TCA, geometry, monkeypatch, requests=requests)
    assert usage.chunks == 0 and 0 < usage.read_bytes < usage.dense_bytes
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).cuda().eval()
    enable_tca(model, plan=None, config=tca.TCAConfig(block_size=16, window=64), backend="triton")
    reference, logprobs = [], []
    for request in requests:
        ids = torch.tensor([request["prompt_token_ids"]], device="cuda")
        out = model.generate(ids, **cache_kwargs(model, TCACache(model)), max_new_tokens=16, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        reference.append(out.sequences[0, ids.shape[1]:].tolist())
        logprobs.append([s[0].float().log_softmax(-1).topk(2).values.tolist() for s in out.scores])
    assert_agree(reference, logprobs, tokens)


def test_refusals_name_the_setting(tiny_llama, monkeypatch):
    with pytest.raises(Exception, match="--no-enable-prefix-caching"):
        generate(tiny_llama, {"attention_backend": "CUSTOM", "enable_prefix_caching": True}, {}, monkeypatch)


@pytest.fixture(scope="module")
def llama_8b_shape(tmp_path_factory):
    """The Llama-3.1-8B shape as a config alone: vLLM fills it with random weights (load_format="dummy")."""
    from transformers import LlamaConfig

    directory = tmp_path_factory.mktemp("llama-8b-shape")
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                torch_dtype="bfloat16").save_pretrained(directory)
    return str(directory)


def test_8b_shape_dense_budgets_give_flash_attention_tokens(llama_8b_shape, monkeypatch):
    requests = prompts((3000, 9000, 700), vocab=128256)
    big = {"load_format": "dummy", "gpu_memory_utilization": 0.4, "kv_cache_memory_bytes": 4 << 30,
           "max_model_len": 16384, **CHUNKED,
           "max_num_batched_tokens": 4096}
    expected, logprobs, _ = generate(llama_8b_shape, big, {}, monkeypatch, requests=requests, max_tokens=8)
    forced = {"TCA_VLLM_PLAN": "dense", "TCA_VLLM_DENSE_BELOW": "0"}
    tokens, _, usage = generate(llama_8b_shape, {**TCA, **big}, forced, monkeypatch, requests=requests, max_tokens=8)
    assert usage.chunks > 0 and usage.decodes > 0
    assert_agree(expected, logprobs, tokens)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """Qwen2.5-Coder-0.5B-Instruct saved as a Hugging Face folder for vLLM, in bf16."""
    from helpers import qwen25_folder

    return qwen25_folder(tmp_path_factory.mktemp("qwen2.5-0.5b"), torch.bfloat16)


QWEN_ENGINE = {"max_model_len": 16384, **CHUNKED, "max_num_batched_tokens": 4096}


def test_qwen_dense_budgets_give_flash_attention_tokens(qwen_folder, monkeypatch):
    """A real model (14 query / 2 KV heads, 24 layers), chunked prefill, a batch of mixed lengths."""
    requests = prompts((3000, 9000, 700), vocab=151000)
    expected, logprobs, _ = generate(qwen_folder, QWEN_ENGINE, {}, monkeypatch, requests=requests, max_tokens=8)
    forced = {"TCA_VLLM_PLAN": "dense", "TCA_VLLM_DENSE_BELOW": "0", "TCA_VLLM_BLOCK_SIZE": "64",
              "TCA_VLLM_WINDOW": "512"}
    tokens, _, usage = generate(qwen_folder, {**TCA, **QWEN_ENGINE}, forced, monkeypatch, requests=requests,
                                max_tokens=8)
    assert usage.chunks > 0 and usage.decodes > 0
    assert_agree(expected, logprobs, tokens)


def test_qwen_shipped_plan_runs_and_reads_less(qwen_folder, monkeypatch):
    """The shipped plan (b 64, w 512, tau 0.99: 39 of 48 heads dense) in the engine: every request answered,
    decode reading less KV than dense."""
    from tca.models.qwen25 import qwen25_plan_path

    requests = prompts((3000, 9000, 700), vocab=151000)
    plan = {"TCA_VLLM_PLAN": str(qwen25_plan_path()), "TCA_VLLM_DENSE_BELOW": "0"}
    tokens, _, usage = generate(qwen_folder, {**TCA, **QWEN_ENGINE}, plan, monkeypatch, requests=requests,
                                max_tokens=8)
    assert [len(t) for t in tokens] == [8, 8, 8]
    assert 0 < usage.read_bytes < usage.dense_bytes
