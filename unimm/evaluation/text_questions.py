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

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unimm.llm.text_chat import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, greedy_chat_replies

QUESTIONS_FILE = "text_questions.json"


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
