"""``UniMMPipeline``: chat about images, generate images, interleaved output and reconstruction.

One checkpoint folder, saved and loaded by diffusers' ``model_index.json`` machinery; every subfolder
loads on its own with its own library::

    model_index.json     component classes and the pipeline settings (prompt_format)
    llm/                 UniMMForCausalLM            AutoModelForCausalLM (after ``import unimm``)
    processor/           UniMMProcessor              AutoProcessor: tokenizer, chat template, image processor
    visual_tokenizer/    DualCodebookTokenizer       AutoModel
    detokenizer/         DetokenizerPipeline         diffusers: decoder/ (TokenDiffusionDecoder), scheduler/
    README.md            the model card
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from accelerate import cpu_offload_with_hook
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from huggingface_hub import HfApi
from transformers import BatchFeature, TextIteratorStreamer

from unimm.detokenizer import DetokenizerPipeline
from unimm.llm import ModalitySampling, UniMMForCausalLM, UniMMProcessor
from unimm.llm.processing_unimm import batches_by_shape, encode_by_size
from unimm.tokenizer import DualCodebookTokenizer

from .checkpoint_folder import MODEL_INDEX, check_checkpoint_folder
from .conversations import conversations_with_images, open_image_argument
from .model_card import build_model_card
from .previews import ImagePreviewStreamer, ImageRowPreviews

logger = logging.getLogger(__name__)

DECODERS = ("diffusion", "pixel")
# The tokenizer's pixel decoder by default: about 8x as fast per image as the diffusion decoder on a CPU, which
# draws the asked class a few points more often at a lower Frechet distance (README, "Which decoder") and is
# the quality option. Janus, Emu3 and TokenFlow decode their codes the same way.
DEFAULT_DECODER = "pixel"
OUTPUTS = ("text", "image", "interleaved")
# How text-to-image prompts are written, as the model was trained: a user turn of the chat template
# answered by the image ("chat"), or BOS + caption followed by the image ("caption").
PROMPT_FORMATS = ("chat", "caption")
DOWNLOAD_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
# Loading options the nested detokenizer pipeline gets too (diffusers passes none to a nested pipeline).
NESTED_LOAD_OPTIONS = ("device_map", "max_memory", "variant", "use_safetensors", "low_cpu_mem_usage")

ImageInput = PIL.Image.Image | str | os.PathLike | bytes
Seed = int | Sequence[int | None] | None


@dataclass
class UniMMChatOutput(BaseOutput):
    """Output of :meth:`UniMMPipeline.chat`: one answer per conversation (``text`` is the first)."""

    texts: list[str]

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class UniMMImageOutput(BaseOutput):
    """Output of :meth:`UniMMPipeline.generate_images`.

    Attributes:
        images: every prompt's ``num_images_per_prompt`` images, prompt-major.
        image_token_ids: the codebook ids the language model wrote: ``(N, h, w)`` when every image has the same
            size, else a list of N ``(h, w)`` grids.
    """

    images: list[PIL.Image.Image]
    image_token_ids: torch.LongTensor | list[torch.LongTensor]


@dataclass
class UniMMInterleavedOutput(BaseOutput):
    """Output of :meth:`UniMMPipeline.generate`: per conversation, its text pieces and images in order."""

    segments: list[list[str | PIL.Image.Image]]


@dataclass
class UniMMReconstructionOutput(BaseOutput):
    """Output of :meth:`UniMMPipeline.reconstruct`: the decoded images and each one's ``(h, w)`` code grid."""

    images: list[PIL.Image.Image]
    image_token_ids: list[torch.LongTensor]


class UniMMPipeline(DiffusionPipeline):
    r"""Chat, image generation, interleaved output and reconstruction with one unified model.

    Components:
        llm ([`UniMMForCausalLM`]): the language model over text and image tokens.
        processor ([`UniMMProcessor`]): text tokenizer (chat template) and image processor.
        visual_tokenizer ([`DualCodebookTokenizer`]): images to code grids, and its fast pixel decoder.
        detokenizer ([`DetokenizerPipeline`], *optional*): the diffusion decoder from code grids to images.
        prompt_format (`str`): ``"chat"`` or ``"caption"``, how text-to-image prompts are written.
    """

    _optional_components = ["detokenizer"]
    # The order the models usually run in; the nested detokenizer's models follow the llm in the offload chain.
    model_cpu_offload_seq = "visual_tokenizer->llm"

    def __init__(
        self,
        llm: UniMMForCausalLM,
        processor: UniMMProcessor,
        visual_tokenizer: DualCodebookTokenizer,
        detokenizer: DetokenizerPipeline | None = None,
        prompt_format: str = "chat",
    ) -> None:
        super().__init__()
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if prompt_format == "caption" and processor.tokenizer.bos_token_id is None:
            raise ValueError("prompt_format='caption' needs a text tokenizer with a BOS token; use 'chat'")
        _check_codebooks(llm, processor, visual_tokenizer, detokenizer)
        # The pipeline encodes the images of its own calls, one visual tokenizer call per batch and size; the
        # processor gets the tokenizer too, so that `pipeline.processor(messages)` works on its own.
        processor.vq_model = visual_tokenizer
        self.register_modules(
            llm=llm, processor=processor, visual_tokenizer=visual_tokenizer, detokenizer=detokenizer
        )
        self.register_to_config(prompt_format=prompt_format)
        self.compile_decoding = False  # see enable_compile

    def enable_compile(self, enabled: bool = True) -> None:
        """Decode through the compiled engine step (``generate_multimodal(compile=True)``: backbone, head,
        guidance, constraints and sampling as one ``torch.compile`` graph per kind of step). Each new kind of
        step compiles on first use (tens of seconds on a CPU); later calls are faster (``benchmarks/``). Pays
        for a server or a long session, not for one short call."""
        self.compile_decoding = enabled

    # ------------------------------------------------------------------ loading, saving, devices
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = torch.float32,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        quantization: str | Any | None = None,
        **kwargs: Any,
    ) -> UniMMPipeline:
        """Load a checkpoint folder or Hub repo; ``dtype`` and ``device`` apply to every component,
        ``attn_implementation`` (``"sdpa"``, ``"flash_attention_2"``, ...) to the language model; other
        keyword arguments go to ``DiffusionPipeline.from_pretrained`` (``device_map``, ``variant``, ...),
        the loading options among them to the nested detokenizer too.

        ``quantization`` (``"int8"``, ``"int8-dynamic"`` with int8 activations too, ``"int4"`` on CUDA, or a
        transformers quantization config) quantizes the language model's linear weights as they load (torchao;
        see ``unimm.pipelines.quantization``).

        ``dtype`` may be a dict as in diffusers, one dtype per component name (``"llm"``,
        ``"visual_tokenizer"``, ``"detokenizer"``) and a ``"default"`` for the others (else float32).

        ``dtype`` defaults to float32 whatever the checkpoint stores (as diffusers and ``unimm serve`` do),
        so the same seed gives the same image everywhere; ``dtype=None`` keeps the saved dtype of the
        transformers models (the demo checkpoint stores its LLM in bfloat16; diffusers loads the detokenizer
        in float32 then)."""
        # 1. A local folder, else a Hub repo id (downloaded by diffusers).
        download_options = {name: kwargs.pop(name) for name in DOWNLOAD_OPTIONS if name in kwargs}
        folder = _resolve_folder(cls, os.fspath(pretrained_model_name_or_path), download_options)
        # 2. Refuse missing or partial folders with a one-line error.
        check_checkpoint_folder(folder)
        # 3. Components through diffusers, which passes neither dtype nor device_map to a nested pipeline:
        #    load that one here.
        saved = json.loads((folder / MODEL_INDEX).read_text())
        if quantization is not None and "llm" not in kwargs:
            from unimm.pipelines.quantization import load_quantized_llm

            kwargs["llm"] = load_quantized_llm(
                folder / "llm", quantization, dtype=_component_dtype(dtype, "llm"), device=device
            )
        if "detokenizer" not in kwargs and (saved.get("detokenizer") or [None])[0] is not None:
            options = {name: kwargs[name] for name in NESTED_LOAD_OPTIONS if name in kwargs}
            kwargs["detokenizer"] = DetokenizerPipeline.from_pretrained(
                folder / "detokenizer", dtype=_component_dtype(dtype, "detokenizer"), **options
            )
        pipeline = super().from_pretrained(folder, dtype=dtype, **kwargs)
        if attn_implementation is not None:
            pipeline.llm.set_attn_implementation(attn_implementation)
        if device is not None:
            pipeline.to(device)
        return pipeline

    def to(self, *args: Any, **kwargs: Any) -> UniMMPipeline:
        """Move/cast every component (the nested detokenizer pipeline too), like ``DiffusionPipeline.to``."""
        super().to(*args, **kwargs)
        if self.detokenizer is not None:
            self.detokenizer.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """diffusers' model CPU offload: every model waits on the CPU and moves to ``device`` (default: the
        accelerator; diffusers refuses a machine without one) when it runs, where it stays until the next
        model of ``visual_tokenizer -> llm -> detokenizer.decoder -> detokenizer.vae`` runs; each call of
        the pipeline ends with all of them back on the CPU."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        if self.detokenizer is None:
            return
        # diffusers hooks a pipeline's own models only: chain the nested pipeline's after the llm's.
        hook = self._all_hooks[-1] if self._all_hooks else None
        for name in self.detokenizer.model_cpu_offload_seq.split("->"):
            module = getattr(self.detokenizer, name, None)
            if isinstance(module, torch.nn.Module):
                _, hook = cpu_offload_with_hook(module, self._offload_device, prev_module_hook=hook)
                self._all_hooks.append(hook)

    def remove_all_hooks(self) -> None:
        super().remove_all_hooks()
        if self.detokenizer is not None:
            self.detokenizer.remove_all_hooks()

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Not supported: the generation engine and the visual tokenizer make their tensors on their weights'
        device, which sequential offload leaves on ``meta``. Use :meth:`enable_model_cpu_offload`."""
        raise NotImplementedError(
            "UniMMPipeline does not support sequential CPU offload (its weights would wait on the 'meta' "
            "device, where the generation engine would make its tensors); use enable_model_cpu_offload()"
        )

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        super().set_progress_bar_config(**kwargs)
        if self.detokenizer is not None:
            self.detokenizer.set_progress_bar_config(**kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        training_data: Sequence[str] | None = None,
        metrics: Mapping[str, float | str] | None = None,
        repo_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the checkpoint folder and its model card (README.md) listing the components and the given
        training data and metrics. ``kwargs`` go to ``DiffusionPipeline.save_pretrained`` (``variant``,
        ``max_shard_size``, ``safe_serialization``); use :meth:`push_to_hub` to publish."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained does not upload: call pipeline.push_to_hub(repo_id) instead")
        super().save_pretrained(save_directory, **kwargs)
        card = build_model_card(self, training_data, metrics, repo_id=repo_id)
        card.save(Path(save_directory) / "README.md")

    def push_to_hub(
        self,
        repo_id: str,
        training_data: Sequence[str] | None = None,
        metrics: Mapping[str, float | str] | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload UniMMPipeline",
        create_pr: bool = False,
    ) -> str:
        """Save to a temporary folder (with the model card) and upload it to the Hub; returns the commit
        URL."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, training_data=training_data, metrics=metrics, repo_id=repo_id)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr
            )
        return str(commit)

    # ------------------------------------------------------------------ chat
    def chat(
        self,
        messages: str | Sequence[dict] | Sequence[str | Sequence[dict]],
        images: ImageInput | Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        stream: bool = False,
        max_new_tokens: int = 128,
        text_sampling: ModalitySampling | None = None,
        seed: Seed = None,
    ) -> UniMMChatOutput | Iterator[str]:
        """Answer in text.

        Args:
            messages: a question, one conversation (transformers chat messages; image parts may be empty
                placeholders ``{"type": "image"}``), or a batch: a list of questions or conversations.
            images: for one conversation, its images (they fill the placeholders in order, or go before the
                last user turn's text); for a batch, one entry (an image, a list, or None) per conversation.
            stream: return an iterator of text pieces as they are generated (one conversation).
            text_sampling: greedy by default.
            seed: of sampling: an int for the whole batch, or a list with one seed (or ``None``) per
                conversation, each of which then answers as it would alone with ``seed=[s]`` (see
                ``UniMMForCausalLM.generate_multimodal``).
        """
        # 1. Conversations with their images opened.
        conversations = conversations_with_images(messages, images)
        if stream and len(conversations) != 1:
            raise ValueError(f"stream=True takes one conversation, got {len(conversations)}")
        # 2. Chat template up to the assistant header (every image encoded in one visual tokenizer call per
        #    size), left-padded for batched decoding.
        batch = self._tokenize(conversations, add_generation_prompt=True, padding_side="left")
        generate_kwargs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "mode": "text",
            "text_sampling": text_sampling,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "compile": self.compile_decoding,
        }
        # 3. Generate (streamed from a worker thread, or the whole batch at once).
        _onload(self.llm)
        if stream:
            return self._stream_text(generate_kwargs)
        output = self.llm.generate_multimodal(**generate_kwargs)
        texts, _ = self.processor.batch_decode(output.sequences, output.sequence_lengths)
        self.maybe_free_model_hooks()
        return UniMMChatOutput(texts=[text.strip() for text in texts])

    def _stream_text(self, generate_kwargs: dict[str, Any]) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failures: list[BaseException] = []

        def run() -> None:
            try:
                self.llm.generate_multimodal(**generate_kwargs, streamer=streamer)
            except Exception as error:  # raised again in the caller's thread, after the stream ends
                failures.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            yield from (piece for piece in streamer if piece)
            thread.join()
            self.maybe_free_model_hooks()
            if failures:
                raise failures[0]

        return pieces()

    # ------------------------------------------------------------------ image generation
    def generate_images(
        self,
        prompts: str | Sequence[str],
        num_images_per_prompt: int | Sequence[int] = 1,
        guidance_scale: float | Sequence[float] = 3.0,
        height: int | Sequence[int | None] | None = None,
        width: int | Sequence[int | None] | None = None,
        seed: Seed = None,
        decoder: str = DEFAULT_DECODER,
        num_inference_steps: int = 20,
        decoder_guidance_scale: float = 2.0,
        image_sampling: ModalitySampling | Sequence[ModalitySampling | None] | None = None,
        streamer: ImagePreviewStreamer | None = None,
    ) -> UniMMImageOutput:
        """Generate ``num_images_per_prompt`` images per prompt: every prompt and image in one batched,
        constrained and guided language-model call, then one batched decode per image size.

        ``num_images_per_prompt``, ``guidance_scale``, ``height``, ``width``, ``seed`` and ``image_sampling``
        take one value for every prompt or a list with one value per prompt (a list of another length is a
        ``ValueError`` naming the argument).

        Args:
            num_images_per_prompt: images of each prompt.
            guidance_scale: classifier-free guidance of the language model (1 disables it).
            height, width: image size in pixels, multiples of the tokenizer's downsampling factor
                (default, or ``None`` entries: the model's default grid).
            seed: an int seeds the whole call. A list holds one seed (or ``None``) per prompt: a prompt's
                images then come out the same whatever the other prompts of the call (both the image codes
                and the diffusion decoder's noise are drawn from the prompt's own generators); ``None``
                entries draw from torch's default generator.
            decoder: ``"pixel"`` (the tokenizer's fast decoder, the default) or ``"diffusion"`` (the detokenizer).
            num_inference_steps, decoder_guidance_scale: of the diffusion decoder.
            image_sampling: sampling of image codes (default: temperature 1, no top-k/top-p). The engine takes
                one sampling per call: prompts of different samplings run in one call per sampling (with an
                int ``seed`` each such call is seeded with it; per-prompt seeds are unaffected).
            streamer: previews of every image while its codes are written
                (:class:`~unimm.pipelines.previews.ImagePreviewStreamer`: every N rows, or N per image; the rows
                written so far through the pixel decoder, the rest grey), handed to its callback or iterated
                from another thread; it ends when this call returns or fails. The images this call returns are
                the same with or without it. A streamer rather than diffusers' ``callback_on_step_end``: the
                steps are the engine's token steps, inside one (possibly compiled) decode loop the pipeline does
                not run itself, and the images of one call finish their rows at different steps; the engine
                hands its tokens out through transformers' streamer hook (which streams text too), and a
                streamer serves a callback and an iterating consumer alike.
        """
        try:
            # 1. Check inputs; one value per prompt.
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
                raise ValueError("prompts must be a string or a non-empty list of strings")
            _check_decoder(decoder, self.detokenizer)
            count = len(prompts)
            heights, widths = _per_prompt(height, count, "height"), _per_prompt(width, count, "width")
            requests = {
                "grids": [self.image_grid(h, w) for h, w in zip(heights, widths)],
                "scales": _per_prompt(guidance_scale, count, "guidance_scale"),
                "counts": _per_prompt(num_images_per_prompt, count, "num_images_per_prompt"),
                "seeds": _per_prompt(seed, count, "seed") if isinstance(seed, (list, tuple)) else seed,
                "samplings": _per_prompt(image_sampling, count, "image_sampling"),
            }
            previews = streamer.per_prompt(count) if streamer is not None else None
            # 2. Conditional prompts and their unconditional forms (text dropped, as in training).
            prompt_ids, unconditional_ids = self.image_prompt_ids(prompts)
            # 3. All prompts x images in one call of the constrained engine (one per image sampling), previews
            #    made as the rows are written.
            _onload(self.llm)
            grids = self._generate_codes(
                prompt_ids, unconditional_ids, **requests, streamer=streamer, previews=previews
            )
            # 4. One batched decode per image size; per-prompt seeds give each prompt its own decoder noise.
            generators = _request_generators(seed, requests["counts"])
            decoder_seed = seed if generators is None else None  # an int, or the generators say it all
            images = self._decode_grids(
                grids, decoder, num_inference_steps, decoder_guidance_scale, decoder_seed, generators
            )
        finally:
            if streamer is not None:
                streamer.end()
        self.maybe_free_model_hooks()
        one_size = len({tuple(grid.shape) for grid in grids}) == 1
        return UniMMImageOutput(images=images, image_token_ids=torch.stack(grids) if one_size else grids)

    def _generate_codes(
        self,
        prompt_ids: list[list[int]],
        unconditional_ids: list[list[int]],
        grids: list[tuple[int, int]],
        scales: list[float],
        counts: list[int],
        seeds: Seed,
        samplings: list[ModalitySampling | None],
        streamer: ImagePreviewStreamer | None = None,
        previews: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """The ``(h, w)`` code grids of every image, prompt-major: one engine call per distinct sampling;
        ``streamer`` gets previews by the setting ``previews`` of each prompt."""
        per_prompt: list[list[torch.Tensor]] = [[] for _ in prompt_ids]
        first_image = [sum(counts[:index]) for index in range(len(counts))]  # of each prompt, in the output
        for sampling, indices in _groups(samplings):
            row_previews = None
            if streamer is not None:
                images = [
                    (first_image[index] + number, index, grids[index])
                    for index in indices
                    for number in range(counts[index])
                ]
                rows = [streamer.preview_rows(previews[index], grid[0]) for _, index, grid in images]
                row_previews = ImageRowPreviews(
                    streamer, self.llm.vocabulary, images, rows, decode=self._preview_decode
                )
            output = self.llm.generate_multimodal(
                _pick(prompt_ids, indices),
                mode="image",
                image_grid=_pick(grids, indices),
                guidance_scale=_pick(scales, indices),
                unconditional_input_ids=_pick(unconditional_ids, indices),
                image_sampling=sampling,
                num_images_per_prompt=_pick(counts, indices),
                seed=_pick(seeds, indices) if isinstance(seeds, list) else seeds,
                streamer=row_previews,
                compile=self.compile_decoding,
            )
            rows = iter(output.image_token_ids)  # request-major, one image per row
            for index in indices:
                per_prompt[index] = [next(rows)[0] for _ in range(counts[index])]
        return [grid for prompt_grids in per_prompt for grid in prompt_grids]

    def _preview_decode(self, grids: list[torch.Tensor]) -> list[PIL.Image.Image]:
        """Partial code grids to images with the fast pixel decoder (one call per shape), for previews."""
        return self._decode_grids(grids, "pixel", num_inference_steps=0, guidance_scale=1.0)

    def image_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The ``(h, w)`` code grid of an image of ``height x width`` pixels (``None``: the default grid)."""
        factor = self.visual_tokenizer.config.downsample_factor
        vocabulary, config = self.llm.vocabulary, self.llm.config
        grid = []
        for name, pixels, default, limit in (
            ("height", height, config.default_grid_height, vocabulary.max_grid_height),
            ("width", width, config.default_grid_width, vocabulary.max_grid_width),
        ):
            if pixels is None:
                grid.append(default)
                continue
            if not isinstance(pixels, int) or pixels % factor or not factor <= pixels <= limit * factor:
                raise ValueError(
                    f"{name}={pixels!r} is off the grid: use a multiple of {factor} pixels from {factor} to "
                    f"{limit * factor}"
                )
            grid.append(pixels // factor)
        return grid[0], grid[1]

    def image_prompt_ids(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Text-to-image prompts as the model was trained on them (``prompt_format``), and their unconditional
        forms (text dropped) for guidance: ``(conditional, unconditional)``, a list of ids per prompt each."""
        if self.config.prompt_format == "caption":
            tokenizer = self.processor.tokenizer
            bos = [tokenizer.bos_token_id]
            texts = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
            return [bos + ids for ids in texts], [bos for _ in prompts]
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        batch = self.processor(messages=conversations, add_generation_prompt=True, return_unconditional=True)
        return (
            _unpadded(batch["input_ids"], batch["attention_mask"]),
            _unpadded(batch["unconditional_input_ids"], batch["unconditional_attention_mask"]),
        )

    # ------------------------------------------------------------------ interleaved output
    def generate(
        self,
        messages: str | Sequence[dict] | Sequence[str | Sequence[dict]],
        output: str = "interleaved",
        images: ImageInput | Sequence[ImageInput | Sequence[ImageInput] | None] | None = None,
        max_new_tokens: int = 256,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        seed: Seed = None,
        decoder: str = DEFAULT_DECODER,
        num_inference_steps: int = 20,
        decoder_guidance_scale: float = 2.0,
        text_sampling: ModalitySampling | None = None,
        image_sampling: ModalitySampling | None = None,
    ) -> UniMMInterleavedOutput:
        """Answer conversations with text, one image, or text and images interleaved as the model decides.

        ``output`` is ``"text"``, ``"image"`` or ``"interleaved"``; ``height``/``width`` fix the size of every
        image (otherwise the model writes the size tokens in interleaved output). ``seed`` may be a list
        with one seed per conversation, as in :meth:`generate_images`. Other arguments as in :meth:`chat`
        and :meth:`generate_images`."""
        # 1. Check inputs; conversations with their images.
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        _check_decoder(decoder, self.detokenizer)
        grid = self.image_grid(height, width) if height is not None or width is not None else None
        conversations = conversations_with_images(messages, images)
        # 2. Prompts (every image encoded in one visual tokenizer call per size) and their unconditional
        #    forms, for guidance inside images.
        batch = self._tokenize(
            conversations, add_generation_prompt=True, return_unconditional=True, padding_side="left"
        )
        # 3. One engine call for the whole batch.
        _onload(self.llm)
        generated = self.llm.generate_multimodal(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mode=output,
            image_grid=grid,
            guidance_scale=guidance_scale if output != "text" else 1.0,  # guidance acts only inside images
            unconditional_input_ids=_unpadded(
                batch["unconditional_input_ids"], batch["unconditional_attention_mask"]
            ),
            text_sampling=text_sampling,
            image_sampling=image_sampling,
            max_new_tokens=max_new_tokens,
            seed=seed,
            compile=self.compile_decoding,
        )
        # 4. Decode every image of the batch (same-size grids together), then put the pieces in order.
        rows = [
            self.llm.vocabulary.split_images(ids[:length])
            for ids, length in zip(generated.sequences.tolist(), generated.sequence_lengths.tolist())
        ]
        grids = [grid_ids for _, row_grids in rows for grid_ids in row_grids]
        generators = _request_generators(seed, [len(row_grids) for _, row_grids in rows])
        decoded = iter(
            self._decode_grids(grids, decoder, num_inference_steps, decoder_guidance_scale, seed, generators)
        )
        segments = []
        for text_pieces, row_grids in rows:
            row: list[str | PIL.Image.Image] = []
            for index, piece in enumerate(text_pieces):
                text = self.processor.tokenizer.decode(piece, skip_special_tokens=True).strip()
                if text:
                    row.append(text)
                if index < len(row_grids):
                    row.append(next(decoded))
            segments.append(row)
        self.maybe_free_model_hooks()
        return UniMMInterleavedOutput(segments=segments)

    # ------------------------------------------------------------------ encoding, decoding, reconstruction
    def encode(
        self, images: ImageInput | torch.Tensor | Sequence[ImageInput | torch.Tensor]
    ) -> list[torch.LongTensor]:
        """Images to their ``(h, w)`` code grids with the visual tokenizer: one call per image size, the grids
        in the order of the images.

        An image is a PIL image, a path or bytes, or its normalised pixels ``(C, H, W)`` as
        ``processor.pixel_values`` makes them."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        opened = {
            index: open_image_argument(image, f"images[{index}]")
            for index, image in enumerate(images)
            if not isinstance(image, torch.Tensor)
        }
        processed = dict(zip(opened, self.processor.pixel_values(list(opened.values()))))  # one call
        pixel_values = [processed.get(index, image) for index, image in enumerate(images)]
        grids = encode_by_size(self.visual_tokenizer, pixel_values)
        self.maybe_free_model_hooks()
        return grids

    def decode(
        self,
        image_token_ids: torch.Tensor | Sequence[torch.Tensor],
        decoder: str = DEFAULT_DECODER,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> list[PIL.Image.Image]:
        """Code grids to images with the diffusion decoder or the tokenizer's pixel decoder.

        Args:
            image_token_ids: a ``(B, h, w)`` tensor, or a list of ``(h, w)`` grids of any sizes (as
                ``generate_images`` and ``reconstruct`` return them): one decoder batch per size, the images
                in the order of the grids.
            decoder: ``"pixel"`` (the tokenizer's fast decoder, the default) or ``"diffusion"`` (the detokenizer).
            num_inference_steps, guidance_scale: of the diffusion decoder.
            seed, generator: the diffusion decoder's noise comes from ``generator`` (one, or one per image as in
                diffusers) when given, else from a CPU generator seeded with ``seed`` for each size.
        """
        _check_decoder(decoder, self.detokenizer)
        if isinstance(image_token_ids, torch.Tensor):
            if image_token_ids.ndim != 3:
                raise ValueError(
                    f"image_token_ids of shape {tuple(image_token_ids.shape)}: expected (B, h, w) or a list of "
                    "(h, w) grids"
                )
            image_token_ids = list(image_token_ids)
        grids = [torch.as_tensor(grid) for grid in image_token_ids]
        if any(grid.ndim != 2 for grid in grids):
            raise ValueError("image_token_ids: every grid of the list must be (h, w)")
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(grids):
                raise ValueError(f"generator holds {len(generator)} generators for {len(grids)} images")
            generator = list(generator)
        images = self._decode_grids(grids, decoder, num_inference_steps, guidance_scale, seed, generator)
        self.maybe_free_model_hooks()
        return images

    @torch.no_grad()
    def _decode_grids(
        self,
        grids: list[torch.Tensor],
        decoder: str,
        num_inference_steps: int,
        guidance_scale: float,
        seed: Seed = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[PIL.Image.Image]:
        """Decode grids of possibly different sizes: one batch per size, results in the input order. The
        diffusion decoder's noise: ``generator`` (a list: one per grid), else a generator seeded with ``seed``
        (an int) per size."""
        images: list[PIL.Image.Image | None] = [None] * len(grids)
        for indices, batch in batches_by_shape(grids):  # batch: (b, h, w)
            if isinstance(generator, list):
                batch_generator = [generator[index] for index in indices]
            elif generator is None and isinstance(seed, int):
                batch_generator = torch.Generator().manual_seed(seed)  # the same noise on every device
            else:
                batch_generator = generator
            decoded = self._decode_batch(batch, decoder, num_inference_steps, guidance_scale, batch_generator)
            for index, image in zip(indices, decoded):
                images[index] = image
        return images

    def _decode_batch(
        self,
        image_token_ids: torch.Tensor,
        decoder: str,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> list[PIL.Image.Image]:
        """Code grids ``(B, h, w)`` of one size to images."""
        if decoder == "pixel":
            pixel_values = self.visual_tokenizer.decode(image_token_ids)  # it moves the ids to its device
            return self.processor.image_processor.postprocess(pixel_values)
        return self.detokenizer(
            image_token_ids,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pil",
        ).images

    def reconstruct(
        self,
        images: ImageInput | Sequence[ImageInput],
        decoder: str = DEFAULT_DECODER,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        seed: int | None = None,
    ) -> UniMMReconstructionOutput:
        """Encode images to code grids with the visual tokenizer (one call per size) and decode them again."""
        _check_decoder(decoder, self.detokenizer)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        opened = [open_image_argument(image, f"images[{index}]") for index, image in enumerate(images)]
        grids = encode_by_size(self.visual_tokenizer, self.processor.pixel_values(opened))
        decoded = self._decode_grids(grids, decoder, num_inference_steps, guidance_scale, seed)
        self.maybe_free_model_hooks()
        return UniMMReconstructionOutput(images=decoded, image_token_ids=grids)

    def _tokenize(self, conversations: list[list[dict]], **options: Any) -> BatchFeature:
        """The processor's tokens of chat conversations, their images encoded here: one visual tokenizer call
        per image size for the whole batch."""
        pixel_values = self.processor.batch_pixel_values(messages=conversations)
        grids = encode_by_size(self.visual_tokenizer, pixel_values)
        return self.processor(messages=conversations, image_grids=grids, **options)


def _onload(module: torch.nn.Module) -> None:
    """Under model CPU offload, move ``module`` to the execution device before a call other than its
    ``forward``, where the offload hook sits: the engine runs the inner language model, never the llm's own
    ``forward``, and makes its tensors on the device the weights are on when it starts."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def _component_dtype(dtype: torch.dtype | Mapping[str, torch.dtype] | None, name: str) -> torch.dtype | None:
    """A component's dtype from ``from_pretrained``'s ``dtype`` (one for all, or per name as in diffusers)."""
    if isinstance(dtype, Mapping):
        return dtype.get(name, dtype.get("default", torch.float32))
    return dtype


def _per_prompt(value: Any, count: int, argument: str) -> list:
    """One value per prompt: ``value`` for each, or the list ``value`` checked against the prompt count."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"`{argument}` has {len(value)} entries but there are {count} prompts.")
    return list(value)


def _pick(values: list, indices: list[int]) -> list:
    return [values[index] for index in indices]


def _groups(values: list) -> list[tuple[Any, list[int]]]:
    """``(value, indices)`` of each distinct value (by equality: dataclasses are not hashable), in order."""
    groups: list[tuple[Any, list[int]]] = []
    for index, value in enumerate(values):
        group = next((indices for known, indices in groups if known == value), None)
        if group is None:
            groups.append((value, [index]))
        else:
            group.append(index)
    return groups


def _request_generators(seed: Seed, counts: Sequence[int]) -> list[torch.Generator] | None:
    """The diffusion decoder's generators for a list of per-request seeds (``None`` for an int or no seed):
    one CPU generator per request, shared by its ``counts[i]`` images in order, so that a request's noise does
    not depend on the others. An unseeded request's generator is seeded from torch's default generator."""
    if not isinstance(seed, (list, tuple)):
        return None
    generators = []
    for request_seed, count in zip(seed, counts, strict=True):
        if request_seed is None:
            request_seed = int(torch.randint(2**62, ()))
        generators += [torch.Generator().manual_seed(int(request_seed))] * count
    return generators


def _unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


def _check_decoder(decoder: str, detokenizer: DetokenizerPipeline | None) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "diffusion" and detokenizer is None:
        raise ValueError(
            "this checkpoint has no detokenizer/: use decoder='pixel' (the tokenizer's own decoder)"
        )


def _check_codebooks(
    llm: UniMMForCausalLM,
    processor: UniMMProcessor,
    visual_tokenizer: DualCodebookTokenizer,
    detokenizer: DetokenizerPipeline | None,
) -> None:
    """All components must speak about the same codebook and image vocabulary."""
    sizes = {
        "llm": llm.config.codebook_size,
        "processor": processor.codebook_size,
        "visual_tokenizer": visual_tokenizer.config.codebook_size,
    }
    if detokenizer is not None:
        sizes["detokenizer"] = detokenizer.decoder.config.codebook_size
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the components were trained on different codebooks (codebook sizes {sizes})")
    if processor.text_vocab_size != llm.config.text_vocab_size:
        raise ValueError(
            f"processor.text_vocab_size={processor.text_vocab_size} but the llm's is "
            f"{llm.config.text_vocab_size}"
        )


def _resolve_folder(pipeline_class: type[DiffusionPipeline], name: str, download_options: dict) -> Path:
    """``name`` as a local folder, or the snapshot of the Hub repo ``name``."""
    path = Path(name).expanduser()
    looks_local = (
        path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1 or path.parent.is_dir()
    )
    if path.exists() or looks_local:
        return path
    try:
        return Path(pipeline_class.download(name, **download_options))
    except Exception as error:  # hub, network and cache errors all mean the same thing to the caller
        raise FileNotFoundError(
            f"{name!r} is not a local folder and could not be downloaded from the Hugging Face Hub "
            f"({type(error).__name__}); pass an existing checkpoint folder or a reachable repo id"
        ) from None


__all__ = [
    "ImagePreviewStreamer",
    "UniMMChatOutput",
    "UniMMImageOutput",
    "UniMMInterleavedOutput",
    "UniMMPipeline",
    "UniMMReconstructionOutput",
]
