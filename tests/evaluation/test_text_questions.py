"""The 20 text questions: the data file, the judge, and batched greedy chat on a tiny random Llama."""

from __future__ import annotations

import pytest

from unimm.evaluation.text_questions import (
    TextQuestion,
    evaluate_text_questions,
    first_sentence,
    is_correct,
    judge_replies,
    load_text_questions,
)
from unimm.llm.text_chat import greedy_chat_replies

NUMBER_OF_QUESTIONS = 20


def test_shipped_questions_are_twenty_with_answers() -> None:
    questions = load_text_questions()
    assert len(questions) == NUMBER_OF_QUESTIONS
    assert len({q.question for q in questions}) == NUMBER_OF_QUESTIONS
    assert all(q.question.endswith("?") and q.answers and all(q.answers) for q in questions)


@pytest.mark.parametrize(
    ("reply", "answers", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("paris", ["Paris"], True),
        ("Water freezes at 0°C. Or 32°F.", ["0", "zero"], True),
        ("2 + 3 = 5", ["5", "five"], True),
        ("It is 15.", ["5", "five"], False),  # a digit inside another number
        ("The capital of France is Parisian.", ["Paris"], False),
        ("We live on Kepler-41B. It is similar to Earth.", ["Earth"], False),  # right word, later sentence
        ("Plants absorb carbon dioxide (CO2).", ["carbon dioxide", "CO2"], True),
        ("", ["Paris"], False),
    ],
)
def test_judge(reply: str, answers: list[str], expected: bool) -> None:
    assert is_correct(reply, answers) is expected


def test_first_sentence_keeps_decimals() -> None:
    assert first_sentence("About 149.7 million km2. Next.") == "About 149.7 million km2."


def test_batched_replies_equal_one_by_one(tiny_chat_model) -> None:
    model, tokenizer = tiny_chat_model
    # prompts of different lengths, so the batch is left-padded
    questions = ["w1", "w2 w3 w4 w5", "w6 w7", "w8 w9 w10 w11 w12 w13"]
    batched = greedy_chat_replies(model, tokenizer, questions, max_new_tokens=6, batch_size=4)
    alone = greedy_chat_replies(model, tokenizer, questions, max_new_tokens=6, batch_size=1)
    assert batched == alone
    assert any(reply for reply in batched)


def test_report_counts_the_judged_replies(tiny_chat_model) -> None:
    model, tokenizer = tiny_chat_model
    questions = [
        TextQuestion("w1 w2", ("w3",)),
        TextQuestion("w4", ("w5",)),
        TextQuestion("w6 w7 w8", ("w9",)),
    ]
    replies = greedy_chat_replies(model, tokenizer, [q.question for q in questions], max_new_tokens=5)
    # accept each question's actual first reply word for the first question only
    questions[0] = TextQuestion(questions[0].question, (replies[0].split()[0],))
    report = evaluate_text_questions(model, tokenizer, questions, max_new_tokens=5, batch_size=2)
    assert [row["reply"] for row in report.results] == replies
    expected = [is_correct(reply, q.answers) for q, reply in zip(questions, replies)]
    assert [row["correct"] for row in report.results] == expected
    assert report.correct == sum(expected) >= 1 and report.total == 3
    assert report.accuracy == pytest.approx(sum(expected) / 3)


def test_judge_replies_needs_one_reply_per_question() -> None:
    questions = [TextQuestion("w1", ("w2",)), TextQuestion("w3", ("w4",))]
    report = judge_replies(questions, ["w2 yes.", "no."])
    assert (report.correct, report.total) == (1, 2)
    with pytest.raises(ValueError, match="1 replies for 2 questions"):
        judge_replies(questions, ["w2"])


def test_tokenizer_without_pad_token_fails_clearly(tiny_chat_model) -> None:
    model, tokenizer = tiny_chat_model
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        greedy_chat_replies(model, tokenizer, ["w1"])
