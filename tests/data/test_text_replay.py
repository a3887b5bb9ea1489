"""Text replay: questions that stay clear of the evaluation, the model's own finished replies, the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from unimm.data.text_replay import (
    QUESTION_TEMPLATES,
    TOPICS,
    content_words,
    load_text_replay,
    overlaps_evaluation,
    replay_questions,
    save_text_replay,
)
from unimm.evaluation.text_questions import load_text_questions
from unimm.llm.text_chat import generate_text_replay


def test_no_replay_question_overlaps_the_evaluation() -> None:
    evaluation = [q.question for q in load_text_questions()]
    questions = replay_questions(evaluation)
    assert len(questions) == len(TOPICS) * len(QUESTION_TEMPLATES) == len(set(questions))
    assert not set(questions) & set(evaluation)
    # a topic list that does name an evaluation subject loses exactly those questions
    leaky = replay_questions(
        evaluation, topics=["bread", "the capital of France"], templates=["What is {topic}?"]
    )
    assert leaky == ["What is bread?"]


def test_overlap_uses_content_words() -> None:
    assert content_words("What is the capital of France?") == {"capital", "france"}
    assert overlaps_evaluation("What's the capital city of France?", ["What is the capital of France?"])
    assert not overlaps_evaluation("What is the capital of Peru?", ["What is the capital of France?"])


def test_only_finished_replies_are_kept(tiny_chat_model) -> None:
    model, tokenizer = tiny_chat_model
    questions = ["w1 w2", "w3", "w4 w5 w6"]
    # every word ends a reply: each reply is one word and finished
    model.generation_config.eos_token_id = list(range(5, len(tokenizer)))
    chats = generate_text_replay(model, tokenizer, questions, max_new_tokens=4, batch_size=2)
    assert [chat["question"] for chat in chats] == questions
    assert all(len(chat["answer"].split()) == 1 for chat in chats)
    # no token ends a reply: nothing is kept
    model.generation_config.eos_token_id = [tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    assert generate_text_replay(model, tokenizer, questions, max_new_tokens=3) == []


def test_file_round_trip_and_malformed_lines(tmp_path: Path) -> None:
    chats = [{"question": "What is bread?", "answer": "Bread is food made from flour."}]
    save_text_replay(chats, tmp_path / "replay.jsonl")
    assert load_text_replay(tmp_path / "replay.jsonl") == chats
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        load_text_replay(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not JSON"):
        load_text_replay(tmp_path / "broken.jsonl")
