"""The one mapping between visual-tokenizer codebook indices and LLM token ids.

The image tokens are appended after the text vocabulary, in this order::

    text vocabulary (text_vocab_size ids)
    <|boi|> <|eoi|> <|eol|>                       begin / end of image, end of row
    <|h1|> ... <|h{max_grid_height}|>              grid height (rows)
    <|w1|> ... <|w{max_grid_width}|>               grid width (columns)
    <|img0|> ... <|img{codebook_size - 1}|>        one token per codebook entry

An image of ``h x w`` codes is written ``<|boi|> <|h|> <|w|> row <|eol|> ... row <|eol|> <|eoi|>``, so one
checkpoint reads and writes any grid up to ``max_grid_height x max_grid_width``. No other module computes
these offsets: everything goes through :class:`ImageVocabulary`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPECIAL_TOKENS = ("<|boi|>", "<|eoi|>", "<|eol|>")


class ImageVocabulary:
    """Token ids of the image vocabulary appended after ``text_vocab_size`` text tokens."""

    def __init__(self, text_vocab_size: int, codebook_size: int, max_grid_height: int, max_grid_width: int):
        for name, value in (
            ("text_vocab_size", text_vocab_size),
            ("codebook_size", codebook_size),
            ("max_grid_height", max_grid_height),
            ("max_grid_width", max_grid_width),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageVocabulary: `{name}` must be a positive int, got {value!r}.")
        self.text_vocab_size = text_vocab_size
        self.codebook_size = codebook_size
        self.max_grid_height = max_grid_height
        self.max_grid_width = max_grid_width
        self.boi_token_id = text_vocab_size
        self.eoi_token_id = text_vocab_size + 1
        self.eol_token_id = text_vocab_size + 2
        self.height_token_offset = text_vocab_size + len(SPECIAL_TOKENS)
        self.width_token_offset = self.height_token_offset + max_grid_height
        self.code_token_offset = self.width_token_offset + max_grid_width
        self.vocab_size = self.code_token_offset + codebook_size

    @classmethod
    def from_config(cls, config) -> ImageVocabulary:
        """The vocabulary described by a :class:`~unimm.llm.UniMMConfig` (or any object with its fields)."""
        return cls(
            config.text_vocab_size, config.codebook_size, config.max_grid_height, config.max_grid_width
        )

    def __repr__(self) -> str:
        return (
            f"ImageVocabulary(text_vocab_size={self.text_vocab_size}, codebook_size={self.codebook_size}, "
            f"max_grid_height={self.max_grid_height}, max_grid_width={self.max_grid_width})"
        )

    @property
    def num_new_tokens(self) -> int:
        """Tokens added after the text vocabulary."""
        return self.vocab_size - self.text_vocab_size

    @property
    def token_strings(self) -> list[str]:
        """Printable names of the new tokens, in id order (for logging and tokenizer display)."""
        heights = [f"<|h{h}|>" for h in range(1, self.max_grid_height + 1)]
        widths = [f"<|w{w}|>" for w in range(1, self.max_grid_width + 1)]
        codes = [f"<|img{k}|>" for k in range(self.codebook_size)]
        return [*SPECIAL_TOKENS, *heights, *widths, *codes]

    # ----------------------------------------------------------------- size tokens
    def check_grid(self, height: int, width: int, argument: str = "image_grid") -> None:
        """Raise ``ValueError`` naming ``argument`` if ``(height, width)`` is not a grid this vocabulary writes."""
        if not (1 <= int(height) <= self.max_grid_height and 1 <= int(width) <= self.max_grid_width):
            raise ValueError(
                f"`{argument}`=({height}, {width}) is off the grid: height must be in 1..{self.max_grid_height} "
                f"and width in 1..{self.max_grid_width}."
            )

    def height_token_id(self, height: int) -> int:
        self.check_grid(height, 1, "height")
        return self.height_token_offset + int(height) - 1

    def width_token_id(self, width: int) -> int:
        self.check_grid(1, width, "width")
        return self.width_token_offset + int(width) - 1

    # ----------------------------------------------------------------- codes <-> token ids
    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook indices (any shape) to LLM token ids (same shape)."""
        codes = torch.as_tensor(codes)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"`codes` must lie in 0..{self.codebook_size - 1}, got values in "
                f"{int(codes.min())}..{int(codes.max())}."
            )
        return codes.long() + self.code_token_offset

    def token_ids_to_codes(self, token_ids: torch.Tensor) -> torch.Tensor:
        """LLM token ids of image codes (any shape) back to codebook indices (same shape)."""
        token_ids = torch.as_tensor(token_ids)
        if token_ids.numel() and not bool(self.is_code_token(token_ids).all()):
            raise ValueError(
                f"`token_ids` must all be image code tokens ({self.code_token_offset}.."
                f"{self.vocab_size - 1}), got values in {int(token_ids.min())}..{int(token_ids.max())}."
            )
        return token_ids.long() - self.code_token_offset

    def is_code_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that are codebook entries."""
        return (token_ids >= self.code_token_offset) & (token_ids < self.vocab_size)

    def is_image_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that belong to the image vocabulary (codes, markers, size tokens)."""
        return (token_ids >= self.text_vocab_size) & (token_ids < self.vocab_size)

    # ----------------------------------------------------------------- whole images
    def image_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """A ``(h, w)`` grid of codes to its 1-D token sequence ``<|boi|> <|h|> <|w|> rows... <|eoi|>``."""
        codes = torch.as_tensor(codes)
        if codes.ndim != 2:
            raise ValueError(f"`codes` must be a (height, width) grid, got shape {tuple(codes.shape)}.")
        height, width = codes.shape
        self.check_grid(height, width, "codes.shape")
        rows = self.codes_to_token_ids(codes)  # (h, w)
        eol = torch.full((height, 1), self.eol_token_id, dtype=torch.long, device=rows.device)
        body = torch.cat([rows, eol], dim=1).flatten()  # (h * (w + 1),)
        head = torch.tensor(
            [self.boi_token_id, self.height_token_id(height), self.width_token_id(width)], device=rows.device
        )
        tail = torch.tensor([self.eoi_token_id], device=rows.device)
        return torch.cat([head, body, tail])

    def image_sequence_length(self, height: int, width: int) -> int:
        """Number of tokens :meth:`image_to_token_ids` writes for an ``(height, width)`` grid."""
        return 3 + height * (width + 1) + 1

    def token_ids_to_image(self, token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Inverse of :meth:`image_to_token_ids`: one image token sequence to its ``(h, w)`` code grid."""
        ids = torch.as_tensor(token_ids).long().flatten()
        if ids.numel() < 4 or int(ids[0]) != self.boi_token_id or int(ids[-1]) != self.eoi_token_id:
            raise ValueError("`token_ids` must start with <|boi|> and end with <|eoi|>.")
        height = int(ids[1]) - self.height_token_offset + 1
        width = int(ids[2]) - self.width_token_offset + 1
        if not (1 <= height <= self.max_grid_height and 1 <= width <= self.max_grid_width):
            raise ValueError("`token_ids` must carry a height and a width token after <|boi|>.")
        body = ids[3:-1]
        if body.numel() != height * (width + 1):
            raise ValueError(
                f"`token_ids` holds {body.numel()} tokens between the size tokens and <|eoi|>; a "
                f"{height}x{width} grid needs {height * (width + 1)}."
            )
        body = body.view(height, width + 1)  # (h, w + 1): codes then <|eol|>
        if not bool((body[:, -1] == self.eol_token_id).all()):
            raise ValueError("`token_ids`: every row must end with <|eol|>.")
        return self.token_ids_to_codes(body[:, :-1])

    def split_images(
        self, token_ids: torch.Tensor | Sequence[int]
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Split a generated sequence into text pieces and complete image grids.

        Returns ``(text_pieces, images)``: the runs of text ids between images (always one more than the
        number of images) and the ``(h, w)`` code grid of every complete ``<|boi|> ... <|eoi|>`` span. An image
        left unfinished (generation stopped inside it) is dropped."""
        ids = [int(t) for t in torch.as_tensor(token_ids).flatten().tolist()]
        texts: list[list[int]] = [[]]
        images: list[torch.Tensor] = []
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == self.boi_token_id:
                end = ids.index(self.eoi_token_id, position) if self.eoi_token_id in ids[position:] else -1
                if end < 0:
                    break
                images.append(self.token_ids_to_image(ids[position : end + 1]))
                texts.append([])
                position = end + 1
                continue
            if token < self.text_vocab_size:
                texts[-1].append(token)
            position += 1
        return texts, images
