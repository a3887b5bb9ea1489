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
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps

from unimm.data.bad_records import (
    EMPTY_TEXT,
    IMAGE_TOO_LARGE,
    MISSING_FIELD,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    WRONG_TYPE,
    BadRecordError,
)

if TYPE_CHECKING:
    import datasets

TEXT = "text"
IMAGE = "image"
SEGMENT_TYPES = (TEXT, IMAGE)
ROLES = ("", "system", "user", "assistant")

# 50 Mpx: an 8K frame (33 Mpx) or a 48 Mpx phone photo passes; Pillow's own guard is 179 Mpx.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_PIXELS_ENV = "UNIMM_MAX_IMAGE_PIXELS"
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
UINT16_MAX = 65535

# Every segment has every field (unused ones None); see sample_features for their types.
SEGMENT_FIELDS = ("type", "role", "text", "image", "image_token_ids", "image_grid")


def segment_features() -> dict[str, Any]:
    """The ``datasets`` type of each segment field."""
    import datasets  # here, not at import: the schema's helpers are used where ``datasets`` is not needed

    return {
        "type": datasets.Value("string"),
        "role": datasets.Value("string"),
        "text": datasets.Value("string"),
        "image": datasets.Image(),
        "image_token_ids": datasets.Sequence(datasets.Value("int32")),
        "image_grid": datasets.Sequence(datasets.Value("int32"), length=2),
    }


def sample_features(**extra_columns: datasets.features.FeatureType) -> datasets.Features:
    """``Features`` of the sample schema, plus dataset-specific metadata columns (labels, names)."""
    import datasets

    return datasets.Features({"segments": [segment_features()], **extra_columns})


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


class ImageTooLargeError(BadRecordError):
    """An image with more pixels than allowed (``max_image_pixels()`` or a caller's own limit)."""

    def __init__(self, detail: str, location: str = "") -> None:
        super().__init__(IMAGE_TOO_LARGE, detail, location)

    def at(self, location: str) -> ImageTooLargeError:
        return ImageTooLargeError(self.detail, location)


def max_image_pixels() -> int:
    """The most pixels (width × height) an image may have: ``$UNIMM_MAX_IMAGE_PIXELS``, else
    ``DEFAULT_MAX_IMAGE_PIXELS``. Checked from the file's header, before any pixel is decoded."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"${MAX_IMAGE_PIXELS_ENV} must be a whole number of pixels, got {value!r}") from None
    if limit <= 0:
        raise ValueError(f"${MAX_IMAGE_PIXELS_ENV} must be positive, got {limit}")
    return limit


def check_image_pixels(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise ``ImageTooLargeError`` when ``width × height`` exceeds the limit."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if width * height > limit:
        # The environment variable is the way out only where the library's own limit applies.
        hint = f" (set ${MAX_IMAGE_PIXELS_ENV} to allow more)" if max_pixels is None else ""
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of {limit}{hint}"
        )


def open_image(image: Any, max_pixels: int | None = None) -> PIL.Image.Image:
    """Decode an image value as the schema stores it (PIL image, path, bytes, or ``{"bytes", "path"}``).

    The size is checked against ``max_pixels`` (default ``max_image_pixels()``) from the header, before
    decoding, so a decompression bomb costs nothing. The whole image is then decoded, so a truncated file
    fails here rather than in the middle of training; the EXIF orientation is applied (a phone photo is
    seen upright) and high-bit-depth greyscale is scaled to 8 bits (see ``to_8_bit``)."""
    if isinstance(image, PIL.Image.Image):
        check_image_pixels(*image.size, max_pixels)
        return _upright_8_bit(image)
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
        decoded = PIL.Image.open(source)  # reads the header only
    except PIL.Image.DecompressionBombError as error:  # past Pillow's own limit, refused at open
        pillow_size = str(error).partition(", could be")[
            0
        ]  # "Image size (N pixels) exceeds limit of M pixels"
        limit = max_image_pixels() if max_pixels is None else max_pixels
        raise ImageTooLargeError(
            f"{pillow_size} (Pillow's guard); the limit here is {limit} pixels"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRecordError(UNREADABLE_IMAGE, f"{type(error).__name__}: {error}") from None
    check_image_pixels(*decoded.size, max_pixels)
    try:
        decoded.load()
        return _upright_8_bit(decoded)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise BadRecordError(UNREADABLE_IMAGE, f"{type(error).__name__}: {error}") from None


def to_8_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit ``L``; other modes unchanged.

    Pillow's own conversion clips these modes at 255, which turns a 16-bit scan almost white. Integer
    images whose values fit 16 bits are scaled by 255/65535 (the full 16-bit range maps to the full 8-bit
    range); float images in [0, 1] by 255; anything else by its own minimum and maximum."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and low >= 0.0 and high <= UINT16_MAX:
        scaled = values * (255.0 / UINT16_MAX)
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return PIL.Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8), mode="L")


def _upright_8_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    # exif_transpose copies even an upright image; look at the tag first.
    if image.getexif().get(PIL.ExifTags.Base.Orientation, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    return to_8_bit(image)


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
