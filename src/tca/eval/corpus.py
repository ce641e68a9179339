"""Real text shipped with Python, split into disjoint calibration and evaluation parts.

The source is `pydoc_data.topics` (the language reference's documentation strings, ~465K characters of
English prose with some grammar and code), so nothing is downloaded. Topics are sorted by name and every
third one (index % 3 == 0) goes to calibration, the others to evaluation: the budget plans the harness
calibrates never see a sentence the needles are hidden in or the perplexity is measured on.
"""

from __future__ import annotations

import functools

CALIBRATION_EVERY = 3


@functools.cache
def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def topic_split() -> tuple[list[str], list[str]]:
    """(calibration topic names, evaluation topic names): disjoint, together all topics."""
    names = [name for name, _ in _topics()]
    calibration = [n for i, n in enumerate(names) if i % CALIBRATION_EVERY == 0]
    evaluation = [n for i, n in enumerate(names) if i % CALIBRATION_EVERY != 0]
    return calibration, evaluation


def _join(names: list[str]) -> str:
    text = dict(_topics())
    return "\n\n".join(text[n].strip() for n in names)


@functools.cache
def calibration_text() -> str:
    """The calibration part (~155K characters): what `tca eval` calibrates its budget plans on."""
    return _join(topic_split()[0])


@functools.cache
def evaluation_text() -> str:
    """The evaluation part (~270K characters): needle filler and perplexity text; disjoint from calibration.

    Some topics repeat paragraphs of others (e.g. "class" and "execmodel"): paragraphs of more than
    80 characters that also occur in the calibration text are dropped.
    """
    calibration = calibration_text()
    paragraphs = _join(topic_split()[1]).split("\n\n")
    return "\n\n".join(p for p in paragraphs if len(p) <= 80 or p not in calibration)
