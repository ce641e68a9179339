"""`vllm serve` with the TCA plugin, end to end: start the OpenAI server on 127.0.0.1, send concurrent completion
requests of mixed lengths, check that every one is answered, that the start-up log states the TCA settings, and
that the server's /metrics reports the KV its TCA decode steps read (tca:* metrics, tca.serving.vllm.stats).

    python benchmarks/vllm_serve_check.py --model DIR --requests 32 --out serve.json

tca must be installed (its entry point is how every vLLM process loads the plugin: `pip install -e .`). The plugin's
settings come from the environment (TCA_VLLM_*), as for any served engine; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

from tca.serving.vllm.stats import PUBLISH_SECONDS


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def tca_metrics(url: str) -> dict[str, float]:
    """The tca:* samples of the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if line.startswith("tca:"))}


def wait_healthy(url: str, server: subprocess.Popen, limit_s: float) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the server was not healthy after {limit_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=3000, help="longest prompt, in characters")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--start-limit", type=float, default=300.0, help="seconds to wait for the server")
    parser.add_argument("--log", default="serve.log")
    parser.add_argument("--out")
    parser.add_argument("serve_args", nargs="*", help="more `vllm serve` arguments (after --)")
    args = parser.parse_args()
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--host", "127.0.0.1", "--port", str(args.port),
               "--attention-backend", "CUSTOM", "--no-enable-prefix-caching", *args.serve_args]
    url = f"http://127.0.0.1:{args.port}"
    with open(args.log, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    result = {"command": command, "requests": args.requests}
    try:
        start = time.time()
        wait_healthy(url, server, args.start_limit)
        result["start_s"] = time.time() - start
        rng = random.Random(0)
        prompts = ["".join(rng.choice("abcdefghij ") for _ in range(rng.randrange(8, args.max_length)))
                   for _ in range(args.requests)]
        body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        began = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.requests) as pool:
            answers = list(pool.map(lambda p: post(url + "/v1/completions", {**body, "prompt": p}, 300), prompts))
        result["wall_s"] = time.time() - began
        result["answered"] = sum(len(a["choices"]) == 1 and a["usage"]["completion_tokens"] == args.max_tokens
                                 for a in answers)
        time.sleep(PUBLISH_SECONDS + 1)  # the layer processes publish their totals every few seconds while they run
        post(url + "/v1/completions", {**body, "prompt": prompts[0]}, 300)
        result["metrics"] = tca_metrics(url)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    with open(args.log) as log:
        lines = [line.strip() for line in log if "TCA attention:" in line]
    result["tca_log_line"] = lines[0] if lines else None
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    read = result.get("metrics", {}).get("tca:decode_kv_read_bytes_total", 0)
    return 0 if result.get("answered") == args.requests and lines and read > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
