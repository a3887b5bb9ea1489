"""One decode loop for text answers, images and interleaved output, batched with mixed requests.

:meth:`UniMMGenerationMixin.generate_multimodal` runs conditional rows and, for requests with guidance,
their unconditional rows in the same forward pass over one KV cache (a transformers ``DynamicCache`` whose
layers write into preallocated buffers, see ``kv_cache.py``):

1. check the arguments and normalise them into a :class:`~unimm.llm.generation_request.GenerationRequest`;
2. pick the request's plan (``decode_plans.py``): a precomputed schedule for a batch of image requests of
   known grids, else the constraint state machine;
3. left-pad all rows into one batch (unconditional rows after conditional ones) and prefill the cache;
4. loop: the plan gives the step's constraints, :class:`DecodeSteps` runs the step (logits, classifier-free
   guidance on rows inside images, the constraint mask and forced tokens, per-modality sampling with noise
   from :class:`~unimm.llm.sampling.StepNoise`), the plan records the tokens and answers with the block the
   next forward feeds, :class:`RowStreams` passes text tokens to the streamers (and every token to a
   :class:`~unimm.llm.streamers.BatchStreamer`).

An unconditional row is fed its conditional row's tokens but sees only the image tokens (its context is the
prompt with the text dropped, the rule training uses): the generated text is masked out of its attention.
Feeding a block and choosing the next tokens form one function
(:meth:`UniMMGenerationMixin._decode_and_choose`), which ``compile=True`` turns into one graph.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .constraints import CLASS_CODES, build_mask_table
from .decode_kernels import FusedDecodeMode, packed_weight_cache
from .decode_plans import DecodePlan, FedBlock, StepConstraints, decode_plan
from .generation_request import (
    CACHE_IMPLEMENTATIONS,
    MODES,
    GenerationRequest,
    TokenIds,
    normalise_request,
    resolve_eos_token_ids,
)
from .kv_cache import preallocated_cache, set_cache_length
from .sampling import ModalitySampling, RequestNoise, RowSampler, StepNoise
from .streamers import BatchStreamer

__all__ = ["CACHE_IMPLEMENTATIONS", "MODES", "TokenChoice", "UniMMGenerationMixin", "UniMMGenerationOutput"]

# Graphs dynamo may keep for the compiled decode step: 2 caches x greedy/sampled x full/image head slice x
# 1 or 2 fed tokens, with room for the text-only variants and the first, static-shape compiles.
COMPILED_STEP_KINDS = 64
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


class RowStreams:
    """The streamers of one call. By row: each is fed its request's prompt ``(1, T)``, then its row's text
    tokens ``(1,)`` as they are chosen (image tokens are skipped), and ``end()`` when its row is done. The
    request's :class:`~unimm.llm.streamers.BatchStreamer`, if any, is fed every token of every row ``(N, T)``,
    block by block, starting with the ``header`` written before the first forward."""

    def __init__(self, request: GenerationRequest, image_start: int, header: torch.Tensor):
        self.image_start = image_start
        self.open = dict(request.streamers)  # row -> streamer, until the row is done
        for row, streamer in request.streamers:  # a streamed request has one row: rows and requests coincide
            streamer.put(torch.tensor([request.prompts[row]]))
        self.batch = request.batch_streamer
        if self.batch is not None and header.shape[1]:
            self.batch.put(header)

    def put(self, tokens: torch.Tensor, unfinished: torch.Tensor, block: FedBlock) -> None:
        """Pass each open row its token of ``tokens`` ``(N,)`` if it is text; end the rows now done. The batch
        streamer gets the whole block (the chosen tokens and the forced ones after them)."""
        if self.batch is not None:
            self.batch.put(block.tokens)
        if not self.open:
            return
        text = unfinished & ~block.part_of_image[:, 0] & (tokens < self.image_start)  # (N,)
        # A precomputed schedule's rows end with the loop.
        done = torch.zeros_like(text) if block.running_rows is None else ~block.running_rows
        rows = list(self.open)
        index = torch.tensor(rows, device=tokens.device)
        columns = torch.stack([tokens[index], text[index].long(), done[index].long()], dim=-1)  # (S, 3)
        for row, (token, is_text, is_done) in zip(rows, columns.tolist()):  # one host sync
            if is_text:
                self.open[row].put(torch.tensor([token]))
            if is_done:
                self.open.pop(row).end()

    def end(self) -> None:
        for streamer in self.open.values():
            streamer.end()
        if self.batch is not None:
            self.batch.end()


@dataclass
class DecodeSteps:
    """The model's side of one decode loop: the KV cache, the ``(R, prompt + steps)`` attention mask, every
    row's next position, and the step (eager or compiled) that feeds a block of tokens and chooses the next
    ones.

    Attributes:
        model: the model that decodes.
        cache: the KV cache, prefilled with the prompts.
        choice: what chooses the tokens (sampler, guidance, constraint masks).
        attention_mask: ``(R, T)`` bool, the decode columns written as the blocks are fed.
        next_position: ``(R,)`` position id of each row's next token.
        column: the next cache position to write.
        static: a ``StaticCache``: attention over its whole (masked) length.
        padded: some row has masked positions (prompts of different lengths, a static cache's unwritten tail,
            unconditional rows' text); without, one-token steps need no attention mask.
        compile: run the compiled step (:meth:`UniMMGenerationMixin._compiled_decode_and_choose`).
    """

    model: UniMMGenerationMixin
    cache: Cache
    choice: TokenChoice
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    column: int
    static: bool
    padded: bool
    compile: bool
    # Per kind of compiled step (width, head slice, noise): how often it has run with dynamo's full guards.
    guard_runs: dict[tuple[int, int, bool | None], int] = field(default_factory=dict)

    def __post_init__(self):
        model = self.model
        # SDPA takes the decode mask as a 4-D bool view, which skips transformers' per-step mask building;
        # other attention implementations get the 2-D mask.
        self.four_d_mask = model.config.text_config._attn_implementation == "sdpa"
        self.decode_and_choose = (
            model._compiled_decode_and_choose() if self.compile else model._decode_and_choose
        )

    def first(
        self, hidden: torch.Tensor, constraints: StepConstraints, uniform: torch.Tensor | None
    ) -> torch.Tensor:
        """The first tokens ``(N,)``, from the prefill's last hidden states ``(R, D)``: eager, whole head."""
        in_image, mask_class, forced = constraints.in_image, constraints.mask_class, constraints.forced
        return self.model._choose_tokens(hidden, self.choice, 0, in_image, mask_class, forced, uniform)

    def __call__(
        self, block: FedBlock, constraints: StepConstraints, offset: int, uniform: torch.Tensor | None
    ) -> torch.Tensor:
        """Feed ``block`` and choose the next tokens ``(N,)`` from the head's columns ``offset`` on.

        A compiled kind of step that has passed dynamo's full guards twice in this loop (the second time past
        any specialisation on the first step's sizes) skips them: nothing the guards check changes within one
        loop, and they cost ~0.2 ms a step, 10% of a small model's."""
        input_ids, attention_mask, position_ids, start = self._inputs(block)
        # Dynamo specialises a storage offset of 0: per-request noise hands out views of a draw of several
        # steps, whose first starts at 0 on a full-head step, the others past it.
        noise_at_zero = None if uniform is None else uniform.storage_offset() == 0
        kind = (input_ids.shape[1], offset, noise_at_zero)
        warm = self.compile and self.guard_runs.get(kind, 0) >= 2
        arguments = (
            input_ids, attention_mask, position_ids, self.cache, start, self.choice, offset,
            constraints.in_image, constraints.mask_class, constraints.forced, uniform,
        )  # fmt: skip
        if warm:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self.decode_and_choose(*arguments)
            except RuntimeError as error:
                # A specialisation this key does not capture: dynamo refuses to recompile under the stance,
                # before the step runs. Run it with full guards (and recompile), and count this kind again.
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self.guard_runs[kind] = 0
        next_tokens = self.decode_and_choose(*arguments)
        self.guard_runs[kind] = self.guard_runs.get(kind, 0) + 1
        return next_tokens

    def _inputs(self, block: FedBlock) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """``(input_ids (R, T), the step's attention mask, position_ids (R, T), start)`` of the forward over
        ``block``, written from cache position ``start``; the rows' mask and positions move on past it."""
        model, start = self.model, self.column
        input_ids, visible = model._feed_rows(
            block.tokens, block.part_of_image, self.choice.guided_index, self.attention_mask.device
        )  # (R, T) each
        width = input_ids.shape[1]
        self.attention_mask[:, start : start + width] = visible
        position_ids = self.next_position[:, None] + visible.cumsum(-1) - 1  # (R, T)
        self.next_position = position_ids[:, -1] + 1
        self.column += width
        mask = model._step_mask(self.attention_mask, start, width, self.static, self.four_d_mask, self.padded)
        return input_ids, mask, position_ids, start


class UniMMGenerationMixin:
    """Adds :meth:`generate_multimodal` to :class:`~unimm.llm.UniMMForCausalLM`."""

    def _logits_device(self) -> torch.device:
        """The device the logits come out on: the head's. With ``device_map="auto"`` over several devices the
        embedding (where the fed tokens go) sits on the first and the head on the last; every tensor of the
        loop that meets the logits (constraint state, masks, guidance, sampling, noise) is made here."""
        return _execution_device(self.get_output_embeddings())

    # no_grad rather than inference_mode: the returned ids must stay usable in autograd code downstream. A
    # caller's inference mode is switched off (no_grad inside: inference_mode(False) turns grad mode back on):
    # its tensors break the compiled step (BackendCompilerFailed when AOT autograd merges the cache's views).
    @torch.inference_mode(False)
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
        streamer: BaseStreamer | BatchStreamer | Sequence[BaseStreamer | None] | None = None,
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
                skipped), and ``end()`` when its row is done. Or a
                :class:`~unimm.llm.streamers.BatchStreamer`, for any call: fed every row's tokens, image tokens
                included, block by block (what previews of images are made of).
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
        device = self._logits_device()
        request = normalise_request(
            self, device, input_ids=input_ids, attention_mask=attention_mask, mode=mode,
            image_grid=image_grid, guidance_scale=guidance_scale,
            unconditional_input_ids=unconditional_input_ids,
            unconditional_attention_mask=unconditional_attention_mask,
            text_sampling=text_sampling, image_sampling=image_sampling, max_new_tokens=max_new_tokens,
            num_images_per_prompt=num_images_per_prompt, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, generator=generator, seed=seed, streamer=streamer,
            cache_implementation=cache_implementation, compile=compile,
        )  # fmt: skip
        with self._compiling(request.compile):
            generated, lengths = self._decode_loop(request, device)
        return self._collect_outputs(generated, lengths)

    def _resolve_eos(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        """For ``unimm.serving``: :func:`~unimm.llm.generation_request.resolve_eos_token_ids` is public."""
        return resolve_eos_token_ids(self, eos_token_id)

    @contextlib.contextmanager
    def _compiling(self, compile: bool) -> Iterator[None]:
        """While a compiled call runs: room for every kind of compiled step and the CPU step's packed weights.

        One compiled step serves every batch size and length, but dynamo keeps a graph per kind of step (cache
        type, greedy or sampled, full or image slice of the head, one token or a code with its <|eol|>), more
        than its default limit of graphs per function once a process mixes them. Weights the compiled CPU step
        packs for oneDNN are packed once per call."""
        if not compile:
            yield
            return
        limit = max(COMPILED_STEP_KINDS, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit), packed_weight_cache(self):
            yield

    def _decode_loop(
        self, request: GenerationRequest, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode every row of ``request`` to its end, the loop's tensors on ``device`` (the logits'). Returns
        the generated tokens ``(N, L)`` and their number per row ``(N,)``."""
        image_start = self.vocabulary.text_vocab_size
        plan = decode_plan(self.vocabulary, request, device)
        streams = RowStreams(request, image_start, plan.tokens[:, : plan.first_step])
        guided_index, guidance = request.guidance(device)  # (U,), (U, 1)
        samplings = request.text_sampling, request.image_sampling
        choice = self._token_choice(*samplings, guided_index, guidance, plan.text_only, plan.scheduled)
        hidden, steps = self._start_decoding(request, plan, choice)
        noise = self._step_noise(request, choice, device)
        step = plan.first_step
        noise.skip(step)
        constraints = plan.constraints(step)
        next_tokens = steps.first(hidden, constraints, noise(0))
        while step < plan.max_steps:
            block = plan.advance(step, next_tokens, constraints)
            noise.skip(block.end - step - 1)
            streams.put(next_tokens, constraints.unfinished, block)
            if block.finished:
                break
            step, constraints = block.end, plan.constraints(block.end)
            # While every unfinished row is inside an image, only the image slice of the head is needed.
            offset = 0 if block.outside_image else image_start
            next_tokens = steps(block, constraints, offset, noise(offset))
        streams.end()
        return plan.result()

    def _start_decoding(
        self, request: GenerationRequest, plan: DecodePlan, choice: TokenChoice
    ) -> tuple[torch.Tensor, DecodeSteps]:
        """Prefill the cache with every row's prompt (and the plan's header); returns the last hidden states
        ``(R, D)`` and the steps that decode on from there."""
        sequences, sequence_rows = request.sequences()
        sequences = plan.with_header(sequences, sequence_rows)
        decode_length = plan.max_steps - plan.first_step
        static = request.cache_implementation == "static"
        hidden, cache, attention_mask, next_position = self._prefill_prompts(
            sequences, decode_length, request.cache_implementation
        )
        # Padding: prompts of different lengths, a static cache's unwritten tail, unconditional rows' text.
        # Without it a one-token step needs no attention mask, which lets SDPA run GQA without copying the
        # keys (repeat_kv) and pick its flash kernel.
        padded = static or bool(request.guided_rows) or len({len(ids) for ids in sequences}) > 1
        steps = DecodeSteps(
            model=self, cache=cache, choice=choice, attention_mask=attention_mask,
            next_position=next_position, column=attention_mask.shape[1] - decode_length, static=static,
            padded=padded, compile=request.compile,
        )  # fmt: skip
        return hidden, steps

    def _step_noise(self, request: GenerationRequest, choice: TokenChoice, device: torch.device) -> StepNoise:
        """The sampling noise of the N conditional rows: from the batch's generator, or each request's own."""
        request_noise = None
        if request.request_generators is not None:
            vocab_size = self.vocabulary.vocab_size
            request_noise = RequestNoise(
                request.request_generators, request.images_per_prompt, vocab_size, device
            )
        return StepNoise(
            choice.sampler, len(request.rows), choice.end, request.generator, request_noise, device
        )

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
        """One decode step: the backbone over ``input_ids`` ``(R, T)`` written from cache position ``start``,
        then :meth:`_choose_tokens` on the last hidden states; returns the next tokens ``(N,)``. The arguments
        are flat tensors and ints, not the plan's objects: they are the compiled graph's inputs, which dynamo
        guards and makes dynamic one by one."""
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
