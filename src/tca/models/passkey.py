"""Passkey retrieval prompts: a number hidden near the start of a long stretch of real text (pydoc topics).

Used by the demo and the slow tests: a model that answers with the number read it from far back in the
context, through whatever its attention (dense or TCA) kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import default_calibration_text

# The demo's haystack starts here in the pydoc text, far from the calibration segment (which starts at 0).
HAYSTACK_OFFSET_CHARS = 200_000
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


@dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # [1, L]
    passkey: str
    needle_token: int  # position of the token that completes the passkey's first appearance


def passkey_prompt(tokenizer, num_tokens: int = 2048, depth: float = 0.1, passkey: str = "68413",
                   offset_chars: int = HAYSTACK_OFFSET_CHARS) -> PasskeyPrompt:
    """A chat prompt of about `num_tokens` tokens: pydoc text with the needle at `depth` (0 = start, 1 = end),
    then the question, then the start of the assistant's answer ("The pass key is")."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    text = default_calibration_text()[offset_chars:]
    needle = NEEDLE.format(key=passkey)
    overhead = len(_encode(tokenizer, _chat(tokenizer, needle + "\n\n" + QUESTION)))
    budget = num_tokens - overhead
    if budget <= 0:
        raise ValueError(f"num_tokens={num_tokens} leaves no room for text around the question")
    filler = _encode(tokenizer, text)[:budget]
    cut = int(round(depth * budget))
    before, after = tokenizer.decode(filler[:cut]), tokenizer.decode(filler[cut:])
    content = f"{before}\n{needle}\n{after}\n\n{QUESTION}"
    ids = _encode(tokenizer, _chat(tokenizer, content))
    return PasskeyPrompt(torch.tensor([ids]), passkey, _first_token_completing(tokenizer, ids, passkey))


def found(answer: str, passkey: str) -> bool:
    return passkey in answer


def _chat(tokenizer, content: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = content + "\n"
    return prompt + ANSWER_PREFIX


def _first_token_completing(tokenizer, ids: list[int], text: str) -> int:
    """The smallest i such that the decoded ids[: i + 1] contain `text` (binary search: decoding is monotone)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if text in tokenizer.decode(ids[: mid + 1]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids
