"""``UniMMProcessor``: samples or chat messages with images to ``input_ids`` / ``attention_mask`` / ``labels``.

A sample follows ``unimm.data.schema`` (segments of text or image, each with an optional role). Chat
samples (segments with roles) are rendered with the text tokenizer's chat template, an image placeholder
standing where each image goes; plain samples (captions, interleaved documents) are the segments in order
between BOS and EOS. Each placeholder becomes the image's token sequence from
:class:`~unimm.llm.vocabulary.ImageVocabulary`. Images are pixels (PIL image, path, bytes: encoded by the
visual tokenizer) or pre-computed ids with their grid.

Pixels and placeholders are separate steps, so that whoever holds the visual tokenizer runs it once per batch::

    pixel_values = processor.batch_pixel_values(messages=conversations)   # (C, H, W) per pixel image
    grids = encode_by_size(visual_tokenizer, pixel_values)                # one call per image size
    batch = processor(messages=conversations, image_grids=grids)          # placeholders -> image tokens

``processor(messages)`` alone does the same with the ``vq_model`` it was given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

from unimm.data.schema import IMAGE, TEXT, drop_text, open_image

from .vocabulary import ImageVocabulary

IGNORE_INDEX = -100
LOSS_ON = ("assistant", "all")


class UniMMProcessor(ProcessorMixin):
    r"""Text tokenizer + image processor (+ the visual tokenizer model, attached at run time).

    Args:
        image_processor: a ``DualCodebookImageProcessor`` (used for pixel images).
        tokenizer: the text tokenizer; its chat template renders chat samples.
        chat_template: overrides the tokenizer's chat template.
        text_vocab_size, codebook_size, max_grid_height, max_grid_width: the image vocabulary, as in
            :class:`~unimm.llm.UniMMConfig` (:meth:`from_config` copies them).
        image_placeholder: the string standing for an image while the chat template renders.
        vq_model: the visual tokenizer (``DualCodebookTokenizer``) that encodes pixel images; not saved with
            the processor (it is a model, saved in its own folder), pass it again after loading.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template: str | None = None,
        text_vocab_size: int | None = None,
        codebook_size: int | None = None,
        max_grid_height: int = 32,
        max_grid_width: int = 32,
        image_placeholder: str = "<|image|>",
        vq_model: torch.nn.Module | None = None,
        **kwargs,
    ):
        if text_vocab_size is None or codebook_size is None:
            raise ValueError(
                "UniMMProcessor: `text_vocab_size` and `codebook_size` are required (see from_config)."
            )
        if len(tokenizer) > text_vocab_size:
            raise ValueError(
                f"UniMMProcessor: the tokenizer has {len(tokenizer)} tokens but `text_vocab_size` is "
                f"{text_vocab_size}; text ids would collide with image tokens."
            )
        self.text_vocab_size = text_vocab_size
        self.codebook_size = codebook_size
        self.max_grid_height = max_grid_height
        self.max_grid_width = max_grid_width
        self.image_placeholder = image_placeholder
        self.vocabulary = ImageVocabulary(text_vocab_size, codebook_size, max_grid_height, max_grid_width)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.vq_model = vq_model

    @classmethod
    def from_config(cls, config, tokenizer, image_processor, vq_model=None, **kwargs) -> UniMMProcessor:
        """The processor matching a :class:`~unimm.llm.UniMMConfig`."""
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            text_vocab_size=config.text_vocab_size,
            codebook_size=config.codebook_size,
            max_grid_height=config.max_grid_height,
            max_grid_width=config.max_grid_width,
            vq_model=vq_model,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        # The visual tokenizer and the derived vocabulary are not processor settings: keep them out of
        # processor_config.json (and out of ProcessorMixin's deepcopy).
        held = {name: self.__dict__.pop(name) for name in ("vq_model", "vocabulary") if name in self.__dict__}
        try:
            return super().to_dict()
        finally:
            self.__dict__.update(held)

    # ------------------------------------------------------------------ samples -> ids
    def __call__(
        self,
        samples: dict | Sequence[dict] | None = None,
        messages: Sequence[dict] | Sequence[Sequence[dict]] | None = None,
        add_generation_prompt: bool = False,
        loss_on: str = "assistant",
        loss_on_text: bool = True,
        loss_on_images: bool = True,
        padding_side: str = "right",
        return_unconditional: bool = False,
        image_grids: Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize a batch of samples (or chat conversations) into padded tensors.

        Args:
            samples: one sample or a list, in the schema of ``unimm.data.schema``.
            messages: instead of samples: one conversation or a list, as transformers chat messages
                (``content`` a string or a list of ``{"type": "text"|"image", ...}`` parts).
            add_generation_prompt: end chat samples with the assistant header (for generation).
            loss_on: ``"assistant"`` (chat: loss only on assistant turns) or ``"all"``.
            loss_on_text, loss_on_images: keep the loss on text / image tokens.
            padding_side: ``"right"`` for training, ``"left"`` for batched generation.
            return_unconditional: also return ``unconditional_input_ids`` / ``unconditional_attention_mask``,
                the same samples with their text dropped (``drop_text``), for classifier-free guidance.
            image_grids: the ``(h, w)`` code grids of the batch's pixel images, in the order of
                :meth:`batch_pixel_values`, encoded by the caller. Without them the processor encodes the
                pixel images with its ``vq_model``, one call per image size.

        Returns ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss), ``(B, T)``."""
        if kwargs:
            raise ValueError(f"UniMMProcessor: unexpected arguments {sorted(kwargs)}.")
        if padding_side not in ("right", "left"):
            raise ValueError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}.")
        batch = self._as_samples(samples, messages)
        pixel_images = [segment["image"] for segment in _pixel_segments(batch)]
        if image_grids is None and pixel_images and self.vq_model is not None:
            image_grids = self.encode_images(pixel_images)
        if image_grids is not None:
            batch = self._with_image_grids(batch, image_grids, len(pixel_images))
        options = dict(
            add_generation_prompt=add_generation_prompt, loss_on=loss_on, loss_on_text=loss_on_text,
            loss_on_images=loss_on_images,
        )  # fmt: skip
        examples = [self.tokenize_sample(sample, **options) for sample in batch]
        output = self._pad(examples, padding_side)
        if return_unconditional:
            unconditional = [self.tokenize_sample(drop_text(sample), **options) for sample in batch]
            padded = self._pad(unconditional, padding_side)
            output["unconditional_input_ids"] = padded["input_ids"]
            output["unconditional_attention_mask"] = padded["attention_mask"]
        return BatchFeature(output)

    def tokenize_sample(
        self,
        sample: dict,
        add_generation_prompt: bool = False,
        loss_on: str = "assistant",
        loss_on_text: bool = True,
        loss_on_images: bool = True,
    ) -> dict[str, list[int]]:
        """One sample to unpadded ``{"input_ids": [...], "labels": [...]}`` (for ``datasets.map``)."""
        if loss_on not in LOSS_ON:
            raise ValueError(f"`loss_on` must be one of {LOSS_ON}, got {loss_on!r}.")
        segments = sample.get("segments") if isinstance(sample, dict) else None
        if not segments:
            raise ValueError("`samples`: every sample needs a non-empty 'segments' list.")
        for index, segment in enumerate(segments):
            if segment.get("type") == TEXT:
                _check_text(segment.get("text"), f"segment {index}")
        if any(segment.get("role") for segment in segments):
            pieces = self._chat_pieces(segments, add_generation_prompt, loss_on)
        else:
            pieces = self._plain_pieces(segments)
        input_ids: list[int] = []
        labels: list[int] = []
        for piece, trained in pieces:
            if isinstance(piece, str):
                ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                keep = trained and loss_on_text
            else:
                ids = self._image_token_ids(piece)
                keep = trained and loss_on_images
            input_ids.extend(ids)
            labels.extend(ids if keep else [IGNORE_INDEX] * len(ids))
        return {"input_ids": input_ids, "labels": labels}

    def batch_pixel_values(
        self, samples: dict | Sequence[dict] | None = None, messages: Sequence | None = None
    ) -> list[torch.Tensor]:
        """The normalised pixels ``(C, H, W)`` of every image of a batch that the visual tokenizer must encode
        (images given as ids are not), in the order :meth:`__call__` takes their ``image_grids``."""
        return self.pixel_values(
            [segment["image"] for segment in _pixel_segments(self._as_samples(samples, messages))]
        )

    def pixel_values(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Images (PIL, paths, bytes) to normalised float32 pixels ``(C, H, W)``, one tensor each (sizes may
        differ when the image processor keeps aspect ratios)."""
        if not images:
            return []
        # One image processor call for the batch (a call per image cost as much as the visual tokenizer's
        # encoding of it); without return_tensors it keeps each image's own size.
        processed = self.image_processor([open_image(image) for image in images])["pixel_values"]
        return [torch.from_numpy(pixels) for pixels in processed]  # (C, H, W) each

    def _with_image_grids(
        self, batch: list[dict], grids: Sequence[torch.Tensor], expected: int
    ) -> list[dict]:
        """Copies of the samples whose pixel images carry their code grids (the inputs are left as they are)."""
        if len(grids) != expected:
            raise ValueError(
                f"`image_grids` holds {len(grids)} grids but the batch has {expected} pixel images."
            )
        grids = iter(grids)

        def filled(segment: dict) -> dict:
            grid = torch.as_tensor(next(grids))  # (h, w)
            return {**segment, "image_token_ids": grid, "image_grid": tuple(grid.shape)}

        return [
            {**sample, "segments": [filled(s) if _needs_encoding(s) else s for s in _segments(sample)]}
            if _segments(sample)
            else sample  # tokenize_sample says what is wrong with it
            for sample in batch
        ]

    def _as_samples(self, samples, messages) -> list[dict]:
        if (samples is None) == (messages is None):
            raise ValueError("UniMMProcessor: pass exactly one of `samples` and `messages`.")
        if samples is not None:
            return [samples] if isinstance(samples, dict) else list(samples)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return [self.messages_to_sample(conversation) for conversation in conversations]

    @staticmethod
    def messages_to_sample(messages: Sequence[dict]) -> dict:
        """transformers chat messages to a schema sample (one segment per text or image part)."""
        segments = []
        for index, message in enumerate(messages):
            role = message.get("role")
            if not role:
                raise ValueError(f"`messages[{index}]` has no 'role'.")
            content = message.get("content", "")
            parts = [{"type": TEXT, "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part.get("type") == TEXT:
                    segments.append({"type": TEXT, "role": role, "text": part.get("text", "")})
                elif part.get("type") == IMAGE:
                    segments.append(
                        {
                            "type": IMAGE,
                            "role": role,
                            "image": part.get("image", part.get("path", part.get("url"))),
                            "image_token_ids": part.get("image_token_ids"),
                            "image_grid": part.get("image_grid"),
                        }
                    )
                else:
                    raise ValueError(
                        f"`messages[{index}]`: content type {part.get('type')!r} is not 'text' or 'image'."
                    )
        return {"segments": segments}

    def _plain_pieces(self, segments: Sequence[dict]) -> list[tuple[Any, bool]]:
        """Captions and interleaved documents: BOS, the segments in order, EOS; all trained."""
        tokenizer = self.tokenizer
        pieces: list[tuple[Any, bool]] = []
        if tokenizer.bos_token:
            pieces.append((tokenizer.bos_token, False))
        for segment in segments:
            pieces.append((segment.get("text") or "", True) if segment["type"] == TEXT else (segment, True))
        if tokenizer.eos_token:
            pieces.append((tokenizer.eos_token, True))
        return pieces

    def _chat_pieces(
        self, segments: Sequence[dict], add_generation_prompt: bool, loss_on: str
    ) -> list[tuple[Any, bool]]:
        """Chat: render the template turn by turn, so each turn's text is known to be its own; an
        assistant turn's header is prompt, its content (and end-of-turn marks) the target."""
        turns: list[tuple[str, list[dict]]] = []
        for segment in segments:
            role = segment.get("role") or "user"
            if turns and turns[-1][0] == role:
                turns[-1][1].append(segment)
            else:
                turns.append((role, [segment]))
        messages, images = [], []
        for role, turn in turns:
            content = "".join(
                s.get("text") or "" if s["type"] == TEXT else self.image_placeholder for s in turn
            )
            messages.append({"role": role, "content": content})
            images.append([s for s in turn if s["type"] == IMAGE])

        pieces: list[tuple[Any, bool]] = []
        rendered = ""
        for index, (role, _) in enumerate(turns):
            trained = loss_on == "all" or role == "assistant"
            if role == "assistant":
                header = self._render(messages[:index], add_generation_prompt=True)
                pieces.append((self._suffix(rendered, header), loss_on == "all"))
                rendered = header
            text = self._render(messages[: index + 1], add_generation_prompt=False)
            pieces.extend(self._split_images(self._suffix(rendered, text), images[index], trained))
            rendered = text
        if add_generation_prompt:
            pieces.append((self._suffix(rendered, self._render(messages, add_generation_prompt=True)), False))
        return pieces

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self.chat_template,
        )

    @staticmethod
    def _suffix(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise ValueError(
                "the chat template is not prefix-stable (rendering more turns changed earlier text), so turns "
                "cannot be told apart for the loss mask."
            )
        return text[len(prefix) :]

    def _split_images(self, text: str, images: list[dict], trained: bool) -> list[tuple[Any, bool]]:
        parts = text.split(self.image_placeholder)
        if len(parts) != len(images) + 1:
            raise ValueError(
                f"the text of a turn contains the image placeholder {self.image_placeholder!r}; "
                "choose another `image_placeholder`."
            )
        pieces: list[tuple[Any, bool]] = [(parts[0], trained)]
        for image, part in zip(images, parts[1:]):
            pieces.extend([(image, trained), (part, trained)])
        return pieces

    def _image_token_ids(self, segment: dict) -> list[int]:
        """An image segment's token sequence: from its pre-computed ids, or by encoding its pixels."""
        if segment.get("image_token_ids") is not None:
            grid = segment.get("image_grid")
            if grid is None or len(grid) != 2:
                raise ValueError(
                    "an image segment with `image_token_ids` needs its `image_grid` (height, width)."
                )
            codes = torch.as_tensor(segment["image_token_ids"], dtype=torch.long)
            if codes.numel() != grid[0] * grid[1]:
                raise ValueError(
                    f"`image_token_ids` has {codes.numel()} ids but `image_grid` {tuple(grid)} needs {grid[0] * grid[1]}."
                )
            return self.vocabulary.image_to_token_ids(codes.view(grid[0], grid[1])).tolist()
        if segment.get("image") is None:
            raise ValueError("an image segment needs `image` (pixels) or `image_token_ids`.")
        if self.vq_model is None:
            raise ValueError(
                "pixel images need the visual tokenizer: pass `vq_model` (a DualCodebookTokenizer) to the "
                "processor, or give `image_token_ids`."
            )
        return self.vocabulary.image_to_token_ids(self.encode_images([segment["image"]])[0]).tolist()

    def encode_images(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Images (PIL, paths, bytes) to their ``(h, w)`` code grids with ``vq_model``: one call per image
        size (see :func:`encode_by_size`), the grids in the order of the images."""
        return encode_by_size(self.vq_model, self.pixel_values(images))

    def _pad(self, examples: list[dict[str, list[int]]], padding_side: str) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(example["input_ids"]) for example in examples)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            padding = length - len(example["input_ids"])
            for name, values, fill in (
                ("input_ids", example["input_ids"], pad_id),
                ("attention_mask", [1] * len(example["input_ids"]), 0),
                ("labels", example["labels"], IGNORE_INDEX),
            ):
                batch[name].append(
                    values + [fill] * padding if padding_side == "right" else [fill] * padding + values
                )
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}  # (B, T)

    # ------------------------------------------------------------------ ids -> text and images
    def batch_decode(
        self,
        sequences: torch.Tensor | Sequence[Sequence[int]],
        sequence_lengths: torch.Tensor | Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        **kwargs,
    ) -> tuple[list[str], list[list[torch.Tensor]]]:
        """Generated ids to ``(texts, images)``: per row the text (an ``image_placeholder`` where each
        image stood) and the ``(h, w)`` code grids of its complete images."""
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(s) for s in sequences]
        if sequence_lengths is not None:
            rows = [row[: int(length)] for row, length in zip(rows, sequence_lengths)]
        texts, images = [], []
        for row in rows:
            pieces, grids = self.vocabulary.split_images(row)
            decoded = [
                self.tokenizer.decode(p, skip_special_tokens=skip_special_tokens, **kwargs) for p in pieces
            ]
            texts.append(self.image_placeholder.join(decoded))
            images.append(grids)
        return texts, images


def batches_by_shape(tensors: Sequence[torch.Tensor]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The tensors stacked one batch per shape, in order of first appearance: ``(indices, (b, *shape))``."""
    for shape in dict.fromkeys(tuple(tensor.shape) for tensor in tensors):
        indices = [index for index, tensor in enumerate(tensors) if tuple(tensor.shape) == shape]
        yield indices, torch.stack([tensors[index] for index in indices])


@torch.no_grad()
def encode_by_size(vq_model: torch.nn.Module, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Pixels ``(C, H, W)`` to CPU code grids ``(h, w)`` in their order: one ``vq_model.encode`` call per size.

    The pixels stay float32 on the CPU: the visual tokenizer takes them to each branch's device and dtype (read
    here, the device would be the CPU while an offloaded tokenizer waits to be moved)."""
    grids: list[torch.Tensor | None] = [None] * len(pixel_values)
    for indices, batch in batches_by_shape(pixel_values):
        codes = vq_model.encode(batch).cpu()  # (b, h, w)
        for index, grid in zip(indices, codes):
            grids[index] = grid
    return grids


def _segments(sample: Any) -> list:
    segments = sample.get("segments") if isinstance(sample, dict) else None
    return list(segments) if isinstance(segments, (list, tuple)) else []


def _needs_encoding(segment: Any) -> bool:
    """An image segment given as pixels (PIL, path, bytes), not as ids."""
    return (
        isinstance(segment, dict)
        and segment.get("type") == IMAGE
        and segment.get("image_token_ids") is None
        and segment.get("image") is not None
    )


def _pixel_segments(batch: list[dict]) -> list[dict]:
    """The pixel image segments of a batch, in order (malformed samples are left to ``tokenize_sample``)."""
    return [segment for sample in batch for segment in _segments(sample) if _needs_encoding(segment)]


__all__ = ["UniMMProcessor", "batches_by_shape", "encode_by_size"]


def _check_text(text: Any, where: str) -> None:
    """A clear ``ValueError`` for text the tokenizer cannot take (it raises ``TypeError`` on these)."""
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where}: the text cannot be encoded as UTF-8 ({error.reason} {text[error.start]!r} at "
            f"character {error.start}); lone surrogates usually come from a bad decode of the input"
        ) from None
