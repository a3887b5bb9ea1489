"""What the server asks of the model: a batch of chat answers (some of them streamed) or a batch of image
requests, each as one call of the generation engine (``UniMMForCausalLM.generate_multimodal``), through public
methods of the pipeline and its components only.

Runs in the batcher's worker thread. A batch of image requests may mix prompts, ``n``, sizes, guidance
scales and seeds: it is one ``UniMMPipeline.generate_images`` call, which takes them per prompt. Chat
requests share one sampling setting per batch (the batcher groups them by it); each has its own
``max_tokens``, seed and, when streamed, its own streamer; the images of all of them are encoded together,
one visual tokenizer call per image size.

Streamed image requests get previews (``partial_images`` per image, the rows written so far through the pixel
decoder) from an :class:`~unimm.pipelines.ImagePreviewStreamer` on the batch's ``generate_images`` call; the
final images are the same as unstreamed.

Seeds: a request with a ``seed`` draws all its randomness from its own generators (the engine's
per-request seeds; the diffusion decoder's noise too), so it gives the same answer or images whatever batch
it lands in: those of ``UniMMPipeline.generate_images(prompt, n, ..., seed=[seed])`` (a list: an int seed
there is one generator for the whole call, another stream) or ``UniMMPipeline.chat(..., seed=[seed])``.
Requests without one draw from torch's default generator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
from transformers import TextStreamer

from unimm.llm import ModalitySampling
from unimm.pipelines import ImagePreviewStreamer, UniMMPipeline
from unimm.pipelines.pipeline_unimm import DEFAULT_DECODER
from unimm.pipelines.previews import ImagePreview

logger = logging.getLogger(__name__)


@dataclass
class ChatJob:
    """One chat answer. ``conversation`` holds transformers chat messages with opened PIL images."""

    conversation: list[dict]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    # Streaming: called with each piece of text as it is generated (in the worker thread).
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set once text went to on_text: the job is not run again after a failed batch (no repeated text).
    streamed: bool = field(default=False, init=False, repr=False)

    @property
    def rows(self) -> int:
        return 1

    @property
    def batch_key(self) -> Hashable | None:
        """Jobs with equal keys may share an engine call (seeds and streaming are per request)."""
        if self.temperature == 0:
            return ("chat", "greedy")
        return ("chat", self.temperature, self.top_p)

    @property
    def sampling(self) -> ModalitySampling:
        if self.temperature == 0:
            return ModalitySampling()
        return ModalitySampling(do_sample=True, temperature=self.temperature, top_p=self.top_p)


@dataclass
class ChatAnswer:
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ImageJob:
    """``n`` images of one prompt on a ``(height, width)`` code grid."""

    prompt: str
    n: int
    grid: tuple[int, int]
    guidance_scale: float = 3.0
    seed: int | None = None
    # Streaming: `partial_images` previews of each image, each handed to `on_preview(image_index,
    # partial_image_index, image)` in the worker thread.
    partial_images: int = 0
    on_preview: Callable[[int, int, PIL.Image.Image], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set once a preview went out: the job is not run again after a failed batch (no repeated previews).
    streamed: bool = field(default=False, init=False, repr=False)
    # Set by the engine for streamed jobs: the prompt's tokens (the usage of OpenAI's completed event).
    prompt_tokens: int = field(default=0, init=False, repr=False)

    @property
    def rows(self) -> int:
        return self.n

    @property
    def batch_key(self) -> Hashable | None:
        return ("image",)


class StreamCancelled(Exception):
    """Raised inside the engine when the client of a streamed answer has gone: frees the engine."""


class _CallbackStreamer(TextStreamer):
    """Word-by-word text of a streamed answer, handed to a callback (leading spaces of the answer dropped,
    as the non-streamed answer is stripped).

    When its client has gone, the text is dropped; once the clients of every job of the engine call
    (``batch``) have gone, it raises :class:`StreamCancelled` to free the engine. Not before: the other
    jobs' answers, finished or not, are still wanted."""

    def __init__(self, tokenizer: Any, job: ChatJob, batch: list[ChatJob]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job
        self.batch = batch
        self.started = False

    def put(self, value: Any) -> None:
        if self.job.cancelled.is_set():
            if all(job.cancelled.is_set() for job in self.batch):
                raise StreamCancelled("the client closed the stream")
            return
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.job.cancelled.is_set():
            return
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.job.streamed = True
            self.job.on_text(text)


class ServingEngine:
    """Runs batches of jobs on a pipeline; see the module docstring."""

    def __init__(
        self,
        pipeline: UniMMPipeline,
        decoder: str = DEFAULT_DECODER,
        num_inference_steps: int = 20,
        decoder_guidance_scale: float = 2.0,
    ) -> None:
        self.pipeline = pipeline
        self.decoder = decoder
        self.num_inference_steps = num_inference_steps
        self.decoder_guidance_scale = decoder_guidance_scale
        self.eos_token_ids = set(pipeline.llm.eos_token_ids)
        self.context_length = getattr(pipeline.llm.config.text_config, "max_position_embeddings", None)

    def run(self, jobs: list[ChatJob | ImageJob]) -> list[Any]:
        """One result per job, or the exception that job raised. A failing batch is retried one job at a
        time, so one bad request (a prompt over the context, say) fails alone; a streamed job that
        already sent text gets the error instead (a retry would send its text again)."""
        try:
            return self._run(jobs)
        except Exception as error:
            if len(jobs) == 1:
                return [error]
            failure = error
        logger.info("a batch of %d jobs failed; running them one at a time", len(jobs))
        return [failure if getattr(job, "streamed", False) else self.run([job])[0] for job in jobs]

    def _run(self, jobs: list[ChatJob | ImageJob]) -> list[Any]:
        if isinstance(jobs[0], ImageJob):
            return self.generate_images(jobs)
        return self.chat(jobs)

    # ------------------------------------------------------------------ chat
    def _prompts(self, jobs: list[ChatJob], results: list[Any]) -> dict[int, list[int]]:
        """Each job's prompt ids by job index, the images of all jobs encoded in one visual tokenizer call per
        size; a job whose images or text do not tokenize gets its error in ``results``."""
        processor = self.pipeline.processor
        pixel_values: dict[int, list] = {}
        for index, job in enumerate(jobs):
            try:
                pixel_values[index] = processor.batch_pixel_values(messages=[job.conversation])
            except (OSError, ValueError) as error:
                results[index] = error
        everything = [pixels for job_pixels in pixel_values.values() for pixels in job_pixels]
        grids = iter(self.pipeline.encode(everything) if everything else [])
        prompts = {}
        for index, job_pixels in pixel_values.items():
            job_grids = [next(grids) for _ in job_pixels]
            try:
                prompts[index] = self._prompt_ids(jobs[index], job_grids)
            except (OSError, ValueError) as error:
                results[index] = error
        return prompts

    def _prompt_ids(self, job: ChatJob, grids: list) -> list[int]:
        """The conversation up to the assistant header (its images' code grids given), checked against the
        context."""
        batch = self.pipeline.processor(
            messages=[job.conversation], add_generation_prompt=True, image_grids=grids
        )
        ids = batch["input_ids"][0].tolist()
        if self.context_length is not None and len(ids) + job.max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens and max_tokens is {job.max_new_tokens}: together more than "
                f"the model's context of {self.context_length} tokens; shorten the conversation or max_tokens"
            )
        return ids

    def chat(self, jobs: list[ChatJob]) -> list[ChatAnswer | Exception]:
        """Answer every job in one engine call, each with its own ``max_tokens`` and seed, streaming the
        text of those with ``on_text``; a job whose prompt does not tokenize fails alone."""
        results: list[Any] = [None] * len(jobs)
        prompts = self._prompts(jobs, results)
        if not prompts:
            return results
        order = list(prompts)
        batch = [jobs[index] for index in order]
        tokenizer = self.pipeline.processor.tokenizer
        streamers = [
            _CallbackStreamer(tokenizer, job, batch) if job.on_text is not None else None for job in batch
        ]
        output = self.pipeline.llm.generate_multimodal(
            [prompts[index] for index in order],
            mode="text",
            text_sampling=batch[0].sampling,
            max_new_tokens=[job.max_new_tokens for job in batch],
            seed=_per_request_seeds([job.seed for job in batch]),
            streamer=streamers if any(streamers) else None,
            compile=self.pipeline.compile_decoding,
        )
        for row, index in enumerate(order):
            length = int(output.sequence_lengths[row])
            results[index] = self._answer(output.sequences[row, :length].tolist(), len(prompts[index]))
        return results

    def _answer(self, ids: list[int], prompt_tokens: int) -> ChatAnswer:
        finished = bool(ids) and ids[-1] in self.eos_token_ids
        text = self.pipeline.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return ChatAnswer(text, "stop" if finished else "length", prompt_tokens, len(ids))

    # ------------------------------------------------------------------ images
    def generate_images(self, jobs: list[ImageJob]) -> list[list[PIL.Image.Image]]:
        """Every image of every job in one ``UniMMPipeline.generate_images`` call: one guided, constrained
        engine call, then one decode per size.

        A job is one prompt of that call, with its own ``n``, size, guidance scale and seed, so a seeded job
        gives that method's images for ``seed=[seed]`` in any batch."""
        factor = self.pipeline.visual_tokenizer.config.downsample_factor
        streamer = None
        if any(job.on_preview is not None for job in jobs):
            prompt_ids, _ = self.pipeline.image_prompt_ids([job.prompt for job in jobs])
            for job, ids in zip(jobs, prompt_ids):
                job.prompt_tokens = len(ids)
            if any(job.on_preview is not None and job.partial_images for job in jobs):
                streamer = ImagePreviewStreamer(
                    partial_images=[job.partial_images if job.on_preview is not None else 0 for job in jobs],
                    callback=lambda preview: _hand_out(preview, jobs),
                )
        output = self.pipeline.generate_images(
            [job.prompt for job in jobs],
            num_images_per_prompt=[job.n for job in jobs],
            guidance_scale=[job.guidance_scale for job in jobs],
            height=[job.grid[0] * factor for job in jobs],
            width=[job.grid[1] * factor for job in jobs],
            seed=_per_request_seeds([job.seed for job in jobs]),
            decoder=self.decoder,
            num_inference_steps=self.num_inference_steps,
            decoder_guidance_scale=self.decoder_guidance_scale,
            streamer=streamer,
        )
        results, start = [], 0
        for job in jobs:
            results.append(output.images[start : start + job.n])
            start += job.n
        return results


def _hand_out(preview: ImagePreview, jobs: list[ImageJob]) -> None:
    """Give a preview to its job (numbered within the job). Once the clients of every job of the call have
    gone, raise :class:`StreamCancelled` to free the engine; not before (the other jobs' images are wanted)."""
    job = jobs[preview.prompt_index]
    if job.cancelled.is_set():
        if all(other.cancelled.is_set() for other in jobs):
            raise StreamCancelled("the clients of every image request of the batch have gone")
        return
    first = sum(other.n for other in jobs[: preview.prompt_index])
    job.streamed = True
    job.on_preview(preview.index - first, preview.partial_image_index, preview.image)


def warm_up(engine: ServingEngine, max_batch_size: int, grid: tuple[int, int]) -> float:
    """Run chat answers and guided image codes for batches of 1, 2, 4, ... up to ``max_batch_size`` rows
    through the engine, so the compiled decode steps (``UniMMPipeline.enable_compile``) are built before the
    first request, not during it (no image is decoded to pixels: that part is not compiled). Returns the
    seconds it took."""
    started = time.perf_counter()
    pipeline = engine.pipeline
    rows = [2**power for power in range(max_batch_size.bit_length())]
    rows += [max_batch_size] if rows[-1] != max_batch_size else []
    for count in rows:
        engine.chat([ChatJob([{"role": "user", "content": "hello"}], max_new_tokens=2) for _ in range(count)])
        prompt_ids, unconditional_ids = pipeline.image_prompt_ids(["warm-up"] * count)
        pipeline.llm.generate_multimodal(
            prompt_ids,
            mode="image",
            image_grid=grid,
            guidance_scale=3.0,
            unconditional_input_ids=unconditional_ids,
            compile=pipeline.compile_decoding,
        )
    return time.perf_counter() - started


def _per_request_seeds(seeds: list[int | None]) -> list[int | None] | None:
    """The engine's per-request seeds, or ``None`` when no job has one (then every row draws from torch's
    default generator, one draw for the batch)."""
    return seeds if any(seed is not None for seed in seeds) else None
