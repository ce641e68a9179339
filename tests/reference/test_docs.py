"""docs/semantics.md keeps every [choice] mark of the spec."""

from __future__ import annotations

import pytest

from helpers import ROOT

DOC = ROOT / "docs" / "semantics.md"

MARKS = [
    "[choice: block-aligned]",
    "[choice: GQA]",
    "[choice: largest remainder]",
    "[choice: compress the block that leaves the window",
    "[choice: per-row retained mass, the quantity the error bound uses]",
    # Chunked and streaming prefill (section 5b).
    "[choice: each chunk is the stateless rule on its prefix]",
    "[choice: exact chunks of any size]",
    "[choice: the blocks leaving during a chunk are budgeted together by Eqs. 5-8, scored by the chunk's last query]",
    "[choice: compress before attending, as decoding does]",
    "[choice: streaming chunks end on block boundaries]",
]


@pytest.mark.parametrize("mark", MARKS)
def test_semantics_doc_keeps_the_choice_marks(mark):
    text = " ".join(DOC.read_text().split())  # marks may wrap across lines
    assert mark in text


def test_semantics_doc_marks_the_untitled_choices():
    text = DOC.read_text()
    # mass_scale and the default budgets carry a bare [choice] mark, as in the spec.
    assert text.count("**[choice]**") >= 2
    assert "## Questions on the spec" in text
