"""Chat input for the pipeline: questions and conversations normalised to a batch, every image opened.

Images come as PIL images, paths or bytes, inside the messages (``{"type": "image", "path": ...}``, or
``"image"`` / ``"url"``) or next to them; a path that does not exist or a file that does not decode fails
here with one line.
"""

from __future__ import annotations

import os
from typing import Any

import PIL.Image

from unimm.data.schema import ImageTooLargeError, open_image


def conversations_with_images(messages: Any, images: Any) -> list[list[dict]]:
    """Normalise ``messages`` to a batch of conversations with every image opened as a PIL image."""
    is_list = isinstance(messages, (list, tuple)) and len(messages) > 0
    if isinstance(messages, str):
        conversations, batched = [[_user(messages)]], False
    elif is_list and all(isinstance(message, dict) for message in messages):
        conversations, batched = [list(messages)], False
    elif is_list and all(isinstance(entry, (str, list, tuple)) for entry in messages):
        conversations = [[_user(entry)] if isinstance(entry, str) else list(entry) for entry in messages]
        batched = True
    else:
        raise ValueError(
            "messages must be a question, a list of chat messages ({'role': ..., 'content': ...}), or a "
            "list of questions or conversations (a batch)"
        )
    if not batched:
        per_conversation = [images]
    elif images is None:
        per_conversation = [None] * len(conversations)
    elif isinstance(images, (list, tuple)) and len(images) == len(conversations):
        per_conversation = list(images)
    else:
        raise ValueError(
            f"images must hold one entry (an image, a list or None) per conversation ({len(conversations)})"
        )
    return [
        _with_images(conversation, conversation_images, index)
        for index, (conversation, conversation_images) in enumerate(zip(conversations, per_conversation))
    ]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def open_image_argument(image: Any, argument: str, max_pixels: int | None = None) -> PIL.Image.Image:
    """Open an image (at most ``max_pixels``, default ``unimm.data.max_image_pixels()``) with a one-line
    error that says what to pass instead."""
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
        raise FileNotFoundError(
            f"{argument}: no image file at {os.fspath(image)!r}; pass the path of an existing image"
        )
    try:
        return open_image(image, max_pixels=max_pixels)
    except ImageTooLargeError as error:
        raise ImageTooLargeError(f"{argument}: {error.detail}") from None
    except ValueError as error:  # unimm.data's BadRecordError: unreadable or of the wrong type
        raise ValueError(
            f"{argument}: cannot read the image ({error}); pass a PNG/JPEG file, bytes or a PIL image"
        ) from None


def _with_images(conversation: list[dict], images: Any, index: int) -> list[dict]:
    """A copy of ``conversation`` whose image parts hold opened images; ``images`` fill the empty image
    placeholders in order, or are put before the text of the last user turn when there are none."""
    given = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    opened = [open_image_argument(image, f"images[{index}][{number}]") for number, image in enumerate(given)]
    copied = []
    placeholders: list[dict] = []
    for turn, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(
                f"messages: conversation {index}, turn {turn} must be a dict with 'role' and 'content'"
            )
        content = message.get("content", "")
        if isinstance(content, list):
            content = [dict(part) for part in content]
            for part in content:
                if part.get("type") != "image":
                    continue
                source = part.pop("path", None) or part.pop("url", None) or part.get("image")
                if source is None:
                    placeholders.append(part)
                else:
                    part["image"] = open_image_argument(
                        source, f"messages: conversation {index}, turn {turn} image"
                    )
        copied.append({**message, "content": content})
    if placeholders:
        if len(placeholders) != len(opened):
            raise ValueError(
                f"conversation {index} has {len(placeholders)} image placeholders but {len(opened)} images "
                "were given"
            )
        for part, image in zip(placeholders, opened):
            part["image"] = image
    elif opened:
        users = [turn for turn, message in enumerate(copied) if message["role"] == "user"]
        if not users:
            raise ValueError(f"conversation {index} has no user turn to attach its images to")
        last = copied[users[-1]]
        text = (
            [{"type": "text", "text": last["content"]}]
            if isinstance(last["content"], str)
            else last["content"]
        )
        last["content"] = [*({"type": "image", "image": image} for image in opened), *text]
    return copied
