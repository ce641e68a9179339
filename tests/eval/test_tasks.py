"""The quality harness's inputs: disjoint text splits, exact-length prompts with needles where asked, scoring."""

from __future__ import annotations

import pytest

from tca.eval.corpus import calibration_text, evaluation_text, topic_split
from tca.eval.tasks import TASKS, PromptBuilder, make_sample, make_samples, score
from tca.eval.tiny import ByteTokenizer


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(ByteTokenizer())


def test_calibration_and_evaluation_texts_are_disjoint():
    calibration, evaluation = topic_split()
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    from pydoc_data.topics import topics

    assert sorted(calibration + evaluation) == sorted(topics)
    # No evaluation paragraph of real length appears in the calibration text.
    cal = calibration_text()
    paragraphs = [p for p in evaluation_text().split("\n\n") if len(p) > 400]
    assert paragraphs
    assert not any(p in cal for p in paragraphs)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [700, 1500])
def test_prompt_has_exact_length_and_needles_where_recorded(builder, task, length):
    sample = make_sample(builder, task, length, 0.5, 0, seed=3)
    assert len(sample.input_ids) == length
    text = ByteTokenizer().decode(sample.input_ids)
    for value in sample.answers:
        assert value in text
    # Each needle starts at its recorded position and sits after a line break of the filler.
    for position in sample.needle_positions:
        needle = ByteTokenizer().decode(sample.input_ids[position : position + 20])
        assert needle.startswith(("One of the special", "VAR "))
        assert "\n" in ByteTokenizer().decode(sample.input_ids[position - 8 : position])


def test_needle_depth_follows_the_request(builder):
    head = len(ByteTokenizer().encode("Some special facts"))
    positions = [make_sample(builder, "niah_single", 2000, d, 0).needle_positions[0] for d in (0.1, 0.5, 0.9)]
    assert positions[0] < positions[1] < positions[2]
    assert positions[0] < 0.3 * 2000 and positions[2] > 0.7 * 2000 + head


def test_samples_are_reproducible_and_differ_by_index(builder):
    a = make_samples(builder, ["niah_multikey"], [800], [0.3], 2, seed=1)
    b = make_samples(builder, ["niah_multikey"], [800], [0.3], 2, seed=1)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert a[0].answers != a[1].answers


def test_score_is_the_fraction_of_answers_found():
    assert score("the numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert score("only 123", ["123", "456", "789", "000"]) == 0.25
    assert score("nothing", ["123"]) == 0.0


def test_bad_requests_raise_clear_errors(builder):
    with pytest.raises(ValueError, match="unknown task"):
        make_sample(builder, "passkey", 1000, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        make_sample(builder, "niah_single", 1000, 1.5, 0)
    with pytest.raises(ValueError, match="too short"):
        make_sample(builder, "niah_single", 100, 0.5, 0)
