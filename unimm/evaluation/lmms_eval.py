"""unimm as an `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ model: MMBench, POPE, MME, ... on
any unimm checkpoint with the harness the field reports them from.

lmms-eval finds the model through its entry-point group ``lmms_eval.models`` (unimm's ``setup.cfg`` declares
``unimm = unimm.evaluation.lmms_eval:model_manifest``), so with both packages installed::

    lmms-eval --model unimm --model_args pretrained=checkpoints/demo,dtype=bfloat16 --tasks pope --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model unimm --model_args pretrained=org/name --tasks mmbench_en_dev

Requests are answered through :meth:`UniMMPipeline.chat`, ``batch_size`` at a time (requests with the same
generation settings together, longest first). ``generate_until`` answers in text and cuts the answer at the
task's ``until`` strings; ``loglikelihood`` (multiple-choice tasks) scores a continuation under the language
model's text distribution (image tokens excluded, as in chat), after the same chat prompt. Its score follows
lmms-eval's models rather than its docstring: the mean negative log-likelihood per continuation token (LLaVA's
``loss``), lower is likelier, since lmms-eval's ``multiple_choice`` picks the choice with the lowest score.

lmms-eval 0.7.3 requires torchvision and a torch of its own choosing (``pip install lmms-eval`` next to a CPU
torch 2.13 would install torch 2.14 with CUDA 13 and torchvision 0.29). Where torch must stay as it is, its
evaluator and task system (all this adapter and YAML tasks need) run without them::

    pip install --no-deps lmms-eval==0.7.3
    pip install loguru tenacity sacrebleu pytz evaluate jsonlines pytablewriter "filelock<4"

(lmms-eval 0.7.3's evaluator imports ``filelock._api``, which filelock 4 no longer has.)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from accelerate import PartialState
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from unimm.llm import ModalitySampling
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.conversations import conversations_with_images

logger = logging.getLogger(__name__)

MODEL_ID = "unimm"
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_PLACEHOLDER = "<image>"  # where a task's prompt puts its images, when it says (LLaVA's convention)
DEFAULT_MAX_NEW_TOKENS = 256
IGNORED_GENERATION_KWARGS = ("image_aspect_ratio", "num_beams", "use_cache")


def model_manifest():
    """lmms-eval's registration of unimm (the target of the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{UniMMLmms.__name__}")


class UniMMLmms(lmms):
    """A unimm checkpoint as an lmms-eval "simple" model (requests carry the task's prompt text and a
    function that gives the document's images).

    Args:
        pretrained: a checkpoint folder or Hub repo id (``UniMMPipeline.from_pretrained``).
        device: torch device; default: this process's device under ``accelerate launch`` (``cuda:<local
            rank>``), else CUDA if available, else the CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        batch_size: requests per ``chat`` call (lmms-eval's ``--batch_size``).
        max_new_tokens: answer length when the task's ``generation_kwargs`` do not say.
        seed: of sampled answers: request ``doc_id`` samples with ``seed + doc_id``, whatever its batch.
        attn_implementation: passed to the language model (``"sdpa"``, ``"flash_attention_2"``, ...).
        max_batch_size: lmms-eval's option for automatic batch sizes; unused (batches are ``batch_size``).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        seed: int = 0,
        attn_implementation: str | None = None,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"unimm (lmms-eval model): unknown model_args {sorted(kwargs)}; it takes pretrained, device, "
                "dtype, batch_size, max_new_tokens, seed, attn_implementation"
            )
        if dtype not in DTYPES:
            raise ValueError(f"unimm (lmms-eval model): dtype must be one of {DTYPES}, got {dtype!r}")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(
                f"unimm (lmms-eval model): batch_size must be a positive int, got {batch_size!r}"
            ) from None
        if self.batch_size < 1:
            raise ValueError(
                f"unimm (lmms-eval model): batch_size must be a positive int, got {batch_size!r}"
            )
        state = PartialState()  # one process, or this rank of `accelerate launch` / torchrun
        self._rank, self._world_size = state.process_index, state.num_processes
        self._device = torch.device(device) if device else state.device
        self.pipeline = UniMMPipeline.from_pretrained(
            pretrained,
            dtype=getattr(torch, dtype),
            device=self._device,
            attn_implementation=attn_implementation,
        )
        self.pipeline.set_progress_bar_config(disable=True)
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self._warned: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request in text: its ``args`` are ``(context, generation_kwargs, doc_to_visual, doc_id,
        task, split)``; the answer ends before the first of ``generation_kwargs["until"]``."""
        answers: list[str | None] = [None] * len(requests)
        arguments = [request.args for request in requests]
        for indices in _batches(arguments, self.batch_size, key=lambda args: _settings_key(args[1])):
            generation_kwargs = dict(arguments[indices[0]][1] or {})
            until = _stop_strings(generation_kwargs.pop("until", None))
            max_new_tokens = int(generation_kwargs.pop("max_new_tokens", self.max_new_tokens))
            conversations, images = zip(
                *(self._conversation(arguments[index][0], *arguments[index][2:6]) for index in indices)
            )
            output = self.pipeline.chat(
                list(conversations),
                images=list(images),
                max_new_tokens=max_new_tokens,
                text_sampling=self._text_sampling(generation_kwargs),
                seed=[self.seed + int(arguments[index][3]) for index in indices],
            )
            for index, text in zip(indices, output.texts):
                answers[index] = _cut(text, until)
                self.cache_hook.add_partial("generate_until", arguments[index][:2], answers[index])
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "unimm (lmms-eval model) answers generate_until and loglikelihood requests; multi-round tasks are "
            "not supported: evaluate a multi-turn conversation with UniMMPipeline.chat(messages) instead"
        )

    def _conversation(
        self,
        context: str,
        doc_to_visual: Callable[[dict], Any] | None,
        doc_id: int,
        task: str,
        split: str,
    ) -> tuple[list[dict], list]:
        """The chat conversation of one request and its images (placeholders in the conversation)."""
        visuals = self._visuals(doc_to_visual, doc_id, task, split)
        if not visuals:
            return [{"role": "user", "content": context}], []
        image_part = {"type": "image"}
        if context.count(IMAGE_PLACEHOLDER) == len(visuals):  # the task placed its images in the text
            content: list[dict] = []
            for index, piece in enumerate(context.split(IMAGE_PLACEHOLDER)):
                if index:
                    content.append(dict(image_part))
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
        else:
            content = [dict(image_part) for _ in visuals] + [{"type": "text", "text": context}]
        return [{"role": "user", "content": content}], visuals

    def _visuals(
        self, doc_to_visual: Callable[[dict], Any] | None, doc_id: int, task: str, split: str
    ) -> list[PIL.Image.Image | str]:
        """The images of document ``doc_id``: PIL images or image file paths (anything else is an error)."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        for visual in visuals:
            if not isinstance(visual, (PIL.Image.Image, str, os.PathLike)):
                raise ValueError(
                    f"unimm (lmms-eval model): task {task!r}, doc {doc_id} gives a {type(visual).__name__} "
                    "visual; unimm answers about images (PIL images or image files), not video or audio"
                )
        return visuals

    def _text_sampling(self, generation_kwargs: dict[str, Any]) -> ModalitySampling:
        """lmms-eval's generation settings as the text sampling of ``chat`` (greedy unless they sample)."""
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(generation_kwargs.pop("do_sample", False)) or temperature > 0
        top_p = generation_kwargs.pop("top_p", None)
        top_k = generation_kwargs.pop("top_k", None)
        if int(generation_kwargs.get("num_beams", 1) or 1) > 1:
            self._warn_once("num_beams", "unimm decodes without beam search: num_beams is ignored")
        unknown = sorted(set(generation_kwargs) - set(IGNORED_GENERATION_KWARGS))
        if unknown:
            self._warn_once(str(unknown), f"unimm ignores the generation settings {unknown}")
        if not do_sample:
            return ModalitySampling(do_sample=False)
        return ModalitySampling(
            do_sample=True,
            temperature=temperature or 1.0,
            top_p=float(top_p) if top_p is not None else None,
            top_k=int(top_k) if top_k is not None else None,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ------------------------------------------------------------------ loglikelihood
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(loss, is_greedy)`` of each request's continuation after its chat prompt: ``args`` are ``(context,
        continuation or doc_to_target, doc_to_visual, doc_id, task, split)``, or ``(context, continuation)``
        without images. ``loss`` is the mean negative log-likelihood of the continuation's tokens over the text
        vocabulary (as chat decodes them): lmms-eval's convention, whose ``multiple_choice`` picks the lowest.

        Each pair comes wrapped in a ``GenerationResult``: lmms-eval 0.7's evaluator passes a model's responses
        through ``unwrap_generation_output``, which turns anything but a string or a ``GenerationResult`` into
        ``str(response)`` (and its ``multiple_choice`` scoring then fails on the string); a
        ``GenerationResult`` hands the pair on untouched."""
        results: list[GenerationResult | None] = [None] * len(requests)
        arguments = [_loglikelihood_arguments(request.args) for request in requests]
        for indices in _batches(arguments, self.batch_size, key=lambda args: ""):
            conversations, images, continuations = [], [], []
            for index in indices:
                context, target, doc_to_visual, doc_id, task, split = arguments[index]
                conversation, visuals = self._conversation(context, doc_to_visual, doc_id, task, split)
                conversations.append(conversation)
                images.append(visuals)
                if not isinstance(target, str):  # loglikelihood tasks pass doc_to_target
                    target = str(target(self.task_dict[task][split][doc_id]))
                continuations.append(target)
            scores = self._score(conversations_with_images(conversations, images), continuations)
            for index, score in zip(indices, scores):
                results[index] = GenerationResult(text=score)
                self.cache_hook.add_partial("loglikelihood", arguments[index][:2], score)
        return results

    def _score(self, conversations: list[list[dict]], continuations: list[str]) -> list[tuple[float, bool]]:
        """Mean negative log-likelihoods of the continuations' tokens (and whether greedy decoding writes each
        one)."""
        llm, processor = self.pipeline.llm, self.pipeline.processor
        batch = processor(messages=conversations, add_generation_prompt=True)
        prompts = [
            row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])
        ]
        targets = [processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
        rows = [prompt + target for prompt, target in zip(prompts, targets)]
        length = max(len(row) for row in rows)
        pad = processor.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows], device=llm.device)
        attention_mask = torch.tensor(
            [[1] * len(row) + [0] * (length - len(row)) for row in rows], device=llm.device
        )
        logits = llm(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        text_logits = logits[..., : llm.config.text_vocab_size].float()
        scores = []
        for row, (prompt, target) in enumerate(zip(prompts, targets)):
            if not target:
                scores.append((0.0, True))
                continue
            # Position t predicts token t + 1: the continuation's tokens from the prompt's last position on.
            predicting = text_logits[row, len(prompt) - 1 : len(prompt) + len(target) - 1]  # (n, V_text)
            expected = torch.tensor(target, device=predicting.device)
            log_probs = predicting.log_softmax(-1).gather(-1, expected[:, None])[:, 0]
            scores.append((float(-log_probs.mean()), bool((predicting.argmax(-1) == expected).all())))
        return scores


def _loglikelihood_arguments(args: Sequence[Any]) -> tuple:
    """``(context, target, doc_to_visual, doc_id, task, split)`` of a loglikelihood request; the unconditional
    requests of mutual-information metrics carry only ``(context, continuation)``."""
    if len(args) == 2:
        return (args[0], args[1], None, 0, None, None)
    if len(args) != 6:
        raise ValueError(
            f"unimm (lmms-eval model): a loglikelihood request has 2 or 6 arguments, got {len(args)}"
        )
    return tuple(args)


def _batches(
    arguments: list[Sequence[Any]], size: int, key: Callable[[Sequence[Any]], str]
) -> list[list[int]]:
    """Request indices in batches of at most ``size``: the same ``key`` (generation settings) together,
    longest context first within each, so padding is small and an out-of-memory error comes early."""
    groups: dict[str, list[int]] = {}
    for index, args in enumerate(arguments):
        groups.setdefault(key(args), []).append(index)
    batches = []
    for indices in groups.values():
        indices.sort(key=lambda index: -len(arguments[index][0]))
        batches += [indices[start : start + size] for start in range(0, len(indices), size)]
    return batches


def _settings_key(generation_kwargs: dict[str, Any] | None) -> str:
    return json.dumps(generation_kwargs or {}, sort_keys=True, default=str)


def _stop_strings(until: str | Sequence[str] | None) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        return list(until)
    raise ValueError(
        f"unimm (lmms-eval model): generation_kwargs['until'] must be a string or a list, got {until!r}"
    )


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


__all__ = ["MODEL_ID", "UniMMLmms", "model_manifest"]
