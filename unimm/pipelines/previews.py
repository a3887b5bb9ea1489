"""Previews of images while the language model writes their codes: :class:`ImagePreviewStreamer`.

``UniMMPipeline.generate_images(..., streamer=ImagePreviewStreamer(preview_every=2))`` hands out, for every
image of the call, a partial image every 2 code rows: the rows written so far decoded by the visual
tokenizer's fast pixel decoder, pasted at the top of a mid-grey canvas of the final size (the rows still to
come are grey). The final images do not change: previews read the codes, they do not draw from any random
generator.

How it works: the generation engine feeds a :class:`~unimm.llm.streamers.BatchStreamer` every token of every
row (transformers' streamer hook, which also streams text). :class:`ImageRowPreviews` only counts those
tokens, which costs the decode loop nothing, until an image has written the rows of its next preview; then it
reads the codes (one host sync), decodes the partial grids of all the images due at that step in one pixel
decoder call per shape, and puts the previews into the :class:`ImagePreviewStreamer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from queue import Queue

import PIL.Image
import torch
from transformers.generation.streamers import BaseStreamer

from unimm.llm.streamers import BatchStreamer
from unimm.llm.vocabulary import ImageVocabulary

__all__ = ["ImagePreview", "ImagePreviewStreamer", "ImageRowPreviews"]

# The colour of the rows not written yet: mid grey reads as "not there yet" on light and dark pages alike.
PREVIEW_FILL = (128, 128, 128)


@dataclass
class ImagePreview:
    """One partial image of a ``generate_images`` call.

    Attributes:
        index: the image's position in the call's ``images`` (prompt-major).
        prompt_index: the prompt it belongs to.
        partial_image_index: 0 for the image's first preview, 1 for its second, ...
        rows: the code rows written so far, of ``height`` (``rows < height``).
        height: the image's code rows in all.
        image: the image at its final size: the ``rows`` decoded by the pixel decoder at the top, the rest
            filled with ``PREVIEW_FILL`` grey.
        image_token_ids: ``(rows, w)`` the codes written so far.
    """

    index: int
    prompt_index: int
    partial_image_index: int
    rows: int
    height: int
    image: PIL.Image.Image
    image_token_ids: torch.LongTensor


class ImagePreviewStreamer(BaseStreamer):
    """Partial images of :meth:`UniMMPipeline.generate_images` as the rows of their codes are written.

    Give exactly one of ``preview_every`` and ``partial_images``; each takes one value for every prompt or a
    list with one value per prompt (checked against the prompts by ``generate_images``). An image gets no
    preview of its complete grid: the finished image is the call's output (and may come from the diffusion
    decoder).

    Args:
        preview_every: a preview of each image after every ``preview_every`` code rows.
        partial_images: or this many previews of each image (OpenAI's ``partial_images``), after evenly
            spaced rows; an image of fewer rows than ``partial_images + 1`` gets one per row before its last.
        callback: called with each :class:`ImagePreview`, in the thread that generates. Without one, the
            previews queue up for iteration: run ``generate_images`` in another thread and ``for preview in
            streamer`` here (as with transformers' ``TextIteratorStreamer``); the iteration ends when the call
            ends, however it ends.
        timeout: seconds the iteration waits for the next preview before ``queue.Empty`` (``None``: forever).
    """

    def __init__(
        self,
        preview_every: int | Sequence[int] | None = None,
        partial_images: int | Sequence[int] | None = None,
        callback: Callable[[ImagePreview], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        if (preview_every is None) == (partial_images is None):
            raise ValueError("ImagePreviewStreamer takes one of `preview_every` and `partial_images`")
        name, value, low = (
            ("preview_every", preview_every, 1)
            if partial_images is None
            else ("partial_images", partial_images, 0)
        )
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for index, item in enumerate(values):
            if not isinstance(item, int) or isinstance(item, bool) or item < low:
                where = f"{name}[{index}]" if isinstance(value, (list, tuple)) else name
                raise ValueError(f"`{where}` must be an int >= {low}, got {item!r}")
        self.setting, self.value = name, value
        self.callback = callback
        self.timeout = timeout
        self.queue: Queue = Queue()
        self.stop_signal = None

    def per_prompt(self, count: int) -> list[int]:
        """The setting's value for each of ``count`` prompts; a list of another length is a ``ValueError``."""
        if not isinstance(self.value, (list, tuple)):
            return [self.value] * count
        if len(self.value) != count:
            raise ValueError(
                f"the streamer's `{self.setting}` has {len(self.value)} entries but there are {count} prompts."
            )
        return list(self.value)

    def preview_rows(self, value: int, height: int) -> list[int]:
        """The rows written at each preview of an image of ``height`` code rows under the setting ``value``."""
        if self.setting == "preview_every":
            return list(range(value, height, value))
        if height < 2:
            return []
        # Evenly spaced, rounded half up; at least 1 row, never the complete grid.
        spaced = (math.floor(k * height / (value + 1) + 0.5) for k in range(1, value + 1))
        return sorted({min(height - 1, max(1, rows)) for rows in spaced})

    def put(self, value: ImagePreview) -> None:
        """Hand out one preview: to the callback, else to the iteration."""
        if self.callback is not None:
            self.callback(value)
        else:
            self.queue.put(value, timeout=self.timeout)

    def end(self) -> None:
        """The call is over: the iteration stops."""
        self.queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> Iterator[ImagePreview]:
        return self

    def __next__(self) -> ImagePreview:
        value = self.queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value


@dataclass
class _Due:
    """A preview to make once the rows have written ``tokens`` tokens."""

    tokens: int
    row: int
    rows: int
    partial_image_index: int


class ImageRowPreviews(BatchStreamer):
    """The engine's side of the previews of one image-mode ``generate_multimodal`` call: counts the tokens
    every row writes, and makes each image's previews once it has written their rows.

    Args:
        streamer: where the previews go.
        vocabulary: the language model's image vocabulary.
        images: per engine row (request-major): ``(index, prompt_index, (h, w) grid)`` of its image.
        preview_rows: per engine row, the rows written at each of its previews.
        decode: code grids to images (the pixel decoder; grids of several shapes in one call).
    """

    def __init__(
        self,
        streamer: ImagePreviewStreamer,
        vocabulary: ImageVocabulary,
        images: list[tuple[int, int, tuple[int, int]]],
        preview_rows: list[list[int]],
        decode: Callable[[list[torch.Tensor]], list[PIL.Image.Image]],
    ) -> None:
        self.streamer, self.vocabulary, self.images, self.decode = streamer, vocabulary, images, decode
        # An image-mode row writes `<|boi|> <|h|> <|w|>` then `w` codes and `<|eol|>` per row: `rows` rows are
        # written once the row has as many tokens as an image of `rows` rows has before its `<|eoi|>`.
        self.due = sorted(
            (
                _Due(vocabulary.image_sequence_length(rows, grid[1]) - 1, row, rows, partial)
                for row, ((_, _, grid), row_previews) in enumerate(zip(images, preview_rows))
                for partial, rows in enumerate(row_previews)
            ),
            key=lambda due: (due.tokens, due.row),
        )
        self.blocks: list[torch.Tensor] = []
        self.written = 0

    def put(self, value: torch.Tensor) -> None:
        self.blocks.append(value)
        self.written += value.shape[1]  # no host sync: the shape is known
        if not self.due or self.due[0].tokens > self.written:
            return
        ready = [due for due in self.due if due.tokens <= self.written]
        self.due = self.due[len(ready) :]
        tokens = torch.cat(self.blocks, dim=1)  # (N, written)
        self.blocks = [tokens]
        rows = tokens[[due.row for due in ready]].cpu()  # (D, written): the one host sync of this step
        grids = []
        for due, row_tokens in zip(ready, rows):
            width = self.images[due.row][2][1]
            codes = row_tokens[self.vocabulary.is_code_token(row_tokens)][: due.rows * width]
            grids.append(self.vocabulary.token_ids_to_codes(codes).view(due.rows, width))  # (rows, w)
        for due, grid, partial in zip(ready, grids, self.decode(grids)):
            index, prompt_index, (height, _) = self.images[due.row]
            canvas = PIL.Image.new("RGB", (partial.width, partial.height * height // due.rows), PREVIEW_FILL)
            canvas.paste(partial.convert("RGB"), (0, 0))
            preview = ImagePreview(
                index=index,
                prompt_index=prompt_index,
                partial_image_index=due.partial_image_index,
                rows=due.rows,
                height=height,
                image=canvas,
                image_token_ids=grid,
            )
            self.streamer.put(preview)

    def end(self) -> None:
        # The pipeline ends its ImagePreviewStreamer once, after all of its engine calls and the final decode.
        self.blocks = []
