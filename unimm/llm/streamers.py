"""Streamers of the decode loop beyond transformers' one-row text streamers.

``generate_multimodal(streamer=...)`` takes transformers streamers (``put`` the new tokens, ``end``): a text
streamer (``TextStreamer``, ``TextIteratorStreamer``) follows one row's text, as it does in
``transformers``' ``generate``. A :class:`BatchStreamer` follows every row of the call, image tokens
included, which is what previews of images need (``unimm.pipelines.ImagePreviewStreamer``).
"""

from __future__ import annotations

import torch
from transformers.generation.streamers import BaseStreamer

__all__ = ["BatchStreamer"]


class BatchStreamer(BaseStreamer):
    """A streamer of every row of one ``generate_multimodal`` call, as transformers' ``generate`` feeds a
    streamer the whole batch's new tokens.

    ``put(tokens)`` receives ``(N, T)`` token ids: what the N conditional rows (request-major, as in the
    output) wrote at the next T steps, text and image tokens alike, forced ones included (a row that is done
    writes the pad id). Each written token is put exactly once, in order: the tokens written before the first
    forward (an image request's ``<|boi|> <|h|> <|w|>``) come first. The tensors are views on the logits'
    device, not synchronised with the host: a streamer that only counts (``tokens.shape[1]``) costs the loop
    nothing, one that reads values waits for the step. ``end()`` is called once, after the last ``put``
    (not when the call fails). The prompt is not put (unlike transformers, which puts it first)."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass
