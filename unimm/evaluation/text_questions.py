"""Does a language model keep its text skills? 20 general questions with known short answers.

Each question is asked alone in a chat (the tokenizer's chat template), answered greedily; a reply is
correct when one of the accepted answers appears as whole words (case-insensitive) in its first sentence,
so a reply that drifts ("... is called Kepler-41B. It is similar to Earth") does not count. Replies are
kept in the report so a reader can check the judgement."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

QUESTIONS_FILE = "text_questions.json"
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 10


@dataclass(frozen=True)
class TextQuestion:
    question: str
    answers: tuple[str, ...]


@dataclass
class TextQuestionsReport:
    """The score and every (question, reply, correct) triple."""

    correct: int
    total: int
    results: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_text_questions() -> list[TextQuestion]:
    """The 20 questions shipped with unimm (``unimm/evaluation/data/text_questions.json``)."""
    text = resources.files("unimm.evaluation").joinpath("data", QUESTIONS_FILE).read_text(encoding="utf-8")
    return [TextQuestion(row["question"], tuple(row["answers"])) for row in json.loads(text)]


def first_sentence(reply: str) -> str:
    """``reply`` up to its first sentence end (``.``, ``!`` or ``?`` before a space) or line break."""
    return re.split(r"(?<=[.!?])\s|\n", reply.strip(), maxsplit=1)[0]


def is_correct(reply: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Whether one of ``answers`` occurs in the first sentence of ``reply`` as whole words, ignoring case."""
    sentence = first_sentence(reply)
    return any(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", sentence, re.IGNORECASE) for answer in answers)


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


def evaluate_text_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[TextQuestion] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TextQuestionsReport:
    """Ask every question (default: :func:`load_text_questions`) and count the correct replies."""
    questions = questions if questions is not None else load_text_questions()
    replies = greedy_chat_replies(
        model, tokenizer, [q.question for q in questions], max_new_tokens, batch_size
    )
    return judge_replies(questions, replies)


def judge_replies(questions: list[TextQuestion], replies: list[str]) -> TextQuestionsReport:
    """Judge one reply per question, however they were generated (e.g. by ``UniMMPipeline.chat``)."""
    if len(replies) != len(questions):
        raise ValueError(f"got {len(replies)} replies for {len(questions)} questions")
    results = [
        {"question": q.question, "reply": reply, "correct": is_correct(reply, q.answers)}
        for q, reply in zip(questions, replies)
    ]
    return TextQuestionsReport(sum(row["correct"] for row in results), len(results), results)
