"""The one sample schema shared by pairs, interleaved documents and chat.

A sample is a list of segments; each segment is text or an image, with an optional role (``user`` /
``assistant`` / ``system`` for chat, empty otherwise). An image segment holds pixels (a PIL image, as
stored by ``datasets.Image``) or pre-computed visual-token ids (a ``(h, w)`` grid, flattened row-major
with its ``image_grid`` shape).

In Arrow every segment has every field, unused ones ``None``, so one ``datasets.Features`` describes
all samples and datasets of different kinds can be concatenated or mixed.
"""

from __future__ import annotations

from typing import Any

import datasets

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
    return {"type": TEXT, "role": role, "text": text, "image": None, "image_token_ids": None, "image_grid": None}


def image_segment(image: Any, role: str = "") -> dict[str, Any]:
    """An image segment from pixels (PIL image, numpy array, path or bytes, as ``datasets.Image`` takes)."""
    return {"type": IMAGE, "role": role, "text": None, "image": image, "image_token_ids": None, "image_grid": None}
