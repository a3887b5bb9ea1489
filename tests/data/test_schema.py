import io

import numpy as np
import PIL.ExifTags
import PIL.Image
import pytest

from unimm.data.bad_records import BadRecordError
from unimm.data.schema import (
    MAX_IMAGE_PIXELS_ENV,
    ImageTooLargeError,
    drop_text,
    image_segment,
    image_tokens_segment,
    max_image_pixels,
    open_image,
    text_segment,
    validate_sample,
)


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


def _png(image: PIL.Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    # A 2-wide, 3-tall image with a red top-left pixel, stored with "rotate 90° clockwise to view" (6).
    pixels = np.zeros((3, 2, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 6
    opened = open_image(_png(PIL.Image.fromarray(pixels), exif=exif))
    assert opened.size == (3, 2)
    # Rotating 90° clockwise moves the top-left pixel to the top-right.
    assert np.asarray(opened)[0, 2].tolist() == [255, 0, 0]
    assert np.asarray(opened)[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", [0, 257, 32896, 65535], [0, 1, 128, 255]),
        ("I", [0, 257, 32896, 65535], [0, 1, 128, 255]),
        ("F", [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),
        ("F", [-1.0, 0.0, 1.0, 3.0], [0, 64, 128, 255]),  # outside [0, 1]: its own range
    ],
)
def test_high_bit_depth_greyscale_is_scaled_not_clipped(mode, values, expected):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = PIL.Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    opened = open_image(image)
    assert opened.mode == "L"
    assert np.asarray(opened)[0].tolist() == expected
    # The path through a file: a 16-bit PNG, which Pillow's RGB conversion turned almost white.
    if mode == "I;16":
        assert np.asarray(open_image(_png(image)).convert("RGB"))[0, :, 0].tolist() == expected


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    bomb = _png(PIL.Image.new("L", (10_000, 6_000)))  # 60 Mpx of zeros: ~60 KB of PNG
    with pytest.raises(
        ImageTooLargeError, match=r"10000x6000 = 60000000 pixels, more than the limit of 50000000"
    ):
        open_image(bomb)
    assert open_image(bomb, max_pixels=60_000_000).size == (10_000, 6_000)
    small = _png(PIL.Image.new("RGB", (40, 30)))
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1000")
    assert max_image_pixels() == 1000
    with pytest.raises(ImageTooLargeError, match="40x30 = 1200 pixels"):
        open_image(small)
    with pytest.raises(ImageTooLargeError, match="40x30"):  # an already decoded image too
        open_image(PIL.Image.new("RGB", (40, 30)))
    # Past Pillow's own guard (179 Mpx), refused at open: still a size error, not an unreadable image.
    with pytest.raises(ImageTooLargeError, match=r"225000000 pixels.*the limit here is 1000 pixels"):
        open_image(_png(PIL.Image.new("1", (15_000, 15_000))))
    with pytest.raises(ImageTooLargeError, match=r"more than the limit of 10$"):  # a caller's own limit
        open_image(small, max_pixels=10)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="whole number"):
        max_image_pixels()


def test_too_large_image_is_a_bad_record(monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "63")
    with pytest.raises(BadRecordError) as caught:
        validate_sample({"segments": [image_segment(_png(PIL.Image.new("L", (8, 8)))), text_segment("x")]})
    assert caught.value.reason == "image_too_large"
