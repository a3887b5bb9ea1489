"""What the rows of one decode loop write, step by step: one plan object per kind of batch.

The loop asks its plan for the constraints of a step (:meth:`DecodePlan.constraints`), chooses the tokens, and
hands them back (:meth:`DecodePlan.advance`); the plan records them and answers with the block of tokens the
next forward feeds and whether the loop is finished. Two kinds:

- :class:`ScheduledPlan`: every row writes one image of a known grid, so every step's constraints are known up
  front (:meth:`~unimm.llm.constraints.ConstraintState.schedule`): lookups, no per-step state updates and no
  host syncs. Steps whose tokens are all forced take no forward of their own: the leading
  ``<|boi|> <|h|> <|w|>`` join the prompts (:meth:`DecodePlan.with_header`), each ``<|eol|>`` is fed with the
  code before it, the closing tokens are only written.
- :class:`StateMachinePlan`: text, interleaved and mixed batches, where what comes next depends on the tokens
  chosen: the constraint state machine moves on every step, and one host sync per step tells whether any row
  still runs and whether any is outside an image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .constraints import DONE, IMAGE, ConstraintSchedule, ConstraintState
from .vocabulary import ImageVocabulary

if TYPE_CHECKING:
    from .generation_request import GenerationRequest


class StepConstraints(NamedTuple):
    """The constraints of one step's tokens, each ``(N,)`` over the conditional rows."""

    mask_class: torch.Tensor  # allowed-token class (a row of the mask table)
    forced: torch.Tensor  # the token a row must write, -1 where it is free
    in_image: torch.Tensor  # bool: inside an image (guidance applies)
    unfinished: torch.Tensor  # bool: the token counts (the row is not done)


class FedBlock(NamedTuple):
    """What :meth:`DecodePlan.advance` answers: the tokens the next forward feeds, written at steps
    ``[step, end)``, and whether the loop goes on."""

    end: int  # the next step that needs logits
    tokens: torch.Tensor  # (N, T) the chosen token, then the forced ones that follow it
    part_of_image: torch.Tensor  # (N, T) bool: each fed token belongs to an image (unconditional rows see it)
    finished: bool  # no row writes anything after the block
    outside_image: bool  # some unfinished row is outside an image: the next step needs the whole head
    running_rows: torch.Tensor | None  # (N,) bool: rows not done (None: every row ends with the loop)


class DecodePlan:
    """The tokens written so far, ``(N, max_steps)`` padded with ``pad_token_id``, and their count per row."""

    text_only = False  # no row can enter an image: the head's text slice and the text sampler suffice
    scheduled = False  # every token outside the image codes is forced: the code sampler suffices
    first_step = 0  # steps written before the first forward (forced tokens that join the prompts)

    def __init__(self, num_rows: int, max_steps: int, pad_token_id: int, device: torch.device):
        self.max_steps = max_steps
        self.tokens = torch.full((num_rows, max_steps), pad_token_id, dtype=torch.long, device=device)
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=device)

    def with_header(self, sequences: list[list[int]], rows: list[int]) -> list[list[int]]:
        """The prompts with the tokens of the first steps appended, ``rows`` the conditional row of each."""
        return sequences

    def constraints(self, step: int) -> StepConstraints:
        raise NotImplementedError

    def advance(self, step: int, tokens: torch.Tensor, constraints: StepConstraints) -> FedBlock:
        """Record the tokens ``(N,)`` chosen at ``step`` under ``constraints`` and move on."""
        raise NotImplementedError

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (N, L), lengths (N,))``, cut to the longest row."""
        return self.tokens[:, : int(self.lengths.max())], self.lengths


class ScheduledPlan(DecodePlan):
    """An image-only batch of known grids: every step's constraints looked up in a precomputed schedule."""

    scheduled = True

    def __init__(self, schedule: ConstraintSchedule, pad_token_id: int):
        max_steps, num_rows = schedule.forced.shape
        super().__init__(num_rows, max_steps, pad_token_id, schedule.forced.device)
        self.schedule = schedule
        all_forced = (schedule.forced >= 0).all(-1).tolist()  # (S,), one host sync for the whole loop
        # Per step: the next step whose tokens are not all forced (the forced ones between are fed with it).
        self._block_end, next_free = [max_steps] * max_steps, max_steps
        for step in reversed(range(max_steps)):
            self._block_end[step] = next_free
            next_free = next_free if all_forced[step] else step
        # Leading forced steps join the prompts, but at least one step is left for the prefill's logits.
        self.first_step = min(next_free, max_steps - 1)
        if self.first_step:
            self.tokens[:, : self.first_step] = schedule.forced[: self.first_step].T  # (N, lead)
            self.lengths += schedule.unfinished[: self.first_step].sum(0)

    def with_header(self, sequences: list[list[int]], rows: list[int]) -> list[list[int]]:
        if not self.first_step:
            return sequences
        header = self.schedule.forced[: self.first_step].T.tolist()  # (N, lead)
        return [ids + header[row] for ids, row in zip(sequences, rows)]

    def constraints(self, step: int) -> StepConstraints:
        schedule = self.schedule
        return StepConstraints(
            schedule.mask_class[step],
            schedule.forced[step],
            schedule.in_image[step],
            schedule.unfinished[step],
        )

    def advance(self, step: int, tokens: torch.Tensor, constraints: StepConstraints) -> FedBlock:
        self.lengths += constraints.unfinished
        self.tokens[:, step] = tokens
        end = self._block_end[step]
        if end > step + 1:  # the forced tokens that follow go into the same forward
            self.tokens[:, step + 1 : end] = self.schedule.forced[step + 1 : end].T  # (N, T - 1)
            self.lengths += self.schedule.unfinished[step + 1 : end].sum(0)
        part_of_image = self.schedule.part_of_image[step:end].T  # (N, T)
        return FedBlock(end, self.tokens[:, step:end], part_of_image, end >= self.max_steps, False, None)


class StateMachinePlan(DecodePlan):
    """Any batch: the constraint state machine moves every row on by the tokens it chose."""

    def __init__(self, state: ConstraintState):
        budget = state.budget  # (N,)
        super().__init__(budget.shape[0], int(budget.max()), state.pad_token_id, budget.device)
        self.state = state
        self.text_only = state.text_only

    def constraints(self, step: int) -> StepConstraints:
        state = self.state
        mask_class, forced = state.plan()
        return StepConstraints(mask_class, forced, state.phase == IMAGE, state.phase != DONE)

    def advance(self, step: int, tokens: torch.Tensor, constraints: StepConstraints) -> FedBlock:
        self.lengths += constraints.unfinished
        self.tokens[:, step] = tokens
        state = self.state
        part_of_image = state.advance(tokens)
        running_rows = state.phase != DONE
        # One host sync per step: stop when every row is done; note whether all are in images.
        if self.text_only:
            running, outside_image = bool(running_rows.any()), True
        else:
            running, outside_image = torch.stack(
                [running_rows.any(), (running_rows & (state.phase != IMAGE)).any()]
            ).tolist()
        tokens = self.tokens[:, step : step + 1]  # (N, 1)
        return FedBlock(step + 1, tokens, part_of_image[:, None], not running, outside_image, running_rows)


def constraint_state(
    vocabulary: ImageVocabulary, request: GenerationRequest, device: torch.device
) -> ConstraintState:
    """The constraint state machine of ``request``'s N conditional rows, on ``device`` (the logits')."""
    rows = request.rows
    grids = torch.tensor([request.grids[i] for i in rows], dtype=torch.long, device=device)  # (N, 2)
    return ConstraintState(
        vocabulary,
        image_mode=torch.tensor([request.modes[i] == "image" for i in rows], device=device),
        allow_image=torch.tensor([request.modes[i] == "interleaved" for i in rows], device=device),
        requested_grid=grids,
        budget=torch.tensor([request.budgets[i] for i in rows], dtype=torch.long, device=device),
        eos_token_ids=torch.tensor(request.eos_token_ids, dtype=torch.long, device=device),
        pad_token_id=request.pad_token_id,
    )


def decode_plan(vocabulary: ImageVocabulary, request: GenerationRequest, device: torch.device) -> DecodePlan:
    """The plan of ``request``'s rows: the schedule when every row writes one image of a known grid."""
    state = constraint_state(vocabulary, request, device)
    if state.is_deterministic:
        return ScheduledPlan(state.schedule(), state.pad_token_id)
    return StateMachinePlan(state)
