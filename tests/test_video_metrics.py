"""Video QA metrics: option extraction from free text, exact match, token F1, per-dataset rows."""

import pytest

from mm15.base.metrics import format_table
from mm15.video.metrics import VIDEO_COLUMNS, extract_choice, token_f1, video_qa_metrics

CHOICES = ["the man opens the door", "a dog runs away", "she drinks coffee", "nothing happens"]


@pytest.mark.parametrize("reply,index", [
    ("B", 1), ("(B)", 1), ("b.", 1), (" C ", 2),
    ("B) a dog runs away", 1), ("(D) nothing happens at all", 3), ("A: the man opens the door", 0),
    ("Answer: B) the dog", 1), ("The answer is (C).", 2), ("Best option:(D", 3), ("I think the correct option is B.", 1),
    ("In the video, a dog runs away from the camera.", 1),
    ("She drinks coffee.", 2),
])
def test_extract_choice_from_free_text(reply, index):
    assert extract_choice(reply, CHOICES) == index


@pytest.mark.parametrize("reply", ["", "I am not sure", "E", "A man walks in", "the answer is a dog"])
def test_extract_choice_gives_none_when_no_option_is_named(reply):
    # "E" is not an option of four; "A man" is an article, not a letter answer
    assert extract_choice(reply, CHOICES) is None


def test_longest_option_text_wins():
    assert extract_choice("the red car", ["car", "the red car", "bus"]) == 1


def test_token_f1_and_normalisation():
    assert token_f1("The cat sat.", "cat sat") == 1.0
    assert token_f1("a dog", "cat") == 0.0
    assert token_f1("red ball on grass", "red ball") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_rows_per_dataset_with_chance_and_parse_rate():
    records = [
        {"task": "nextqa", "prediction": "B", "answer": "B", "meta": {"choices": CHOICES, "answer_index": 1}},
        {"task": "nextqa", "prediction": "no idea", "answer": "A", "meta": {"choices": CHOICES, "answer_index": 0}},
        {"task": "direction", "prediction": "left", "answer": "left", "meta": {"choices": ["left", "right", "up", "down"]}},
        {"task": "activitynet_qa", "prediction": "Yes.", "answer": "yes", "meta": {}},
        {"task": "activitynet_qa", "prediction": "a red hat", "answer": "red", "meta": {}},
    ]
    rows = {r["task"]: r for r in video_qa_metrics(records)}
    assert rows["nextqa"]["accuracy"] == 0.5 and rows["nextqa"]["parsed"] == 0.5 and rows["nextqa"]["chance"] == 0.25
    assert rows["direction"]["accuracy"] == 1.0
    assert rows["activitynet_qa"]["accuracy"] == 0.5 and rows["activitynet_qa"]["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert rows["activitynet_qa"]["chance"] is None
    assert rows["all"]["n"] == 5 and rows["all"]["accuracy"] == pytest.approx(3 / 5)
    table = format_table(list(rows.values()), VIDEO_COLUMNS)
    assert "nextqa" in table and "0.500" in table
