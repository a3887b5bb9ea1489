import pytest

from unimm.data.bad_records import BadRecordError
from unimm.data.schema import drop_text, image_segment, image_tokens_segment, text_segment, validate_sample


def test_drop_text_keeps_roles_images_and_columns():
    sample = {
        "segments": [
            text_segment("draw a cat", "user"),
            image_tokens_segment([1, 2, 3, 4], [2, 2], "assistant"),
        ],
        "label": 7,
    }
    unconditional = drop_text(sample)
    assert [(s["type"], s["role"], s["text"]) for s in unconditional["segments"]] == [
        ("text", "user", ""),
        ("image", "assistant", None),
    ]
    assert unconditional["segments"][1]["image_token_ids"] == [1, 2, 3, 4]
    assert unconditional["label"] == 7
    assert sample["segments"][0]["text"] == "draw a cat"


def test_valid_samples_pass(files):
    validate_sample({"segments": [image_segment(files.png_bytes(3)), text_segment("three")]})
    validate_sample({"segments": [image_tokens_segment([0] * 6, [2, 3]), text_segment("ids")]})


@pytest.mark.parametrize(
    ("sample", "reason", "message"),
    [
        ({"segments": []}, "missing_field", "non-empty list of 'segments'"),
        ({"segments": [text_segment("")]}, "empty_text", "segment 0: 'text' is empty"),
        (
            {"segments": [text_segment("ok"), {**text_segment("x"), "text": 3}]},
            "wrong_type",
            "segment 1: 'text' must be",
        ),
        ({"segments": [text_segment("x", role="bot")]}, "wrong_type", "'role' must be one of"),
        ({"segments": [{**text_segment("x"), "type": "audio"}]}, "wrong_type", "'type' must be one of"),
        ({"segments": [image_segment(None)]}, "missing_image", "needs 'image' or 'image_token_ids'"),
        (
            {"segments": [image_tokens_segment([1, 2, 3], [2, 2])]},
            "wrong_type",
            "3 'image_token_ids' do not fill",
        ),
        ({"segments": [image_segment(b"not a png")]}, "unreadable_image", "UnidentifiedImageError"),
        ({"segments": [image_segment("/no/such/file.png")]}, "missing_image", "/no/such/file.png"),
    ],
)
def test_invalid_samples_say_what_and_where(sample, reason, message):
    with pytest.raises(BadRecordError, match=message) as raised:
        validate_sample(sample)
    assert raised.value.reason == reason
