"""One decode loop for text answers, images and interleaved output, batched with mixed requests.

:meth:`UniMMGenerationMixin.generate_multimodal` runs conditional rows and, for requests with guidance,
their unconditional rows in the same forward pass over one KV cache (a transformers ``DynamicCache`` whose
layers write into preallocated buffers, see ``kv_cache.py``):

1. validate the requests and left-pad all rows into one batch (unconditional rows after conditional ones);
2. prefill the cache with the prompts;
3. per step: logits (image slice only while every row is in an image), classifier-free guidance on
   rows inside images, the constraint state machine's mask and forced tokens, per-modality sampling
   (noise from one generator for the batch, or from each request's own, see ``RequestNoise``), text
   tokens to the streamers;
4. feed the chosen tokens back; an unconditional row sees only image tokens (its context is the prompt
   with the text dropped, the rule training uses), the generated text is masked out of its attention.

Step 4 and the next step 3 form one function (:meth:`UniMMGenerationMixin._decode_and_choose`), which
``compile=True`` turns into one graph. A batch of image requests of known grids knows every step's
constraints up front (``ConstraintState.schedule``): it needs no per-step state updates or host syncs, and
the steps whose tokens are all forced take no forward of their own (``<|boi|> <|h|> <|w|>`` join the
prompts, each ``<|eol|>`` is fed with the code before it, the closing tokens are only written).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .constraints import CLASS_CODES, DONE, IMAGE, ConstraintState, build_mask_table
from .decode_kernels import FusedDecodeMode, packed_weight_cache
from .kv_cache import preallocated_cache, set_cache_length
from .sampling import ModalitySampling, RequestNoise, RowSampler, uniform_noise

MODES = ("text", "image", "interleaved")
CACHE_IMPLEMENTATIONS = ("preallocated", "dynamic", "static")
# Graphs dynamo may keep for the compiled decode step: 2 caches x greedy/sampled x full/image head slice x
# 1 or 2 fed tokens, with room for the text-only variants and the first, static-shape compiles.
COMPILED_STEP_KINDS = 64
TokenIds = Sequence[Sequence[int]] | torch.Tensor
# step(input_ids (R, T), attention_mask, position_ids (R, T), cache, start) -> last hidden states (R, D)
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache, int], torch.Tensor]


@dataclass
class UniMMGenerationOutput(ModelOutput):
    """Output of :meth:`UniMMGenerationMixin.generate_multimodal`.

    Attributes:
        sequences: ``(N, L)`` generated token ids (prompt excluded), right-padded with ``pad_token_id``;
            ``N`` is the total of ``num_images_per_prompt`` over the requests, request-major.
        sequence_lengths: ``(N,)`` number of generated tokens per row.
        image_token_ids: per row, the ``(h, w)`` codebook-index grid of every complete generated image.
    """

    sequences: torch.LongTensor | None = None
    sequence_lengths: torch.LongTensor | None = None
    image_token_ids: list[list[torch.LongTensor]] | None = None


@dataclass
class TokenChoice:
    """What stays fixed over one call's decode steps when choosing the next tokens.

    Attributes:
        sampler: per-modality sampling of the N conditional rows.
        guided_index: ``(U,)`` conditional row of each unconditional row (rows ``N..N+U`` of the batch).
        guidance: ``(U, 1)`` float32 guidance scale of each unconditional row's request.
        mask_table: ``(classes, V)`` float32 additive constraint masks (``None``: a text-only batch).
        end: end of the vocabulary slice the head computes (the text vocabulary for a text-only batch).
    """

    sampler: RowSampler
    guided_index: torch.Tensor
    guidance: torch.Tensor
    mask_table: torch.Tensor | None
    end: int

    @property
    def device(self) -> torch.device:
        """Where the logits come out (the head's device): every tensor that meets them lives there."""
        return self.guided_index.device


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


# What ``torch.Generator.manual_seed`` takes: any 64-bit integer, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_seed(value) -> bool:
    if not isinstance(value, Integral) or isinstance(value, bool):
        return False
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(
            f"a seed must be a 64-bit integer (in {SEED_RANGE[0]}..{SEED_RANGE[1]}), got {value}."
        )
    return True


def _request_noise(
    seed, generator: torch.Generator | None, repeats: list[int], vocab_size: int, device: torch.device
) -> tuple[torch.Generator | None, RequestNoise | None]:
    """One generator for the whole batch (``seed`` an int or None, or ``generator``), or, for a list of
    per-request seeds, a :class:`RequestNoise` with a generator per seeded request."""
    if seed is None or _is_seed(seed):
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        return generator, None
    if not isinstance(seed, (list, tuple)):
        raise ValueError(f"`seed` must be an int, None or a list of ints/None per prompt, got {seed!r}.")
    if generator is not None:
        raise ValueError("pass either `generator` or a list of per-request `seed`s, not both.")
    if len(seed) != len(repeats):
        raise ValueError(f"`seed` has {len(seed)} entries but there are {len(repeats)} prompts.")
    generators = []
    for index, value in enumerate(seed):
        if value is not None and not _is_seed(value):
            raise ValueError(f"`seed[{index}]` must be an int or None, got {value!r}.")
        generators.append(None if value is None else torch.Generator(device=device).manual_seed(int(value)))
    return None, RequestNoise(generators, repeats, vocab_size, device)


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


# Per module class, once: UniMMForCausalLM.forward asks on every call (training steps, plain generate). A dict
# rather than functools.cache, which dynamo warns about when the compiled decode step looks it up.
_CACHE_KEYWORDS: dict[type, tuple[str, bool]] = {}


def _cache_keywords(module: nn.Module) -> tuple[str, bool]:
    """``(name of the KV-cache argument, whether cache_position is taken)`` of ``module.forward``.
    transformers renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40) and dropped
    ``cache_position`` (caches count their own length); earlier 5.x releases take the old names."""
    module_class = type(module)
    keywords = _CACHE_KEYWORDS.get(module_class)
    if keywords is None:
        parameters = inspect.signature(module_class.forward).parameters
        keywords = ("cache" if "cache" in parameters else "past_key_values"), "cache_position" in parameters
        _CACHE_KEYWORDS[module_class] = keywords
    return keywords


def _compiles_fullgraph(attn_implementation: str | None) -> bool:
    """Whether the compiled decode step is one graph. transformers' flash attention (``flash_attention_2``,
    ``_3``, hub kernels: any name with "flash", its own test) unpads padded rows through ``nonzero`` and
    ``.item()``, which ``fullgraph=True`` refuses, and guidance rows always carry padding. Such a step
    compiles with graph breaks there; SDPA and eager attention take the padding as a mask, in one graph."""
    return "flash" not in (attn_implementation or "")


def _execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs: the device its accelerate hook names (a device map that offloads to "cpu" or
    "disk" leaves its weights on the meta device between calls), else its weight's."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return module.weight.device if device is None else torch.device(device)


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


class UniMMGenerationMixin:
    """Adds :meth:`generate_multimodal` to :class:`~unimm.llm.UniMMForCausalLM`."""

    def _validate_prompt(self, ids: list[int], argument: str) -> None:
        """Empty prompts, ids off the vocabulary and image tokens outside a well-formed image are errors."""
        vocabulary = self.vocabulary
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

    def _check_context(self, length: int, budget: int, argument: str) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and length + budget > limit:
            raise ValueError(
                f"`{argument}` ({length} tokens) plus {budget} new tokens exceeds the context of {limit} "
                "positions; shorten the prompt or lower `max_new_tokens` / the image grid."
            )

    def _logits_device(self) -> torch.device:
        """The device the logits come out on: the head's. With ``device_map="auto"`` over several devices the
        embedding (where the fed tokens go) sits on the first and the head on the last; every tensor of the
        loop that meets the logits (constraint state, masks, guidance, sampling, noise) is made here."""
        return _execution_device(self.get_output_embeddings())

    # no_grad rather than inference_mode: the returned ids must stay usable in autograd code downstream.
    @torch.no_grad()
    def generate_multimodal(
        self,
        input_ids: TokenIds,
        attention_mask: torch.Tensor | None = None,
        mode: str | Sequence[str] = "text",
        image_grid: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        guidance_scale: float | Sequence[float] = 1.0,
        unconditional_input_ids: TokenIds | None = None,
        unconditional_attention_mask: torch.Tensor | None = None,
        text_sampling: ModalitySampling | None = None,
        image_sampling: ModalitySampling | None = None,
        max_new_tokens: int | Sequence[int] = 256,
        num_images_per_prompt: int | Sequence[int] = 1,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | Sequence[int | None] | None = None,
        streamer: BaseStreamer | Sequence[BaseStreamer | None] | None = None,
        cache_implementation: str = "preallocated",
        compile: bool = False,
    ) -> UniMMGenerationOutput:
        """Generate text, images or interleaved output for a batch of (possibly mixed) requests.

        Args:
            input_ids: the prompts, as lists of ids (any lengths) or a ``(B, T)`` tensor with
                ``attention_mask`` (left or right padding).
            mode: per request or for all: ``"text"`` (no image tokens), ``"image"`` (exactly one image,
                then stop) or ``"interleaved"`` (the model opens images itself).
            image_grid: ``(height, width)`` in codes, per request or for all. ``None``: image mode uses
                ``config.default_grid_height/width``; interleaved lets the model write the size tokens.
            guidance_scale: classifier-free guidance per request (>= 1; 1 disables it). Active only
                inside images: ``logits = uncond + scale * (cond - uncond)``.
            unconditional_input_ids: per request, the prompt with its text dropped (``drop_text``, as
                rendered by ``UniMMProcessor``); required for requests with ``guidance_scale > 1``,
                ``None`` entries allowed for the others.
            text_sampling, image_sampling: sampling of text tokens (default greedy) and of image codes
                (default: sampling at temperature 1).
            max_new_tokens: budget of text and interleaved requests, per request or for all; an image
                request writes exactly its image.
            num_images_per_prompt: rows per request, per request or for all (request-major in the output).
            eos_token_id, pad_token_id: default to the generation config / text config.
            generator, seed: randomness of sampling. An int ``seed`` (or ``generator``) is one generator
                for the whole batch: a request's sampled tokens then depend on the other requests.
                A list of seeds, one per request, gives each seeded request its own generator, from which
                all its rows draw: the request then samples the same tokens in any batch as alone with
                ``seed=[s]`` (as far as the model's logits are batch-invariant; greedy decoding always
                is). Its stream differs from the int seed's. ``None`` entries draw from torch's default
                generator (``torch.manual_seed`` makes them reproducible). Each seeded request takes
                ``rows x vocab_size`` uniform numbers per step, drawn a few steps at a time.
                A generator may live on another device than the model (a CPU generator with a CUDA model):
                the noise is drawn on the generator's device and moved.
            streamer: a transformers streamer for a call of one row, or a list with one streamer (or
                ``None``) per request, with ``num_images_per_prompt=1``. Each is fed its request's
                prompt ``(1, T)``, then its text tokens ``(1,)`` as they are chosen (image tokens are
                skipped), and ``end()`` when its row is done.
            cache_implementation: ``"preallocated"`` (a ``DynamicCache`` whose layers write in place into
                buffers reserved for the longest row, see ``unimm.llm.kv_cache``), ``"dynamic"``
                (transformers' ``DynamicCache``, concatenates per step) or ``"static"`` (``StaticCache``).
            compile: run each decode step (backbone, head, guidance, constraint mask, sampling) as one
                ``torch.compile`` graph (inductor, dynamic shapes: one graph per kind of step serves every
                batch size and length), with the ``"preallocated"`` or ``"static"`` cache. The sampling noise
                is drawn outside the graph from the same generators, so a seed gives the eager tokens up to
                floating-point reassociation in the fused kernels. With flash attention, whose unpadding
                of padded rows reads the mask on the host, the step compiles as graphs around that
                unpadding. The first call per model and kind of batch compiles (a minute on a laptop CPU).
                On a CPU, batches of more than a few rows multiply by oneDNN copies of the linear weights
                packed for the call: while it runs, those weights take twice their memory.
        """
        vocabulary = self.vocabulary
        device = self._logits_device()
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
        image_sampling = image_sampling or ModalitySampling(do_sample=True)
        text_sampling.validate("text_sampling")
        image_sampling.validate("image_sampling")
        repeats = _positive_ints(num_images_per_prompt, count, "num_images_per_prompt")
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"`cache_implementation`={cache_implementation!r} is not one of {CACHE_IMPLEMENTATIONS}."
            )
        if compile and cache_implementation == "dynamic":
            raise ValueError(
                "`compile=True` needs a cache of fixed buffers: cache_implementation 'preallocated' or "
                "'static', not 'dynamic'."
            )
        max_new_tokens = _positive_ints(max_new_tokens, count, "max_new_tokens")
        unconditional = (
            _as_id_lists(unconditional_input_ids, unconditional_attention_mask, "unconditional_input_ids")
            if isinstance(unconditional_input_ids, torch.Tensor)
            else _per_request(unconditional_input_ids, count, "unconditional_input_ids")
        )
        if len(unconditional) != count:
            raise ValueError(
                f"`unconditional_input_ids` has {len(unconditional)} rows but there are {count} prompts."
            )

        requested, budgets = self._validate_requests(
            prompts, modes, grids, scales, unconditional, max_new_tokens
        )

        # Expand requests into rows: conditional rows first, then the unconditional rows of guided requests.
        rows = [i for i in range(count) for _ in range(repeats[i])]
        num_rows = len(rows)
        guided_rows = [r for r, i in enumerate(rows) if scales[i] > 1.0]
        streams = _streamers(streamer, count, repeats)
        generator, request_noise = _request_noise(seed, generator, repeats, vocabulary.vocab_size, device)

        eos = self._resolve_eos(eos_token_id)
        pad = self._resolve_pad(pad_token_id, eos)
        sequences = [prompts[i] for i in rows] + [unconditional[rows[r]] for r in guided_rows]

        def row_tensor(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)

        state = ConstraintState(
            vocabulary,
            image_mode=row_tensor([modes[i] == "image" for i in rows], torch.bool),
            allow_image=row_tensor([modes[i] == "interleaved" for i in rows], torch.bool),
            requested_grid=row_tensor([requested[i] for i in rows]),
            budget=row_tensor([budgets[i] for i in rows]),
            eos_token_ids=row_tensor(eos),
            pad_token_id=pad,
        )
        guided_index = row_tensor(guided_rows)
        guidance = row_tensor([scales[rows[r]] for r in guided_rows], torch.float32).unsqueeze(-1)  # (U, 1)
        for row, row_streamer in streams:  # a streamed request has one row: rows and requests coincide
            row_streamer.put(torch.tensor([prompts[row]]))
        # One compiled step serves every batch size and length, but dynamo keeps a graph per kind of step (cache
        # type, greedy or sampled, full or image slice of the head, one token or a code with its <|eol|>), more
        # than its default limit of graphs per function once a process mixes them. Weights the compiled CPU step
        # packs for oneDNN are packed once per call.
        limit = max(COMPILED_STEP_KINDS, torch._dynamo.config.recompile_limit)
        with (
            torch._dynamo.config.patch(recompile_limit=limit) if compile else contextlib.nullcontext(),
            packed_weight_cache(self) if compile else contextlib.nullcontext(),
        ):
            generated, lengths = self._decode_loop(
                sequences,
                num_rows,
                state,
                guided_index,
                guidance,
                text_sampling,
                image_sampling,
                generator,
                request_noise,
                streams,
                cache_implementation,
                compile,
            )
        return self._collect_outputs(generated, lengths)

    def _validate_requests(
        self,
        prompts: list[list[int]],
        modes: list[str],
        grids: list,
        scales: list[float],
        unconditional: list,
        max_new_tokens: list[int],
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Check every request; returns the requested grids ((0, 0) = the model chooses) and token budgets.
        Unconditional prompts of guided requests are normalised to id lists in place."""
        vocabulary = self.vocabulary
        requested, budgets = [], []
        for index in range(len(prompts)):
            self._validate_prompt(prompts[index], f"input_ids[{index}]")
            if not math.isfinite(scales[index]) or scales[index] < 1.0:  # NaN passes a plain `< 1`
                raise ValueError(
                    f"`guidance_scale[{index}]`={scales[index]} must be a finite number >= 1 (1 disables guidance)."
                )
            if scales[index] > 1.0:
                if unconditional[index] is None:
                    raise ValueError(
                        f"`unconditional_input_ids[{index}]` is required with guidance_scale > 1: the prompt with "
                        "its text dropped (UniMMProcessor(..., return_unconditional=True) renders it)."
                    )
                unconditional[index] = [int(t) for t in unconditional[index]]
                self._validate_prompt(unconditional[index], f"unconditional_input_ids[{index}]")
            grid = grids[index]
            if grid is None and modes[index] == "image":
                grid = (self.config.default_grid_height, self.config.default_grid_width)
            if grid is not None:
                if not _is_grid(tuple(grid)):
                    raise ValueError(
                        f"`image_grid[{index}]` must be a (height, width) pair of ints, got {grid!r}."
                    )
                vocabulary.check_grid(*grid, argument=f"image_grid[{index}]")
            requested.append(tuple(grid) if grid is not None else (0, 0))
            budget = (
                vocabulary.image_sequence_length(*grid) if modes[index] == "image" else max_new_tokens[index]
            )
            self._check_context(len(prompts[index]), budget, f"input_ids[{index}]")
            budgets.append(budget)
        return requested, budgets

    def _resolve_eos(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(self.config.text_config, "eos_token_id", None)
        if eos_token_id is None:
            return []
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]

    def _resolve_pad(self, pad_token_id: int | None, eos: list[int]) -> int:
        if pad_token_id is None:
            pad_token_id = getattr(self.generation_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(self.config.text_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        return int(pad_token_id)

    def _decode_loop(
        self,
        sequences: list[list[int]],
        num_rows: int,
        state: ConstraintState,
        guided_index: torch.Tensor,
        guidance: torch.Tensor,
        text_sampling: ModalitySampling,
        image_sampling: ModalitySampling,
        generator: torch.Generator | None,
        request_noise: RequestNoise | None,
        streams: list[tuple[int, BaseStreamer]],
        cache_implementation: str,
        compile: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vocabulary = self.vocabulary
        device = guided_index.device
        max_steps = int(state.budget.max())
        static = cache_implementation == "static"
        text_only = state.text_only
        # Image-only batches know every step's constraints up front: no state updates, no host syncs.
        schedule = state.schedule() if state.is_deterministic else None
        # Steps where every row's token is forced need no logits: a scheduled batch's leading
        # <|boi|> <|h|> <|w|> join the prompts, and each <|eol|> is fed with the code before it.
        all_forced = (schedule.forced >= 0).all(-1).tolist() if schedule is not None else [False]
        lead = min(all_forced.index(False) if False in all_forced else max_steps, max_steps - 1)
        if lead:
            header = schedule.forced[:lead].T.tolist()  # (N, lead)
            sequence_rows = list(range(num_rows)) + guided_index.tolist()
            sequences = [ids + header[row] for ids, row in zip(sequences, sequence_rows)]
        hidden, cache, attention_mask, next_position = self._prefill_prompts(
            sequences, max_steps - lead, cache_implementation
        )
        column = attention_mask.shape[1] - (max_steps - lead)  # next cache position to write
        image_start = vocabulary.text_vocab_size
        choice = self._token_choice(
            text_sampling, image_sampling, guided_index, guidance, text_only, schedule is not None
        )

        def plan(step: int) -> tuple[torch.Tensor, ...]:
            """``(mask_class, forced, in_image, unfinished)`` of the next token, each ``(N,)``."""
            if schedule is not None:
                return (
                    schedule.mask_class[step],
                    schedule.forced[step],
                    schedule.in_image[step],
                    schedule.unfinished[step],
                )
            return (*state.plan(), state.phase == IMAGE, state.phase != DONE)

        def noise(offset: int) -> torch.Tensor | None:
            """Uniform sampling noise ``(N, end - offset)``, drawn outside the (compiled) step from the generators."""
            if not choice.sampler.any_sample:
                return None
            if request_noise is not None:
                return request_noise(offset, choice.end)
            return uniform_noise((num_rows, choice.end - offset), generator, device)

        def skip_noise(steps: int) -> None:
            """Per-request streams advance on steps whose tokens are all forced too, as in any other batch."""
            if request_noise is not None and choice.sampler.any_sample:
                for _ in range(steps):
                    request_noise()

        # SDPA takes the decode mask as a 4-D bool view, which skips transformers' per-step mask building;
        # other attention implementations get the 2-D mask. Without padding a one-token step needs no mask at
        # all, which lets SDPA run GQA without copying the keys (repeat_kv) and pick its flash kernel.
        # Padding: prompts of different lengths, a static cache's unwritten tail, unconditional rows' text.
        four_d_mask = self.config.text_config._attn_implementation == "sdpa"
        padded = static or bool(guided_index.numel()) or len({len(ids) for ids in sequences}) > 1
        output = torch.full((num_rows, max_steps), state.pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
        if lead:
            output[:, :lead] = schedule.forced[:lead].T
            lengths += schedule.unfinished[:lead].sum(0)
        decode_and_choose = self._compiled_decode_and_choose() if compile else self._decode_and_choose
        # Compiled steps of a kind (width, head slice, sampled or greedy) that has passed dynamo's full guards
        # twice in this loop (the second time past any specialisation on the first step's sizes) skip them:
        # nothing the guards check changes within one loop, and they cost ~0.2 ms a step, 10% of a small model's.
        full_guard_runs: dict[tuple[int, int, bool], int] = {}
        step = lead
        skip_noise(lead)
        mask_class, forced, in_image, unfinished = plan(step)
        next_tokens = self._choose_tokens(hidden, choice, 0, in_image, mask_class, forced, noise(0))
        open_streams = dict(streams)  # row -> streamer, until the row is done
        while step < max_steps:
            lengths += unfinished
            output[:, step] = next_tokens
            if schedule is None:
                part_of_image = state.advance(next_tokens)
                # One host sync per step: stop when every row is done; note whether all are in images.
                still_running = state.phase != DONE
                if text_only:
                    any_unfinished, any_outside_image = bool(still_running.any()), True
                else:
                    any_unfinished, any_outside_image = torch.stack(
                        [still_running.any(), (still_running & (state.phase != IMAGE)).any()]
                    ).tolist()
                forced_until, block_part = step + 1, part_of_image[:, None]
            else:
                any_outside_image = False
                forced_until = step + 1  # the forced steps that follow go into the same forward
                while forced_until < max_steps and all_forced[forced_until]:
                    forced_until += 1
                output[:, step + 1 : forced_until] = schedule.forced[step + 1 : forced_until].T
                lengths += schedule.unfinished[step + 1 : forced_until].sum(0)
                any_unfinished = forced_until < max_steps
                skip_noise(forced_until - step - 1)
                part_of_image = schedule.part_of_image[step]
                block_part = schedule.part_of_image[step:forced_until].T  # (N, T)
            if open_streams:
                text = unfinished & ~part_of_image & (next_tokens < image_start)
                done = None if schedule is not None else ~still_running
                self._stream_step(open_streams, next_tokens, text, done)
            if not any_unfinished:
                break
            block = output[:, step:forced_until]  # (N, T) tokens fed in this forward
            width = block.shape[1]
            feed, visible = self._feed_rows(block, block_part, guided_index, attention_mask.device)
            attention_mask[:, column : column + width] = visible
            positions = next_position[:, None] + visible.cumsum(-1) - 1  # (R, T)
            next_position = positions[:, -1] + 1
            step = forced_until
            mask_class, forced, in_image, unfinished = plan(step)
            # While every unfinished row is inside an image, only the image slice of the head is needed.
            offset = image_start if not any_outside_image else 0
            uniform = noise(offset)
            kind = (width, offset, uniform is None)
            warm = compile and full_guard_runs.get(kind, 0) >= 2
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if warm else contextlib.nullcontext():
                next_tokens = decode_and_choose(
                    feed,
                    self._step_mask(attention_mask, column, width, static, four_d_mask, padded),
                    positions,
                    cache,
                    column,
                    choice,
                    offset,
                    in_image,
                    mask_class,
                    forced,
                    uniform,
                )  # (N,)
            if not warm:
                full_guard_runs[kind] = full_guard_runs.get(kind, 0) + 1
            column += width
        for row_streamer in open_streams.values():
            row_streamer.end()
        return output[:, : int(lengths.max())], lengths

    def _token_choice(
        self,
        text_sampling: ModalitySampling,
        image_sampling: ModalitySampling,
        guided_index: torch.Tensor,
        guidance: torch.Tensor,
        text_only: bool,
        scheduled: bool,
    ) -> TokenChoice:
        """What chooses the tokens over one call's steps, on the device of ``guided_index`` (the logits')."""
        vocabulary, device = self.vocabulary, guided_index.device
        # A text-only batch never samples image codes, and a scheduled batch never samples text (every token
        # outside the codes is forced): its sampler then holds one modality's parameters, with no second pass.
        modalities = (text_sampling,) * 2 if text_only else (image_sampling,) * 2 if scheduled else None
        return TokenChoice(
            sampler=RowSampler(*(modalities or (text_sampling, image_sampling)), device),
            guided_index=guided_index,
            guidance=guidance,
            mask_table=None if text_only else build_mask_table(vocabulary, device, torch.float32),
            end=vocabulary.text_vocab_size if text_only else vocabulary.vocab_size,
        )

    @staticmethod
    def _feed_rows(
        block: torch.Tensor, block_part: torch.Tensor, guided_index: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of all R rows for one forward and whether each is visible to later steps, both ``(R, T)``,
        from the conditional rows' ``block`` ``(N, T)``: each unconditional row is fed its conditional row's
        tokens but sees only those that are part of an image (``block_part``, ``(N, T)`` or ``(N, 1)``). Built
        where the tokens were chosen, returned on ``device``, the embedding's (with ``device_map="auto"``
        not the head's)."""
        visible = torch.ones_like(block, dtype=torch.bool)
        if guided_index.numel():
            unconditional_visible = block_part[guided_index].expand(-1, block.shape[1])  # (U, T)
            block = torch.cat([block, block[guided_index]])
            visible = torch.cat([visible, unconditional_visible])
        return block.to(device), visible.to(device)

    @staticmethod
    def _step_mask(
        attention_mask: torch.Tensor, column: int, width: int, static: bool, four_d: bool, padded: bool
    ) -> torch.Tensor | None:
        """The attention mask of a forward over ``width`` new tokens written from cache position ``column``:
        the 2-D ``(R, T)`` mask, or for SDPA a 4-D bool ``(R, 1, width, T)`` (causal among the new tokens);
        ``None`` for one token when no row is ``padded`` (every cached position visible to every row)."""
        if width == 1 and not padded:
            return None
        step_mask = attention_mask if static else attention_mask[:, : column + width]
        if not four_d:
            return step_mask.long()
        step_mask = step_mask[:, None, None, :]  # (R, 1, 1, T)
        if width == 1:  # a single query needs no causal structure
            return step_mask
        keys = torch.arange(step_mask.shape[-1], device=step_mask.device)
        queries = column + torch.arange(width, device=step_mask.device)
        return step_mask & (keys <= queries[:, None])  # (R, 1, width, T)

    def _choose_tokens(
        self,
        hidden: torch.Tensor,
        choice: TokenChoice,
        offset: int,
        in_image: torch.Tensor,
        mask_class: torch.Tensor,
        forced: torch.Tensor,
        uniform: torch.Tensor | None,
    ) -> torch.Tensor:
        """Next tokens ``(N,)`` from last hidden states ``(R, D)``: logits of the vocabulary from ``offset`` on,
        guidance on rows inside images, the constraint mask of each row's class, sampling with the noise
        ``uniform`` ``(N, end - offset)`` (``None`` for greedy), and the forced tokens (``-1`` = free).

        The hidden states come from the last layer's device, the logits from the head's, where the other
        tensors of ``choice`` and the step live. The logits are guided and sampled in float32: in bfloat16,
        ``uncond + scale * (cond - uncond)`` rounds by 0.125 at logits of 16-32, times scales up to 50."""
        hidden = hidden.to(choice.device)
        logits = self.compute_logits(hidden, offset, choice.end).float()  # (R, end - offset)
        conditional = self._guide(logits, forced.shape[0], choice.guided_index, choice.guidance, in_image)
        if choice.mask_table is not None:
            conditional = conditional + choice.mask_table[mask_class, offset : choice.end]
        next_tokens = choice.sampler(conditional, mask_class == CLASS_CODES, None, uniform) + offset
        return torch.where(forced >= 0, forced, next_tokens)

    @staticmethod
    def _stream_step(
        open_streams: dict[int, BaseStreamer],
        next_tokens: torch.Tensor,
        text: torch.Tensor,
        done: torch.Tensor | None,
    ) -> None:
        """Feed each open streamer its row's token if it is text; end (and close) the rows now done."""
        rows = list(open_streams)
        if done is None:  # a precomputed schedule: rows end with the loop
            done = torch.zeros_like(text)
        index = torch.tensor(rows, device=next_tokens.device)
        columns = torch.stack([next_tokens[index], text[index].long(), done[index].long()], dim=-1)
        for row, (token, is_text, is_done) in zip(rows, columns.tolist()):  # one host sync
            if is_text:
                open_streams[row].put(torch.tensor([token]))
            if is_done:
                open_streams.pop(row).end()

    def _prefill_prompts(
        self, sequences: list[list[int]], max_steps: int, cache_implementation: str
    ) -> tuple[torch.Tensor, Cache, torch.Tensor, torch.Tensor]:
        """Left-pad the prompts (every row's last token in the last column) and fill the KV cache.

        Returns the last hidden state ``(R, D)``, the cache, the attention mask ``(R, T + max_steps)``
        (decode columns still 0) and each row's next position ``(R,)``."""
        device = _execution_device(self.get_input_embeddings())
        prompt_length = max(len(ids) for ids in sequences)
        total_length = prompt_length + max_steps
        tokens = torch.zeros(len(sequences), prompt_length, dtype=torch.long, device=device)
        attention_mask = torch.zeros(len(sequences), total_length, dtype=torch.bool, device=device)
        for row, ids in enumerate(sequences):
            tokens[row, prompt_length - len(ids) :] = torch.tensor(ids, device=device)
            attention_mask[row, prompt_length - len(ids) : prompt_length] = True
        prompt_mask = attention_mask[:, :prompt_length]
        static = cache_implementation == "static"
        text_config = self.config.text_config
        if static:  # attention over the whole (masked) preallocated length
            cache = StaticCache(config=text_config, max_cache_len=total_length)
        elif cache_implementation == "preallocated":  # no per-step concatenation, attention over the prefix
            cache = preallocated_cache(text_config, total_length)
        else:
            cache = DynamicCache(config=text_config)
        hidden = self._eager_decode_step()(
            tokens,
            (attention_mask if static else prompt_mask).long(),
            (prompt_mask.long().cumsum(-1) - 1).clamp(min=0),  # (R, T)
            cache,
            0,
        )  # (R, D)
        return hidden, cache, attention_mask, prompt_mask.sum(-1)  # next positions (R,)

    def _eager_decode_step(self) -> DecodeStep:
        """The backbone's forward over ``input_ids`` written from cache position ``start`` on; returns the
        last position's hidden states ``(R, D)``."""
        decoder = self.get_decoder()
        cache_argument, takes_cache_position = _cache_keywords(decoder)

        def step(input_ids, attention_mask, position_ids, cache, start):
            extra = {cache_argument: cache}
            if takes_cache_position:
                extra["cache_position"] = torch.arange(
                    start, start + input_ids.shape[1], device=input_ids.device
                )
            outputs = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **extra,
            )
            return outputs.last_hidden_state[:, -1]

        return step

    def _decode_and_choose(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        start: int,
        choice: TokenChoice,
        offset: int,
        in_image: torch.Tensor,
        mask_class: torch.Tensor,
        forced: torch.Tensor,
        uniform: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decode step: the backbone over ``input_ids`` ``(R, 1)`` written at cache position ``start``, then
        :meth:`_choose_tokens` on its hidden states; returns the next tokens ``(N,)``."""
        set_cache_length(cache, start)  # eager a no-op; compiled, the fill level becomes a graph input
        hidden = self._eager_decode_step()(input_ids, attention_mask, position_ids, cache, start)  # (R, D)
        return self._choose_tokens(hidden, choice, offset, in_image, mask_class, forced, uniform)

    def _compiled_decode_and_choose(self) -> Callable[..., torch.Tensor]:
        """:meth:`_decode_and_choose` through ``torch.compile``, built once per model: the backbone, the head,
        guidance, the constraint mask and sampling fuse into one graph per step. Dynamic shapes keep one graph
        for every cache length and step, and for every batch above a few rows; the preallocated cache's fill
        level is set from ``start`` inside the graph, so it is a symbolic input rather than a constant that
        recompiles. On the CPU, linears of few rows and attention of one or two queries run as fused
        reductions, linears of more rows through oneDNN on packed weights
        (:class:`~unimm.llm.decode_kernels.FusedDecodeMode`; gains in ``benchmarks/generation.py``), with one
        graph per power-of-two bucket of rows. The sampling noise is drawn outside, from the same
        generators as eager decoding. With flash attention (see :func:`_compiles_fullgraph`) the step
        compiles as graphs around the unpadding, without the CPU kernels (flash attention needs a GPU)."""
        fullgraph = _compiles_fullgraph(self.config.text_config._attn_implementation)
        compiled_steps = getattr(self, "_compiled_steps", None)  # fullgraph -> compiled step
        if compiled_steps is None:
            compiled_steps = self._compiled_steps = {}
        if fullgraph not in compiled_steps:

            def decode_and_choose(*args):
                # CPU linears and short attention as fused reductions or packed oneDNN (decode_kernels.py).
                with FusedDecodeMode():
                    return self._decode_and_choose(*args)

            step = decode_and_choose if fullgraph else self._decode_and_choose
            compiled_steps[fullgraph] = torch.compile(step, dynamic=True, fullgraph=fullgraph)
        return compiled_steps[fullgraph]

    @staticmethod
    def _guide(
        logits: torch.Tensor,
        num_rows: int,
        guided_index: torch.Tensor,
        guidance: torch.Tensor,
        in_image: torch.Tensor,
    ) -> torch.Tensor:
        """Conditional rows' logits ``(N, V')``, guided as ``uncond + scale * (cond - uncond)`` where a
        guided row is inside an image; ``logits`` holds the N conditional rows, then the U unconditional."""
        conditional = logits[:num_rows]
        if not guided_index.numel():
            return conditional
        guided_conditional = conditional[guided_index]  # (U, V')
        unconditional = logits[num_rows:]
        guided = unconditional + guidance * (guided_conditional - unconditional)
        use_guidance = in_image[guided_index].unsqueeze(-1)  # (U, 1)
        return conditional.index_copy(0, guided_index, torch.where(use_guidance, guided, guided_conditional))

    def _collect_outputs(self, generated: torch.Tensor, lengths: torch.Tensor) -> UniMMGenerationOutput:
        rows = generated.cpu().tolist()
        images = [
            self.vocabulary.split_images(ids[:length])[1] for ids, length in zip(rows, lengths.tolist())
        ]
        return UniMMGenerationOutput(sequences=generated, sequence_lengths=lengths, image_token_ids=images)
