"""RULER-style synthetic long-context tasks over real filler text (Hsieh et al. 2024, "RULER").

Four tasks, each a prompt of an exact token length with facts ("needles") hidden at a chosen depth in
evaluation text (`corpus.evaluation_text`, never the calibration text):

- `niah_single`: one "special magic number" for a key; asked for it.
- `niah_multikey`: the target needle plus three distractor needles with other keys; asked for the target's.
- `niah_multivalue`: four numbers for the same key (the first at the depth, the others at random depths);
  asked for all of them (score: the fraction recalled).
- `vt` (variable tracing): a chain `VAR A = 12345. ... VAR B = VAR A. ... VAR C = VAR B.` starting at the
  depth; asked for every variable holding the value (score: the fraction named).

Prompts are built in token space, so their length is exact: the needles are inserted after a filler token
that ends a line, nearest to the requested depth. Depth is the fraction of the filler before the (first)
needle: 0 is the start of the context, 1 its end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .corpus import evaluation_text

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt")

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noisy", "olive", "proud", "quiet", "rapid", "silver", "tidy", "upper", "vivid", "witty", "young",
)
_NOUNS = (
    "anchor", "badger", "candle", "dragon", "falcon", "garden", "harbor", "island", "jacket", "kettle", "lantern",
    "meadow", "needle", "orchard", "pepper", "quarry", "rocket", "saddle", "tunnel", "violin", "walnut", "zephyr",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

INSTRUCTION = (
    "Some special facts are hidden inside the following text. Read it carefully and remember them; "
    "a question about them follows."
)


@dataclass
class Sample:
    """One prompt: `input_ids` (exactly `length` tokens) and the strings a correct answer contains."""

    task: str
    length: int
    depth: float
    index: int
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    needle_positions: list[int] = field(default_factory=list)


class PromptBuilder:
    """Encodes the filler once and assembles prompts of exact token lengths.

    tokenizer: anything with `encode(text, add_special_tokens=False) -> list[int]` and `decode(ids) -> str`;
    if it has a chat template (`apply_chat_template`), prompts use it (instruction-tuned models need it).
    """

    def __init__(self, tokenizer, filler_text: str | None = None):
        self.tokenizer = tokenizer
        self.filler = self._encode(filler_text if filler_text is not None else evaluation_text())
        # Needles go after a token that ends a line, so they never split a word.
        line_ends = {i for i in set(self.filler) if "\n" in tokenizer.decode([i])}
        self.breaks = [pos + 1 for pos, t in enumerate(self.filler) if t in line_ends]
        self.chat = self._chat_parts()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _chat_parts(self) -> tuple[str, str] | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template or not hasattr(self.tokenizer, "apply_chat_template"):
            return None
        marker = "@@TCA_CONTEXT@@"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, _, after = text.partition(marker)
        return before, after

    def _frame(self, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the haystack."""
        if self.chat is None:
            head, tail = INSTRUCTION + "\n\n", f"\n\nQuestion: {question}\nAnswer: {answer_prefix}"
        else:
            head = self.chat[0] + INSTRUCTION + "\n\n"
            tail = f"\n\nQuestion: {question}" + self.chat[1] + answer_prefix
        return self._encode(head), self._encode(tail)

    def build(self, length: int, question: str, answer_prefix: str, needles: list[tuple[float, str]], rng) -> tuple[list[int], list[int]]:
        """A prompt of exactly `length` tokens with `needles` (depth, sentence) hidden in filler.

        Returns (input_ids, the start position of each needle in the prompt).
        """
        head, tail = self._frame(question, answer_prefix)
        needle_ids = [self._encode(sentence + "\n") for _, sentence in needles]
        n_fill = length - len(head) - len(tail) - sum(len(n) for n in needle_ids)
        if n_fill < 16:
            raise ValueError(f"context length {length} is too short for this task's prompt; use at least {length - n_fill + 16}")
        if n_fill + 1 > len(self.filler):
            raise ValueError(f"the filler text has {len(self.filler)} tokens, fewer than the {n_fill} needed")
        start = rng.randrange(0, len(self.filler) - n_fill)
        fill = self.filler[start : start + n_fill]
        breaks = [b - start for b in self.breaks if start < b < start + n_fill] or [n_fill]
        cuts = []
        for depth, _ in needles:
            target = round(depth * n_fill)
            cuts.append(min(breaks, key=lambda b: (abs(b - target), b)) if 0 < target < n_fill else target)
        order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
        ids, positions, previous = list(head), [0] * len(needles), 0
        for i in order:
            ids += fill[previous : cuts[i]]
            positions[i] = len(ids)
            ids += needle_ids[i]
            previous = cuts[i]
        ids += fill[previous:] + tail
        return ids, positions


def _key(rng) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _number(rng) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def make_sample(builder: PromptBuilder, task: str, length: int, depth: float, index: int, seed: int = 0) -> Sample:
    """One sample of `task` at `length` tokens with its (first) needle at `depth`, reproducible from the seed."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{index}")
    if task in ("niah_single", "niah_multikey"):
        key, value = _key(rng), _number(rng)
        needles = [(depth, _needle(key, value))]
        if task == "niah_multikey":
            others = set()
            while len(others) < 3:
                other = _key(rng)
                if other != key:
                    others.add(other)
            needles += [(rng.random(), _needle(other, _number(rng))) for other in sorted(others)]
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        answers, max_new = [value], 12
    elif task == "niah_multivalue":
        key = _key(rng)
        values = []
        while len(values) < 4:
            value = _number(rng)
            if value not in values:
                values.append(value)
        needles = [(depth, _needle(key, values[0]))] + [(rng.random(), _needle(key, v)) for v in values[1:]]
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        answers, max_new = values, 48
    else:  # vt: a chain of 2 hops, in order, from `depth` towards the end of the context
        names = []
        while len(names) < 3:
            name = "".join(rng.choice(_LETTERS) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10_000, 100_000))
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in (1, 2)]
        needles = [(depth + (1 - depth) * i / 3, s) for i, s in enumerate(statements)]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = f"According to the chain of variable assignments in the text above, 3 variables are assigned the value {value}, they are:"
        answers, max_new = names, 24
    ids, positions = builder.build(length, question, prefix, needles, rng)
    return Sample(task, length, depth, index, ids, answers, max_new, positions)


def make_samples(builder: PromptBuilder, tasks, lengths, depths, samples_per_cell: int, seed: int = 0) -> list[Sample]:
    """Every (task, length, depth, index) combination."""
    return [
        make_sample(builder, task, length, depth, index, seed)
        for task in tasks
        for length in lengths
        for depth in depths
        for index in range(samples_per_cell)
    ]


def score(output: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of the expected strings found in the output."""
    return sum(a in output for a in answers) / len(answers)
