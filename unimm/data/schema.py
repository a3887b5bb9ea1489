"""The one sample schema shared by pairs, interleaved documents and chat.

A sample is a list of segments; each segment is text or an image, with an optional role (``user`` /
``assistant`` / ``system`` for chat, empty otherwise). An image segment holds pixels (a PIL image, as
stored by ``datasets.Image``) or pre-computed visual-token ids (a ``(h, w)`` grid, flattened row-major
with its ``image_grid`` shape).

In Arrow every segment has every field, unused ones ``None``, so one ``datasets.Features`` describes
all samples and datasets of different kinds can be concatenated or mixed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import datasets
import PIL.Image

from unimm.data.bad_records import (
    EMPTY_TEXT,
    MISSING_FIELD,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    WRONG_TYPE,
    BadRecordError,
)

TEXT = "text"
IMAGE = "image"
SEGMENT_TYPES = (TEXT, IMAGE)
ROLES = ("", "system", "user", "assistant")

SEGMENT_FEATURES = {
    "type": datasets.Value("string"),
    "role": datasets.Value("string"),
    "text": datasets.Value("string"),
    "image": datasets.Image(),
    "image_token_ids": datasets.Sequence(datasets.Value("int32")),
    "image_grid": datasets.Sequence(datasets.Value("int32"), length=2),
}


def sample_features(**extra_columns: datasets.features.FeatureType) -> datasets.Features:
    """``Features`` of the sample schema, plus dataset-specific metadata columns (labels, names)."""
    return datasets.Features({"segments": [SEGMENT_FEATURES], **extra_columns})


def text_segment(text: str, role: str = "") -> dict[str, Any]:
    return {
        "type": TEXT,
        "role": role,
        "text": text,
        "image": None,
        "image_token_ids": None,
        "image_grid": None,
    }


def image_segment(image: Any, role: str = "") -> dict[str, Any]:
    """An image segment from pixels (PIL image, numpy array, path or bytes, as ``datasets.Image`` takes)."""
    return {
        "type": IMAGE,
        "role": role,
        "text": None,
        "image": image,
        "image_token_ids": None,
        "image_grid": None,
    }


def image_tokens_segment(
    image_token_ids: Sequence[int], image_grid: Sequence[int], role: str = ""
) -> dict[str, Any]:
    """An image segment holding pre-computed visual-token ids: a ``(h, w)`` grid flattened row-major."""
    return {
        "type": IMAGE,
        "role": role,
        "text": None,
        "image": None,
        "image_token_ids": list(image_token_ids),
        "image_grid": list(image_grid),
    }


def drop_text(sample: dict[str, Any]) -> dict[str, Any]:
    """The unconditional form of ``sample`` for classifier-free guidance.

    Every text segment's text becomes ``""``; roles, image segments and other columns are kept, so
    training-time caption dropout and the generation engine's unconditional rows are the same thing.
    The input is not modified."""
    segments = [
        {**segment, "text": ""} if segment.get("type") == TEXT else segment for segment in sample["segments"]
    ]
    return {**sample, "segments": segments}


def open_image(image: Any) -> PIL.Image.Image:
    """Decode an image value as the schema stores it (PIL image, path, bytes, or ``{"bytes", "path"}``).

    The whole image is decoded, so a truncated file fails here rather than in the middle of training."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise BadRecordError(MISSING_IMAGE, f"no image file at {os.fspath(image)!r}")
        source = image
    elif isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    else:
        raise BadRecordError(
            WRONG_TYPE, f"an image must be a PIL image, a path or bytes, got {type(image).__name__}"
        )
    try:
        decoded = PIL.Image.open(source)
        decoded.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise BadRecordError(UNREADABLE_IMAGE, f"{type(error).__name__}: {error}") from None
    return decoded


def validate_sample(sample: dict[str, Any], decode_images: bool = True) -> None:
    """Raise ``BadRecordError`` (with the segment index) when ``sample`` does not follow the schema.

    A sample needs at least one segment; a text segment needs non-empty text; an image segment needs
    pixels that decode (checked when ``decode_images``) or token ids that fill their ``image_grid``."""
    segments = sample.get("segments")
    if not isinstance(segments, list) or not segments:
        raise BadRecordError(MISSING_FIELD, "a sample needs a non-empty list of 'segments'")
    for index, segment in enumerate(segments):
        try:
            _validate_segment(segment, decode_images)
        except BadRecordError as error:
            raise BadRecordError(error.reason, f"segment {index}: {error.detail}") from None


def _validate_segment(segment: Any, decode_images: bool) -> None:
    if not isinstance(segment, dict):
        raise BadRecordError(WRONG_TYPE, f"a segment must be a dict, got {type(segment).__name__}")
    if segment.get("type") not in SEGMENT_TYPES:
        raise BadRecordError(
            WRONG_TYPE, f"'type' must be one of {SEGMENT_TYPES}, got {segment.get('type')!r}"
        )
    if (segment.get("role") or "") not in ROLES:
        raise BadRecordError(WRONG_TYPE, f"'role' must be one of {ROLES}, got {segment.get('role')!r}")
    if segment["type"] == TEXT:
        _validate_text(segment.get("text"))
    else:
        _validate_image(segment, decode_images)


def _validate_text(text: Any) -> None:
    if text is None:
        raise BadRecordError(MISSING_FIELD, "a text segment needs 'text'")
    if not isinstance(text, str):
        raise BadRecordError(WRONG_TYPE, f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadRecordError(EMPTY_TEXT, "'text' is empty")


def _validate_image(segment: dict[str, Any], decode_images: bool) -> None:
    token_ids, grid = segment.get("image_token_ids"), segment.get("image_grid")
    if token_ids is not None:
        if grid is None or len(grid) != 2 or grid[0] * grid[1] != len(token_ids):
            raise BadRecordError(
                WRONG_TYPE, f"{len(token_ids)} 'image_token_ids' do not fill an 'image_grid' of {grid}"
            )
        return
    if segment.get("image") is None:
        raise BadRecordError(MISSING_IMAGE, "an image segment needs 'image' or 'image_token_ids'")
    if decode_images:
        open_image(segment["image"])
