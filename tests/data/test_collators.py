import pytest

from unimm.data.collators import PaddingCollator, TextDropout, shared_prefix_length
from unimm.data.packing import IGNORE_INDEX
from unimm.data.schema import image_segment, text_segment

EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}]


def test_right_padding():
    batch = PaddingCollator(pad_token_id=0)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_left_padding_to_a_multiple():
    batch = PaddingCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 3 + [8]


def test_bad_padding_side_is_refused():
    with pytest.raises(ValueError, match="padding_side must be one of"):
        PaddingCollator(pad_token_id=0, padding_side="middle")


def test_text_dropout_rate_and_reproducibility():
    sample = {"segments": [text_segment("a red shoe", "user"), image_segment(None, "assistant")], "label": 1}
    dropout = TextDropout(probability=0.1, seed=3)
    outputs = [dropout(sample, key) for key in range(2000)]
    dropped = [output for output in outputs if output["segments"][0]["text"] == ""]
    assert 150 <= len(dropped) <= 250  # 200 expected (binomial sd ≈ 13)
    assert dropped[0]["segments"][0]["role"] == "user" and dropped[0]["label"] == 1
    assert sample["segments"][0]["text"] == "a red shoe"  # the input is not modified
    again = TextDropout(probability=0.1, seed=3)
    assert [again.drops(key) for key in range(2000)] == [o is not sample for o in outputs]
    assert TextDropout(0.0).drops(0) is False and TextDropout(1.0).drops(0) is True


def test_text_dropout_probability_is_checked():
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        TextDropout(probability=1.5)


def test_shared_prefix_length_stops_at_a_difference_a_target_or_padding():
    collate = PaddingCollator(pad_token_id=0)
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7], [1, 2, 3, 4]]
    untargeted = [{"input_ids": row, "labels": [IGNORE_INDEX] * len(row)} for row in rows]
    assert shared_prefix_length(collate(untargeted)) == 4  # the rows differ from position 4 on
    targeted = [{"input_ids": row, "labels": [IGNORE_INDEX] * 3 + row[3:]} for row in rows]
    assert shared_prefix_length(collate(targeted)) == 2  # position 3 is a target: hidden state 2 predicts it
    short = [*untargeted[:2], {"input_ids": [1, 2], "labels": [IGNORE_INDEX] * 2}]
    assert shared_prefix_length(collate(short)) == 2  # padding is not a shared token
    same = [untargeted[0], untargeted[0]]
    assert shared_prefix_length(collate(same)) == 4  # identical rows keep their last token apart
