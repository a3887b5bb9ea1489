"""A checkpoint folder from separately trained parts (``unimm assemble``).

The stages export their components on their own: the LLM stage an ``llm`` folder (model, and the
processor it was prepared with), the tokenizer stage a visual tokenizer, the detokenizer stage a diffusers
pipeline. ``assemble_pipeline`` loads them, checks that they fit together (same codebook, same text
vocabulary) and writes one Hub-layout folder with its model card. The folder is written under a temporary
name and renamed when complete, so an interrupted run never leaves a folder that looks whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from unimm.detokenizer import DetokenizerPipeline
from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.sampling import ModalitySampling, set_image_sampling
from unimm.llm.text_tokenizer import END_OF_TURN
from unimm.tokenizer import DualCodebookTokenizer

from .pipeline_unimm import UniMMPipeline

logger = logging.getLogger(__name__)

PROCESSOR_FILE = "processor_config.json"
MODEL_INDEX = "model_index.json"
TEMPORARY_PREFIX = ".tmp-"


def stop_at_end_of_turn(llm: UniMMForCausalLM, tokenizer) -> None:
    """Chat answers of the word-level template end with its end-of-turn marker, not with EOS: generation
    stops at both. (A pretrained chat tokenizer's EOS already ends its turns.)"""
    if END_OF_TURN not in tokenizer.get_vocab():
        return
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = llm.generation_config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    llm.generation_config.eos_token_id = [*eos, end_of_turn] if end_of_turn not in eos else eos


def _processor_folder(llm_dir: Path, processor_dir: str | os.PathLike | None) -> Path:
    folder = Path(processor_dir) if processor_dir is not None else llm_dir
    if not (folder / PROCESSOR_FILE).is_file():
        where = "--processor" if processor_dir is not None else f"the LLM folder {llm_dir}"
        raise FileNotFoundError(
            f"no processor ({PROCESSOR_FILE}) in {folder} ({where}): pass the folder `unimm prepare` wrote "
            "(the LLM's initial folder), or an LLM export made by `unimm export`, which carries it"
        )
    return folder


def _existing_folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no folder at {folder}")
    return folder


def assemble_pipeline(
    llm: str | os.PathLike,
    visual_tokenizer: str | os.PathLike,
    output_dir: str | os.PathLike,
    processor: str | os.PathLike | None = None,
    detokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    prompt_format: str = "chat",
    training_data: Sequence[str] | None = None,
    metrics: Mapping[str, float | str] | None = None,
    image_sampling: ModalitySampling | None = None,
) -> Path:
    """Write a ``UniMMPipeline`` folder at ``output_dir`` from the trained parts' folders.

    ``processor`` defaults to the one inside ``llm``; ``dtype`` (e.g. ``torch.bfloat16`` for a smaller
    folder) applies to the LLM only, the others keep their stored dtype; ``None`` keeps the LLM's too.
    ``training_data`` and ``metrics`` go to the model card. ``image_sampling`` becomes the checkpoint's own
    sampling of image codes, used when a call names none (its generation config's ``image_temperature``,
    ``image_top_k`` and ``image_top_p``; :func:`~unimm.llm.sampling.default_image_sampling`). Returns
    ``output_dir``."""
    llm_dir = _existing_folder(llm, "llm")
    tokenizer_dir = _existing_folder(visual_tokenizer, "visual_tokenizer")
    processor_dir = _processor_folder(llm_dir, processor)
    detokenizer_dir = _existing_folder(detokenizer, "detokenizer") if detokenizer is not None else None

    language_model = UniMMForCausalLM.from_pretrained(llm_dir, dtype=dtype or "auto").eval()
    text_processor = UniMMProcessor.from_pretrained(processor_dir)
    stop_at_end_of_turn(language_model, text_processor.tokenizer)
    if image_sampling is not None:
        set_image_sampling(language_model.generation_config, image_sampling)
    pipeline = UniMMPipeline(
        llm=language_model,
        processor=text_processor,
        visual_tokenizer=DualCodebookTokenizer.from_pretrained(tokenizer_dir).eval(),
        detokenizer=DetokenizerPipeline.from_pretrained(detokenizer_dir) if detokenizer_dir else None,
        prompt_format=prompt_format,
    )  # checks that the parts share one codebook and one text vocabulary

    output_dir = Path(output_dir).resolve()  # through a link (checkpoints/demo) to the folder itself
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / MODEL_INDEX).is_file():
        raise FileExistsError(
            f"{output_dir} exists and is not a checkpoint folder (no {MODEL_INDEX}); choose another output"
        )
    temporary = output_dir.with_name(f"{TEMPORARY_PREFIX}{output_dir.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary, training_data=training_data, metrics=metrics)
    if output_dir.exists():  # an earlier assembly (or an empty folder): replaced whole
        shutil.rmtree(output_dir)
    os.replace(temporary, output_dir)
    logger.info("assembled %s from %s, %s, %s", output_dir, llm_dir, tokenizer_dir, detokenizer_dir or "-")
    return output_dir
