"""The serving engine on the tiny pipeline: one engine call per batch, per-request settings inside it."""

from __future__ import annotations

import pytest

from unimm.serving.engine import ChatJob, ImageJob, ServingEngine, StreamCancelled


@pytest.fixture
def engine(tiny_pipeline):
    return ServingEngine(tiny_pipeline, decoder="pixel")


@pytest.fixture
def engine_calls(tiny_pipeline, monkeypatch):
    """The number of rows of every engine call."""
    calls = []
    original = tiny_pipeline.llm.generate_multimodal

    def counting(input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(tiny_pipeline.llm, "generate_multimodal", counting)
    return calls


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_image_requests_with_different_n_sizes_and_guidance_share_one_engine_call(engine, engine_calls):
    jobs = [
        ImageJob("a cat", n=2, grid=(4, 4), guidance_scale=3.0),
        ImageJob("a red dog", n=1, grid=(4, 6), guidance_scale=1.0),
        ImageJob("a bag", n=3, grid=(2, 4), guidance_scale=5.0),
    ]
    results = engine.run(jobs)
    assert engine_calls == [6]
    assert [len(images) for images in results] == [2, 1, 3]
    assert [images[0].size for images in results] == [(16, 16), (24, 16), (16, 8)]


def test_a_seeded_job_gives_generate_images_output(engine, tiny_pipeline):
    (images,) = engine.run([ImageJob("a cat", n=3, grid=(4, 4), guidance_scale=2.0, seed=5)])
    expected = tiny_pipeline.generate_images("a cat", 3, guidance_scale=2.0, seed=5, decoder="pixel").images
    assert [image.tobytes() for image in images] == [image.tobytes() for image in expected]


def test_chat_answers_in_one_call_each_cut_at_its_own_max_tokens(engine, engine_calls, tiny_pipeline):
    jobs = [ChatJob(conversation("what is this ?"), 3), ChatJob(conversation("a"), 40)]
    short, long = engine.run(jobs)
    assert engine_calls == [2]
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    assert short.text == tiny_pipeline.chat("what is this ?", max_new_tokens=3).text
    assert long.text == tiny_pipeline.chat("a", max_new_tokens=40).text
    # The tiny model ends "a" with the end-of-turn token within 40 tokens (21, counting it).
    assert (long.completion_tokens, long.finish_reason) == (21, "stop")


def test_a_job_over_the_context_fails_alone(engine):
    jobs = [ChatJob(conversation("what is this ?"), 4), ChatJob(conversation("what " * 250), 4)]
    good, bad = engine.run(jobs)
    assert good.completion_tokens == 4
    assert isinstance(bad, ValueError) and "context" in str(bad)


def test_a_streamed_answer_arrives_in_pieces_and_stops_when_cancelled(engine, tiny_pipeline):
    pieces = []
    job = ChatJob(conversation("what is this ?"), 12, on_text=pieces.append)
    (answer,) = engine.run([job])
    assert len(pieces) > 1 and "".join(pieces).strip() == answer.text
    assert answer.text == tiny_pipeline.chat("what is this ?", max_new_tokens=12).text

    cancelled = ChatJob(conversation("what is this ?"), 12)
    cancelled.on_text = lambda piece: cancelled.cancelled.set()  # the client leaves after one piece
    (outcome,) = engine.run([cancelled])
    assert isinstance(outcome, StreamCancelled)


def test_batch_keys(engine):
    chat = conversation("hi")
    assert ChatJob(chat, 4).batch_key == ChatJob(chat, 9, seed=3).batch_key  # greedy ignores seeds
    assert ChatJob(chat, 4, temperature=0.7).batch_key == ChatJob(chat, 4, temperature=0.7).batch_key
    assert ChatJob(chat, 4, temperature=0.7).batch_key != ChatJob(chat, 4, temperature=0.9).batch_key
    assert ChatJob(chat, 4, temperature=0.7, seed=1).batch_key is None
    assert ChatJob(chat, 4, on_text=print).batch_key is None
    assert ImageJob("a", 1, (4, 4)).batch_key == ImageJob("b", 3, (2, 2), guidance_scale=7.0).batch_key
    assert ImageJob("a", 1, (4, 4), seed=0).batch_key is None
