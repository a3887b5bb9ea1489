"""Sample templates: the chats that teach a unified model its skills, built from rows of the sample schema.

``unimm prepare`` turns each dataset row into the sequences it teaches, by the row's layout (``row_kind``):
an image-caption pair becomes a generation chat (caption → image) and an understanding chat (image +
question → answer); a conversation and an interleaved document are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from unimm.data.schema import IMAGE, TEXT

# Questions an understanding chat asks about its image, one drawn per row.
DEFAULT_QUESTIONS = (
    "What is this?",
    "What is in the picture?",
    "What do you see?",
    "What is shown in this image?",
    "Describe the image.",
    "Name the object in this picture.",
)
# Row layouts (row_kind).
PAIR, CONVERSATION, DOCUMENT = "pair", "conversation", "document"


def generation_sample(prompt: str, image: Mapping[str, Any] | None = None) -> dict:
    """A chat that asks for an image (``prompt``) and is answered by it; ``image`` holds the image
    segment's fields (``image_token_ids`` and ``image_grid``, or pixels)."""
    return {
        "segments": [
            {"type": TEXT, "role": "user", "text": prompt},
            {"type": IMAGE, "role": "assistant", **(image or {})},
        ]
    }


def understanding_sample(question: str, answer: str, image: Mapping[str, Any] | None = None) -> dict:
    """A chat that shows an image, asks ``question`` about it and is answered by ``answer``."""
    return {
        "segments": [
            {"type": IMAGE, "role": "user", **(image or {})},
            {"type": TEXT, "role": "user", "text": question},
            {"type": TEXT, "role": "assistant", "text": answer},
        ]
    }


def row_kind(segments: Sequence[Mapping[str, Any]]) -> str:
    """A row's layout: a conversation (any segment has a role), an image-caption pair (one image and one
    text), else a document (interleaved, or an image or a text alone)."""
    if any(segment.get("role") for segment in segments):
        return CONVERSATION
    if sorted(segment["type"] for segment in segments) == [IMAGE, TEXT]:
        return PAIR
    return DOCUMENT
