"""The per-sample constraint state machine of the decode loop, as batched tensor ops.

Every row is in one phase: ``TEXT`` (no image tokens; ``<|boi|>`` allowed when the row may open an
image), ``IMAGE`` (height, width, then codes, with ``<|eol|>`` forced at row ends and ``<|eoi|>`` after
the last row) or ``DONE``. A row that writes its own size tokens may only choose a size whose image still
fits its token budget, so an interleaved answer opens images whenever a 1x1 one fits and never cuts one. Each step :meth:`ConstraintState.plan` returns, per row, an allowed-token class
(an index into a precomputed additive mask table) and a forced token (``-1`` when free); :meth:`advance`
moves every row on with the chosen tokens. Nothing loops over rows in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vocabulary import ImageVocabulary

TEXT, IMAGE, DONE = 0, 1, 2
# Allowed-token classes (rows of the mask table); after them, "height at most k" for k = 1 .. max_grid_height,
# then "width at most k" for k = 1 .. max_grid_width.
CLASS_TEXT, CLASS_TEXT_OR_BOI, CLASS_HEIGHT, CLASS_WIDTH, CLASS_CODES = range(5)
FIXED_CLASSES = 5
IMAGE_HEADER = 3  # <|boi|> <|h|> <|w|>


def height_class(limit: torch.Tensor) -> torch.Tensor:
    """The class allowing heights ``1 .. limit`` (``limit`` at least 1 and at most the vocabulary's)."""
    return FIXED_CLASSES + limit - 1


def width_class(vocabulary: ImageVocabulary, limit: torch.Tensor) -> torch.Tensor:
    """The class allowing widths ``1 .. limit``."""
    return FIXED_CLASSES + vocabulary.max_grid_height + limit - 1


def build_mask_table(vocabulary: ImageVocabulary, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(num_classes, V)`` additive masks: 0 where a class allows a token, ``-inf`` elsewhere."""
    num_classes = FIXED_CLASSES + vocabulary.max_grid_height + vocabulary.max_grid_width
    allowed = torch.zeros(num_classes, vocabulary.vocab_size, dtype=torch.bool)
    allowed[CLASS_TEXT, : vocabulary.text_vocab_size] = True
    allowed[CLASS_TEXT_OR_BOI, : vocabulary.text_vocab_size] = True
    allowed[CLASS_TEXT_OR_BOI, vocabulary.boi_token_id] = True
    allowed[CLASS_HEIGHT, vocabulary.height_token_offset : vocabulary.width_token_offset] = True
    allowed[CLASS_WIDTH, vocabulary.width_token_offset : vocabulary.code_token_offset] = True
    allowed[CLASS_CODES, vocabulary.code_token_offset :] = True
    for limit in range(1, vocabulary.max_grid_height + 1):
        row = height_class(torch.tensor(limit))
        allowed[row, vocabulary.height_token_offset : vocabulary.height_token_offset + limit] = True
    for limit in range(1, vocabulary.max_grid_width + 1):
        row = width_class(vocabulary, torch.tensor(limit))
        allowed[row, vocabulary.width_token_offset : vocabulary.width_token_offset + limit] = True
    table = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return table.to(device)


class ConstraintState:
    """Phase and image progress of ``N`` rows.

    Args:
        vocabulary: the image vocabulary.
        image_mode: ``(N,)`` rows that must write exactly one image and stop.
        allow_image: ``(N,)`` rows that may open images on their own (interleaved mode).
        requested_grid: ``(N, 2)`` requested ``(height, width)``; 0 lets the model write the size token.
        budget: ``(N,)`` new tokens each row may still write.
        eos_token_ids: ``(E,)`` ids that end a text row.
        pad_token_id: written by finished rows.
    """

    def __init__(
        self,
        vocabulary: ImageVocabulary,
        image_mode: torch.Tensor,
        allow_image: torch.Tensor,
        requested_grid: torch.Tensor,
        budget: torch.Tensor,
        eos_token_ids: torch.Tensor,
        pad_token_id: int,
    ):
        self.vocabulary = vocabulary
        self.image_mode = image_mode
        self.allow_image = allow_image
        self.requested_height = requested_grid[:, 0]
        self.requested_width = requested_grid[:, 1]
        self.budget = budget.clone()
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.phase = torch.full_like(budget, TEXT)
        self.image_step = torch.zeros_like(budget)  # tokens written since <|boi|>
        self.grid_height = self.requested_height.clone()
        self.grid_width = self.requested_width.clone()
        # An interleaved row may open an image only if the smallest image it could write still fits (its
        # requested size, else 1 code per unrequested side); the size tokens it writes are then kept to what fits.
        min_height = torch.where(self.requested_height > 0, self.requested_height, 1)
        min_width = torch.where(self.requested_width > 0, self.requested_width, 1)
        self.smallest_image = vocabulary.image_sequence_length(min_height, min_width)
        # Rows that can never enter an image only need the end-of-text bookkeeping.
        self.text_only = not bool(image_mode.any() or allow_image.any())
        self._text_class = torch.full_like(budget, CLASS_TEXT)

    def plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_class, forced_token)`` for the next token of every row, both ``(N,)`` long."""
        vocabulary = self.vocabulary
        if self.text_only:
            free = torch.full_like(self.phase, -1)
            return self._text_class, torch.where(self.phase == DONE, self.pad_token_id, free)
        in_text = self.phase == TEXT
        in_image = self.phase == IMAGE
        step = self.image_step
        can_open = self.allow_image & (self.budget >= self.smallest_image)
        mask_class = torch.where(can_open, CLASS_TEXT_OR_BOI, CLASS_TEXT)
        forced = torch.full_like(step, -1)
        forced = torch.where(in_text & self.image_mode, vocabulary.boi_token_id, forced)

        # The budget counts the token being chosen: after <|boi|>, h * (w + 1) + 3 tokens remain for the image.
        at_height = in_image & (step == 0)
        width_now = torch.where(self.requested_width > 0, self.requested_width, 1)
        fit_height = ((self.budget - IMAGE_HEADER) // (width_now + 1)).clamp(1, vocabulary.max_grid_height)
        height_allowed = torch.where(self.requested_height > 0, CLASS_HEIGHT, height_class(fit_height))
        mask_class = torch.where(at_height, height_allowed, mask_class)
        height_token = vocabulary.height_token_offset + self.requested_height - 1
        forced = torch.where(at_height & (self.requested_height > 0), height_token, forced)
        at_width = in_image & (step == 1)
        fit_width = ((self.budget - 2) // self.grid_height.clamp_min(1) - 1).clamp(
            1, vocabulary.max_grid_width
        )
        width_allowed = torch.where(self.requested_width > 0, CLASS_WIDTH, width_class(vocabulary, fit_width))
        mask_class = torch.where(at_width, width_allowed, mask_class)
        width_token = vocabulary.width_token_offset + self.requested_width - 1
        forced = torch.where(at_width & (self.requested_width > 0), width_token, forced)

        in_body = in_image & (step >= 2)
        mask_class = torch.where(in_body, CLASS_CODES, mask_class)
        position = step - 2  # index in the body: rows of w codes, each followed by <|eol|>
        row_length = self.grid_width + 1
        at_end = in_body & (position == self.grid_height * row_length)
        at_row_end = in_body & ~at_end & (position % row_length == self.grid_width)
        forced = torch.where(at_end, vocabulary.eoi_token_id, forced)
        forced = torch.where(at_row_end, vocabulary.eol_token_id, forced)
        done = self.phase == DONE
        forced = torch.where(done, self.pad_token_id, forced)
        # Finished rows get a class with allowed tokens in every head slice, so sampling stays finite.
        mask_class = torch.where(done, CLASS_CODES, mask_class)
        return mask_class, forced

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Move every row on by its chosen token; returns ``(N,)`` bool: the token belongs to an image."""
        vocabulary = self.vocabulary
        was_text = self.phase == TEXT
        if self.text_only:
            self.budget = self.budget - 1
            ended = (was_text & torch.isin(tokens, self.eos_token_ids)) | (self.budget <= 0)
            self.phase = torch.where(ended, DONE, self.phase)
            return torch.zeros_like(was_text)
        was_image = self.phase == IMAGE
        opened = was_text & (tokens == vocabulary.boi_token_id)
        part_of_image = was_image | opened

        chose_height = was_image & (self.image_step == 0)
        self.grid_height = torch.where(
            chose_height, tokens - vocabulary.height_token_offset + 1, self.grid_height
        )
        chose_width = was_image & (self.image_step == 1)
        self.grid_width = torch.where(
            chose_width, tokens - vocabulary.width_token_offset + 1, self.grid_width
        )
        self.image_step = torch.where(was_image, self.image_step + 1, 0)

        closed = was_image & (tokens == vocabulary.eoi_token_id)
        self.grid_height = torch.where(closed, self.requested_height, self.grid_height)
        self.grid_width = torch.where(closed, self.requested_width, self.grid_width)
        ended = (was_text & torch.isin(tokens, self.eos_token_ids)) | (closed & self.image_mode)
        self.budget = self.budget - 1
        phase = torch.where(opened, IMAGE, self.phase)
        phase = torch.where(closed, TEXT, phase)
        self.phase = torch.where(ended | (self.budget <= 0), DONE, phase)
        return part_of_image

    @property
    def is_deterministic(self) -> bool:
        """True when no row's progress depends on the tokens sampled: every row writes one image of a known
        grid (which code is chosen never changes what comes next)."""
        return bool(
            self.image_mode.all() and (self.requested_height > 0).all() and (self.requested_width > 0).all()
        )

    def schedule(self) -> ConstraintSchedule:
        """Every step's constraints of a deterministic batch, computed at once from the grids, so it decodes with
        lookups instead of per-step state updates and host syncs. Row by row the steps are ``<|boi|>``, the
        height and width tokens, ``height`` rows of ``width`` codes each closed by ``<|eol|>``, ``<|eoi|>``,
        then padding; they equal what :meth:`plan`/:meth:`advance` give step by step. The state is left as is."""
        if not self.is_deterministic:
            raise ValueError("ConstraintState.schedule: rows depend on sampled tokens; use plan()/advance().")
        vocabulary = self.vocabulary
        height, width = self.requested_height, self.requested_width  # (N,)
        # <|boi|> <|h|> <|w|>: the header's steps and their mask classes; the body follows, then <|eoi|>.
        header = torch.tensor([CLASS_TEXT, CLASS_HEIGHT, CLASS_WIDTH], device=height.device)
        image_length = len(header) + height * (width + 1) + 1
        end = torch.minimum(image_length, self.budget)  # (N,) tokens each row writes
        step = torch.arange(int(self.budget.max()), device=height.device).unsqueeze(-1)  # (S, 1)
        unfinished = step < end  # (S, N)
        position = step - len(header)  # index in the body: rows of w codes, each followed by <|eol|>
        at_row_end = (position >= 0) & (position % (width + 1) == width)
        forced = torch.full_like(unfinished, -1, dtype=torch.long)
        forced = torch.where(at_row_end, vocabulary.eol_token_id, forced)
        forced = torch.where(step == image_length - 1, vocabulary.eoi_token_id, forced)
        forced = torch.where(step == 2, vocabulary.width_token_offset + width - 1, forced)
        forced = torch.where(step == 1, vocabulary.height_token_offset + height - 1, forced)
        forced = torch.where(step == 0, vocabulary.boi_token_id, forced)
        forced = torch.where(unfinished, forced, self.pad_token_id)
        # Finished rows keep the codes class, which has allowed tokens in every head slice (see plan()).
        in_header = unfinished & (step < len(header))
        mask_class = torch.where(in_header, header[step.clamp(max=len(header) - 1)], CLASS_CODES)
        return ConstraintSchedule(
            mask_class=mask_class,
            forced=forced,
            in_image=unfinished & (step >= 1),
            unfinished=unfinished,
            part_of_image=unfinished,
        )


@dataclass
class ConstraintSchedule:
    """Per-step records of a deterministic batch, each ``(steps, N)``."""

    mask_class: torch.Tensor
    forced: torch.Tensor
    in_image: torch.Tensor
    unfinished: torch.Tensor
    part_of_image: torch.Tensor
