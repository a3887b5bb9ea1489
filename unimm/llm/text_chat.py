"""Greedy chat replies of a plain causal LM (no images): batched, through the tokenizer's chat template.

Used to check a converted or a fine-tuned text model (``unimm.evaluation.text_questions``) and to let a
pretrained model answer the questions of its own text replay (``generate_text_replay``; the questions and
files are ``unimm.data.text_replay``'s).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 10


def _chat_batch(questions: list[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    # left padding keeps every prompt's last token at the end of the row, where generation continues
    return tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )


@torch.no_grad()
def chat_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> list[tuple[str, bool]]:
    """One greedy chat reply per question, generated in batches, with whether it ended (an end-of-turn or
    EOS token) within ``max_new_tokens``."""
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    eos = model.generation_config.eos_token_id
    eos_ids = torch.tensor(
        [tokenizer.eos_token_id] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    )
    replies: list[tuple[str, bool]] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="chat replies", disable=not progress, leave=False):
        batch = _chat_batch(questions[start : start + batch_size], tokenizer).to(model.device)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()  # (B, new)
        finished = torch.isin(new_tokens, eos_ids).any(dim=1).tolist()
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        replies += [(text.strip(), ended) for text, ended in zip(texts, finished)]
    return replies


def greedy_chat_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """One greedy chat reply per question, generated in batches."""
    return [reply for reply, _ in chat_replies(model, tokenizer, questions, max_new_tokens, batch_size)]


def generate_text_replay(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[dict[str, str]]:
    """``[{"question", "answer"}]``: the model's greedy chat reply to each question. Replies that do not end
    within ``max_new_tokens`` are left out: trained on, a cut reply would teach the model to stop mid-sentence."""
    replies = chat_replies(model, tokenizer, list(questions), max_new_tokens, batch_size, progress=True)
    chats = [
        {"question": question, "answer": reply}
        for question, (reply, ended) in zip(questions, replies)
        if ended and reply
    ]
    logger.info(
        "text replay: %d of %d replies ended within %d tokens", len(chats), len(questions), max_new_tokens
    )
    return chats
