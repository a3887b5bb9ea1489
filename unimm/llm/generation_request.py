"""The arguments of one ``generate_multimodal`` call, checked and normalised: :class:`GenerationRequest`.

A call takes each per-request argument as one value for every request or as a list with one entry per
request, prompts as id lists or padded tensors, and defaults that resolve against the model (end-of-sequence
and pad ids, the default image grid). :func:`normalise_request` turns them into one value per request,
checked, as transformers' ``GenerationConfig`` holds the arguments of ``generate``; the decode loop reads
nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral
from typing import TYPE_CHECKING

import torch
from transformers.generation.streamers import BaseStreamer

from .sampling import ModalitySampling, default_image_sampling
from .streamers import BatchStreamer
from .vocabulary import ImageVocabulary

if TYPE_CHECKING:
    from .generation import UniMMGenerationMixin

MODES = ("text", "image", "interleaved")
CACHE_IMPLEMENTATIONS = ("preallocated", "dynamic", "static")
# What ``torch.Generator.manual_seed`` takes: any 64-bit integer, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)
TokenIds = Sequence[Sequence[int]] | torch.Tensor


@dataclass
class GenerationRequest:
    """One ``generate_multimodal`` call's requests, one entry per request in each list.

    Attributes:
        prompts: token ids of each request's prompt.
        modes: ``"text"``, ``"image"`` or ``"interleaved"``.
        grids: requested ``(height, width)`` in codes; ``(0, 0)`` lets the model write the size tokens.
        budgets: new tokens each row may write (an image request: exactly its image).
        guidance_scales: classifier-free guidance (1: none).
        unconditional_prompts: the prompt with its text dropped, for the guided requests (else ``None``).
        images_per_prompt: rows per request.
        text_sampling, image_sampling: how text tokens and image codes are chosen.
        eos_token_ids, pad_token_id: the ids that end a text row, and the id finished rows write.
        generator: one generator for the whole batch (``None``: torch's default, or per-request ones).
        request_generators: or one generator per request (``None`` entries: torch's default).
        streamers: ``(row, streamer)`` pairs.
        batch_streamer: a streamer of every row's tokens (``None``: none).
        cache_implementation: ``"preallocated"``, ``"dynamic"`` or ``"static"``.
        compile: whether each decode step runs as a ``torch.compile`` graph.
    """

    prompts: list[list[int]]
    modes: list[str]
    grids: list[tuple[int, int]]
    budgets: list[int]
    guidance_scales: list[float]
    unconditional_prompts: list[list[int] | None]
    images_per_prompt: list[int]
    text_sampling: ModalitySampling
    image_sampling: ModalitySampling
    eos_token_ids: list[int]
    pad_token_id: int
    generator: torch.Generator | None
    request_generators: list[torch.Generator | None] | None
    streamers: list[tuple[int, BaseStreamer]]
    cache_implementation: str
    compile: bool
    batch_streamer: BatchStreamer | None = None

    @cached_property
    def rows(self) -> list[int]:
        """The request of each of the N conditional rows, request-major."""
        return [index for index, repeats in enumerate(self.images_per_prompt) for _ in range(repeats)]

    @cached_property
    def guided_rows(self) -> list[int]:
        """The conditional row of each of the U unconditional rows (rows ``N..N+U`` of the batch)."""
        return [row for row, index in enumerate(self.rows) if self.guidance_scales[index] > 1.0]

    def sequences(self) -> tuple[list[list[int]], list[int]]:
        """The prompt of every row, conditional rows first, and the conditional row each belongs to."""
        rows, guided_rows = self.rows, self.guided_rows
        prompts = [self.prompts[index] for index in rows]
        prompts += [self.unconditional_prompts[rows[row]] for row in guided_rows]
        return prompts, list(range(len(rows))) + guided_rows

    def guidance(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(guided_index (U,), guidance (U, 1))``: each unconditional row's conditional row and scale."""
        scales = [self.guidance_scales[self.rows[row]] for row in self.guided_rows]
        guided_index = torch.tensor(self.guided_rows, dtype=torch.long, device=device)
        return guided_index, torch.tensor(scales, dtype=torch.float32, device=device).unsqueeze(-1)


def normalise_request(
    model: UniMMGenerationMixin, device: torch.device, *, input_ids: TokenIds, attention_mask, mode,
    image_grid, guidance_scale, unconditional_input_ids, unconditional_attention_mask, text_sampling,
    image_sampling, max_new_tokens, num_images_per_prompt, eos_token_id, pad_token_id, generator, seed,
    streamer, cache_implementation: str, compile: bool,
) -> GenerationRequest:  # fmt: skip
    """Check ``generate_multimodal``'s arguments (see its docstring) and normalise them, generators on
    ``device``; raises ``ValueError`` naming the argument (and the request) at fault."""
    prompts = _as_id_lists(input_ids, attention_mask, "input_ids")
    count = len(prompts)
    if count == 0:
        raise ValueError("`input_ids` holds no prompts.")
    modes = _per_request(mode, count, "mode")
    for index, request_mode in enumerate(modes):
        if request_mode not in MODES:
            raise ValueError(f"`mode[{index}]`={request_mode!r} is not one of {MODES}.")
    grids = _per_request(image_grid, count, "image_grid", is_single=_is_grid)
    scales = [float(s) for s in _per_request(guidance_scale, count, "guidance_scale")]
    text_sampling = text_sampling or ModalitySampling()
    image_sampling = image_sampling or default_image_sampling(model.generation_config)
    text_sampling.validate("text_sampling")
    image_sampling.validate("image_sampling")
    repeats = _positive_ints(num_images_per_prompt, count, "num_images_per_prompt")
    _check_cache(cache_implementation, compile)
    max_new_tokens = _positive_ints(max_new_tokens, count, "max_new_tokens")
    unconditional = _unconditional_prompts(unconditional_input_ids, unconditional_attention_mask, count)
    grids, budgets = _check_requests(model, prompts, modes, grids, scales, unconditional, max_new_tokens)
    batch_streamer = streamer if isinstance(streamer, BatchStreamer) else None
    streamers = _streamers(None if batch_streamer is not None else streamer, count, repeats)
    generator, request_generators = _generators(seed, generator, count, device)
    eos = resolve_eos_token_ids(model, eos_token_id)
    pad = resolve_pad_token_id(model, pad_token_id, eos)
    return GenerationRequest(
        prompts=prompts, modes=modes, grids=grids, budgets=budgets, guidance_scales=scales,
        unconditional_prompts=unconditional, images_per_prompt=repeats, text_sampling=text_sampling,
        image_sampling=image_sampling, eos_token_ids=eos, pad_token_id=pad,
        generator=generator, request_generators=request_generators, streamers=streamers,
        cache_implementation=cache_implementation, compile=compile, batch_streamer=batch_streamer,
    )  # fmt: skip


def resolve_eos_token_ids(model: UniMMGenerationMixin, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The ids that end a text row: ``eos_token_id``, else the generation config's, else the text config's."""
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(model.config.text_config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def resolve_pad_token_id(model: UniMMGenerationMixin, pad_token_id: int | None, eos: list[int]) -> int:
    """The id finished rows write: ``pad_token_id``, else the configs', else the first end-of-sequence id."""
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(model.config.text_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return int(pad_token_id)


def _per_request(value, count: int, argument: str, is_single=None) -> list:
    """Broadcast one value to ``count`` requests, or check a per-request list. A list or tuple is per
    request unless ``is_single`` says it is one value (a ``(height, width)`` grid)."""
    single = not isinstance(value, (list, tuple)) or (is_single is not None and is_single(value))
    if single:
        return [value] * count
    if len(value) != count:
        raise ValueError(f"`{argument}` has {len(value)} entries but there are {count} prompts.")
    return list(value)


def _positive_ints(value, count: int, argument: str) -> list[int]:
    values = _per_request(value, count, argument)
    for index, item in enumerate(values):
        if not isinstance(item, Integral) or isinstance(item, bool) or item < 1:
            name = f"{argument}[{index}]" if isinstance(value, (list, tuple)) else argument
            raise ValueError(f"`{name}` must be a positive int, got {item!r}.")
    return [int(item) for item in values]


def _is_grid(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _as_id_lists(input_ids: TokenIds, attention_mask: torch.Tensor | None, argument: str) -> list[list[int]]:
    """Prompts as python id lists; a padded tensor is unpadded with its attention mask."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim != 2:
            raise ValueError(f"`{argument}` must be (batch, length), got shape {tuple(input_ids.shape)}.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return [row[keep.bool()].tolist() for row, keep in zip(input_ids.cpu(), mask.cpu())]
    return [[int(t) for t in ids] for ids in input_ids]


def _unconditional_prompts(input_ids, attention_mask: torch.Tensor | None, count: int) -> list:
    """Per request, the unconditional prompt as given (``None`` allowed; see :func:`_check_guidance`)."""
    unconditional = (
        _as_id_lists(input_ids, attention_mask, "unconditional_input_ids")
        if isinstance(input_ids, torch.Tensor)
        else _per_request(input_ids, count, "unconditional_input_ids")
    )
    if len(unconditional) != count:
        raise ValueError(
            f"`unconditional_input_ids` has {len(unconditional)} rows but there are {count} prompts."
        )
    return unconditional


def _check_cache(cache_implementation: str, compile: bool) -> None:
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"`cache_implementation`={cache_implementation!r} is not one of {CACHE_IMPLEMENTATIONS}."
        )
    if compile and cache_implementation == "dynamic":
        raise ValueError(
            "`compile=True` needs a cache of fixed buffers: cache_implementation 'preallocated' or "
            "'static', not 'dynamic'."
        )


def _check_requests(
    model: UniMMGenerationMixin,
    prompts: list[list[int]],
    modes: list[str],
    grids: list,
    scales: list[float],
    unconditional: list,
    max_new_tokens: list[int],
) -> tuple[list[tuple[int, int]], list[int]]:
    """Check every request; returns the requested grids ((0, 0) = the model chooses) and token budgets.
    Unconditional prompts of guided requests are normalised to id lists in place."""
    vocabulary, requested, budgets = model.vocabulary, [], []
    for index, prompt in enumerate(prompts):
        check_prompt(vocabulary, prompt, f"input_ids[{index}]")
        _check_guidance(vocabulary, index, scales[index], unconditional)
        grid = grids[index]
        if grid is None and modes[index] == "image":
            grid = (model.config.default_grid_height, model.config.default_grid_width)
        if grid is not None:
            if not _is_grid(tuple(grid)):
                raise ValueError(
                    f"`image_grid[{index}]` must be a (height, width) pair of ints, got {grid!r}."
                )
            vocabulary.check_grid(*grid, argument=f"image_grid[{index}]")
        requested.append(tuple(grid) if grid is not None else (0, 0))
        budget = vocabulary.image_sequence_length(*grid) if modes[index] == "image" else max_new_tokens[index]
        _check_context(model, len(prompt), budget, f"input_ids[{index}]")
        budgets.append(budget)
    return requested, budgets


def _check_guidance(vocabulary: ImageVocabulary, index: int, scale: float, unconditional: list) -> None:
    if not math.isfinite(scale) or scale < 1.0:  # NaN passes a plain `< 1`
        raise ValueError(
            f"`guidance_scale[{index}]`={scale} must be a finite number >= 1 (1 disables guidance)."
        )
    if scale > 1.0:
        if unconditional[index] is None:
            raise ValueError(
                f"`unconditional_input_ids[{index}]` is required with guidance_scale > 1: the prompt with "
                "its text dropped (UniMMProcessor(..., return_unconditional=True) renders it)."
            )
        unconditional[index] = [int(t) for t in unconditional[index]]
        check_prompt(vocabulary, unconditional[index], f"unconditional_input_ids[{index}]")


def check_prompt(vocabulary: ImageVocabulary, ids: list[int], argument: str) -> None:
    """Empty prompts, ids off the vocabulary and image tokens outside a well-formed image are errors."""
    if not ids:
        raise ValueError(f"`{argument}` is empty; every prompt needs at least one token (e.g. BOS).")
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocabulary.vocab_size:
        raise ValueError(
            f"`{argument}` holds ids in {low}..{high}; valid ids are 0..{vocabulary.vocab_size - 1}."
        )
    if high < vocabulary.text_vocab_size:
        return
    position = 0
    while position < len(ids):
        if ids[position] < vocabulary.text_vocab_size:
            position += 1
            continue
        if ids[position] != vocabulary.boi_token_id:
            raise ValueError(
                f"`{argument}`: image token {ids[position]} at position {position} is not inside an image "
                "`<|boi|> <|h|> <|w|> rows <|eoi|>` on the grid."
            )
        try:
            end = ids.index(vocabulary.eoi_token_id, position)
            vocabulary.token_ids_to_image(ids[position : end + 1])
        except ValueError as error:
            raise ValueError(f"`{argument}`: malformed image at position {position}: {error}") from None
        position = end + 1


def _check_context(model: UniMMGenerationMixin, length: int, budget: int, argument: str) -> None:
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is not None and length + budget > limit:
        raise ValueError(
            f"`{argument}` ({length} tokens) plus {budget} new tokens exceeds the context of {limit} "
            "positions; shorten the prompt or lower `max_new_tokens` / the image grid."
        )


def _is_seed(value) -> bool:
    if not isinstance(value, Integral) or isinstance(value, bool):
        return False
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(
            f"a seed must be a 64-bit integer (in {SEED_RANGE[0]}..{SEED_RANGE[1]}), got {value}."
        )
    return True


def _generators(
    seed, generator: torch.Generator | None, count: int, device: torch.device
) -> tuple[torch.Generator | None, list[torch.Generator | None] | None]:
    """One generator for the whole batch (``seed`` an int or None, or ``generator``), or, for a list of
    per-request seeds, a generator per seeded request."""
    if seed is None or _is_seed(seed):
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        return generator, None
    if not isinstance(seed, (list, tuple)):
        raise ValueError(f"`seed` must be an int, None or a list of ints/None per prompt, got {seed!r}.")
    if generator is not None:
        raise ValueError("pass either `generator` or a list of per-request `seed`s, not both.")
    if len(seed) != count:
        raise ValueError(f"`seed` has {len(seed)} entries but there are {count} prompts.")
    generators = []
    for index, value in enumerate(seed):
        if value is not None and not _is_seed(value):
            raise ValueError(f"`seed[{index}]` must be an int or None, got {value!r}.")
        generators.append(None if value is None else torch.Generator(device=device).manual_seed(int(value)))
    return None, generators


def _streamers(streamer, count: int, repeats: list[int]) -> list[tuple[int, BaseStreamer]]:
    """``(row, streamer)`` pairs: a single streamer takes a call of one row, a list one per request."""
    if streamer is None:
        return []
    if not isinstance(streamer, (list, tuple)):
        if sum(repeats) != 1:
            raise ValueError(
                f"a single `streamer` takes one row; this call has {sum(repeats)} rows: pass a list of "
                "streamers, one per request (None for the requests not streamed)."
            )
        return [(0, streamer)]
    if len(streamer) != count:
        raise ValueError(f"`streamer` has {len(streamer)} entries but there are {count} prompts.")
    if any(repeat != 1 for repeat in repeats):
        raise ValueError("a list of `streamer`s needs num_images_per_prompt=1: a streamer takes one row.")
    return [(row, item) for row, item in enumerate(streamer) if item is not None]
