"""What the server asks of the model: a batch of chat answers, a batch of image requests, or one streamed
answer, each as one call of the generation engine (``UniMMForCausalLM.generate_multimodal``).

Runs in the batcher's worker thread. A batch of image requests may mix prompts, ``n``, sizes and guidance
scales: the engine takes them per row. Chat requests share one sampling setting per batch (the batcher
groups them by it); each answer is cut at its own ``max_tokens`` (greedy decoding is batch-invariant, so
that equals decoding with its own budget).

Seeds: the engine draws the noise of a whole batch from one generator, so a row's sample depends on the
batch it lands in. A request with a ``seed`` is therefore decoded in a batch of its own, and gives the
same images as ``UniMMPipeline.generate_images(prompt, n, ..., seed=seed)``; requests without one batch
freely.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
from transformers import TextStreamer

from unimm.llm import ModalitySampling
from unimm.pipelines import UniMMPipeline

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

    @property
    def rows(self) -> int:
        return 1

    @property
    def batch_key(self) -> Hashable | None:
        """Jobs with equal keys may share an engine call; ``None``: always alone."""
        if self.on_text is not None:
            return None  # the engine streams a batch of one row
        if self.temperature == 0:
            return ("chat", "greedy")
        return None if self.seed is not None else ("chat", self.temperature, self.top_p)

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

    @property
    def rows(self) -> int:
        return self.n

    @property
    def batch_key(self) -> Hashable | None:
        return ("image",) if self.seed is None else None


class StreamCancelled(Exception):
    """Raised inside the engine when the client of a streamed answer has gone: frees the engine."""


class _CallbackStreamer(TextStreamer):
    """Word-by-word text of a streamed answer, handed to a callback (leading spaces of the answer dropped,
    as the non-streamed answer is stripped)."""

    def __init__(self, tokenizer: Any, job: ChatJob) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job
        self.started = False

    def put(self, value: Any) -> None:
        if self.job.cancelled.is_set():
            raise StreamCancelled("the client closed the stream")
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.job.on_text(text)


class ServingEngine:
    """Runs batches of jobs on a pipeline; see the module docstring."""

    def __init__(
        self,
        pipeline: UniMMPipeline,
        decoder: str = "diffusion",
        num_inference_steps: int = 20,
        decoder_guidance_scale: float = 2.0,
    ) -> None:
        self.pipeline = pipeline
        self.decoder = decoder
        self.num_inference_steps = num_inference_steps
        self.decoder_guidance_scale = decoder_guidance_scale
        self.eos_token_ids = set(pipeline.llm._resolve_eos(None))
        self.context_length = getattr(pipeline.llm.config.text_config, "max_position_embeddings", None)

    def run(self, jobs: list[ChatJob | ImageJob]) -> list[Any]:
        """One result per job, or the exception that job raised. A failing batch is retried one job at a
        time, so one bad request (a prompt over the context, say) fails alone."""
        try:
            return self._run(jobs)
        except Exception as error:
            if len(jobs) == 1:
                return [error]
        logger.info("a batch of %d jobs failed; running them one at a time", len(jobs))
        return [self.run([job])[0] for job in jobs]

    def _run(self, jobs: list[ChatJob | ImageJob]) -> list[Any]:
        if isinstance(jobs[0], ImageJob):
            return self.generate_images(jobs)
        if jobs[0].on_text is not None:
            return [self.stream_chat(jobs[0])]
        return self.chat(jobs)

    # ------------------------------------------------------------------ chat
    def _prompt_ids(self, job: ChatJob) -> list[int]:
        """The conversation up to the assistant header (its images encoded), checked against the context."""
        batch = self.pipeline.processor(messages=[job.conversation], add_generation_prompt=True)
        ids = batch["input_ids"][0].tolist()
        if self.context_length is not None and len(ids) + job.max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens and max_tokens is {job.max_new_tokens}: together more than "
                f"the model's context of {self.context_length} tokens; shorten the conversation or max_tokens"
            )
        return ids

    def chat(self, jobs: list[ChatJob]) -> list[ChatAnswer | Exception]:
        """Answer every job in one engine call; a job whose prompt does not tokenize fails alone."""
        results: list[Any] = [None] * len(jobs)
        prompts = {}
        for index, job in enumerate(jobs):
            try:
                prompts[index] = self._prompt_ids(job)
            except (OSError, ValueError) as error:
                results[index] = error
        if not prompts:
            return results
        order = list(prompts)
        output = self.pipeline.llm.generate_multimodal(
            [prompts[index] for index in order],
            mode="text",
            text_sampling=jobs[order[0]].sampling,
            max_new_tokens=max(jobs[index].max_new_tokens for index in order),
            seed=jobs[order[0]].seed,
        )
        for row, index in enumerate(order):
            length = int(output.sequence_lengths[row])
            ids = output.sequences[row, : min(length, jobs[index].max_new_tokens)].tolist()
            results[index] = self._answer(ids, len(prompts[index]))
        return results

    def stream_chat(self, job: ChatJob) -> ChatAnswer:
        """Answer one job, handing its text to ``job.on_text`` as it is generated."""
        prompt = self._prompt_ids(job)
        output = self.pipeline.llm.generate_multimodal(
            [prompt],
            mode="text",
            text_sampling=job.sampling,
            max_new_tokens=job.max_new_tokens,
            seed=job.seed,
            streamer=_CallbackStreamer(self.pipeline.processor.tokenizer, job),
        )
        length = int(output.sequence_lengths[0])
        return self._answer(output.sequences[0, :length].tolist(), len(prompt))

    def _answer(self, ids: list[int], prompt_tokens: int) -> ChatAnswer:
        finished = bool(ids) and ids[-1] in self.eos_token_ids
        text = self.pipeline.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return ChatAnswer(text, "stop" if finished else "length", prompt_tokens, len(ids))

    # ------------------------------------------------------------------ images
    def generate_images(self, jobs: list[ImageJob]) -> list[list[PIL.Image.Image]]:
        """Every image of every job in one guided, constrained engine call, then one decode per size.

        The rows are those of ``UniMMPipeline.generate_images`` (a job's prompt repeated ``n`` times), so a
        job alone with a seed gives that method's images."""
        pipeline = self.pipeline
        seed = jobs[0].seed if len(jobs) == 1 else None
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        prompt_ids, unconditional_ids = pipeline._image_prompts(prompts)
        output = pipeline.llm.generate_multimodal(
            prompt_ids,
            mode="image",
            image_grid=[job.grid for job in jobs for _ in range(job.n)],
            guidance_scale=[job.guidance_scale for job in jobs for _ in range(job.n)],
            unconditional_input_ids=unconditional_ids,
            seed=seed,
        )
        grids = [row_images[0] for row_images in output.image_token_ids]  # (h, w) each
        images = pipeline._decode_grids(
            grids, self.decoder, self.num_inference_steps, self.decoder_guidance_scale, seed
        )
        results, start = [], 0
        for job in jobs:
            results.append(images[start : start + job.n])
            start += job.n
        return results
