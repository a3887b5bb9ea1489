"""The serving engine on the tiny pipeline: one engine call per batch, per-request settings inside it."""

from __future__ import annotations

import re
from pathlib import Path

import PIL.Image
import pytest

import unimm.serving
from unimm.llm import ModalitySampling
from unimm.serving.engine import ChatJob, ImageJob, ServingEngine, StreamCancelled


@pytest.fixture
def engine(tiny_pipeline):
    return ServingEngine(tiny_pipeline, decoder="pixel")


@pytest.fixture
def engine_calls(tiny_pipeline, monkeypatch, count_engine_rows):
    """The number of rows of every engine call."""
    calls = []
    original = tiny_pipeline.llm.generate_multimodal

    def counting(input_ids, *args, **kwargs):
        calls.append(count_engine_rows(input_ids, kwargs))
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


def pixels(images) -> list[bytes]:
    return [image.tobytes() for image in images]


def test_a_seeded_job_gives_generate_images_output(engine, tiny_pipeline):
    (images,) = engine.run([ImageJob("a cat", n=3, grid=(4, 4), guidance_scale=2.0, seed=5)])
    expected = tiny_pipeline.generate_images("a cat", 3, guidance_scale=2.0, seed=[5], decoder="pixel").images
    assert pixels(images) == pixels(expected)


@pytest.mark.parametrize("decoder", ["pixel", "diffusion"])
def test_a_seeded_job_batched_with_others_gives_the_images_it_gets_alone(
    tiny_pipeline, engine_calls, decoder
):
    engine = ServingEngine(tiny_pipeline, decoder=decoder, num_inference_steps=2)
    seeded = [ImageJob("a cat", n=2, grid=(4, 4), guidance_scale=2.0, seed=5),
              ImageJob("a red bag", n=1, grid=(2, 4), guidance_scale=1.0, seed=9)]  # fmt: skip
    others = [ImageJob("a dog", n=2, grid=(4, 4)), ImageJob("a shoe", n=1, grid=(2, 4), seed=1)]
    batched = engine.run([others[0], seeded[0], others[1], seeded[1]])
    alone = [engine.run([job])[0] for job in seeded]
    assert engine_calls == [6, 2, 1]
    assert pixels(batched[1]) == pixels(alone[0]) and pixels(batched[3]) == pixels(alone[1])
    assert pixels(batched[1][:1]) != pixels(batched[1][1:])  # a job's images still differ


def test_seeded_chats_batch_and_answer_as_alone(engine, engine_calls, tiny_pipeline):
    def job(text: str, seed: int | None) -> ChatJob:
        return ChatJob(conversation(text), 10, temperature=0.9, top_p=0.95, seed=seed)

    batched = engine.run([job("what is this ?", 1), job("a", None), job("show me", 2)])
    assert engine_calls == [3]
    sampling = ModalitySampling(do_sample=True, temperature=0.9, top_p=0.95)
    for answer, (text, seed) in zip([batched[0], batched[2]], [("what is this ?", 1), ("show me", 2)]):
        assert answer.text == engine.run([job(text, seed)])[0].text
        assert (
            answer.text
            == tiny_pipeline.chat(text, max_new_tokens=10, text_sampling=sampling, seed=[seed]).text
        )


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


def test_streamed_answers_batch_with_each_other_and_with_plain_ones(engine, engine_calls, tiny_pipeline):
    pieces: dict[str, list[str]] = {"first": [], "second": []}
    jobs = [
        ChatJob(conversation("what is this ?"), 12, on_text=pieces["first"].append),
        ChatJob(conversation("a"), 40),
        ChatJob(conversation("show me"), 5, on_text=pieces["second"].append),
    ]
    first, plain, second = engine.run(jobs)
    assert engine_calls == [3]
    assert len(pieces["first"]) > 1 and "".join(pieces["first"]).strip() == first.text
    assert "".join(pieces["second"]).strip() == second.text
    assert first.text == tiny_pipeline.chat("what is this ?", max_new_tokens=12).text
    assert second.text == tiny_pipeline.chat("show me", max_new_tokens=5).text
    assert plain.text == tiny_pipeline.chat("a", max_new_tokens=40).text


def test_a_cancelled_stream_in_a_batch_stops_only_when_every_client_has_gone(engine):
    kept: list[str] = []
    gone = ChatJob(conversation("what is this ?"), 12)
    gone.on_text = lambda piece: gone.cancelled.set()  # leaves after one piece
    answer = engine.run([gone, ChatJob(conversation("show me"), 12, on_text=kept.append)])[1]
    assert answer.completion_tokens == 12 and "".join(kept).strip() == answer.text  # the other goes on

    both = [ChatJob(conversation(text), 12) for text in ("what is this ?", "show me")]
    for job in both:
        job.on_text = lambda piece, job=job: job.cancelled.set()
    outcomes = engine.run(both)
    assert all(isinstance(outcome, StreamCancelled) for outcome in outcomes)


def test_a_failed_batch_does_not_stream_an_answer_twice(engine, tiny_pipeline, monkeypatch):
    pieces: list[str] = []
    original = tiny_pipeline.llm.generate_multimodal

    def failing_after_streaming(input_ids, *args, **kwargs):
        output = original(input_ids, *args, **kwargs)
        if len(input_ids) > 1:
            raise RuntimeError("the batch failed")
        return output

    monkeypatch.setattr(tiny_pipeline.llm, "generate_multimodal", failing_after_streaming)
    streamed, plain = engine.run(
        [ChatJob(conversation("what is this ?"), 6, on_text=pieces.append), ChatJob(conversation("a"), 6)]
    )
    assert isinstance(streamed, RuntimeError) and pieces  # its text went out once, then the error
    assert plain.completion_tokens == 6  # retried alone


def test_batch_keys(engine):
    chat = conversation("hi")
    assert ChatJob(chat, 4).batch_key == ChatJob(chat, 9, seed=3).batch_key  # greedy ignores seeds
    assert ChatJob(chat, 4, temperature=0.7).batch_key == ChatJob(chat, 4, temperature=0.7).batch_key
    assert ChatJob(chat, 4, temperature=0.7).batch_key != ChatJob(chat, 4, temperature=0.9).batch_key
    # Seeds and streamers are per request: neither keeps a job out of a batch.
    assert ChatJob(chat, 4, temperature=0.7, seed=1).batch_key == ChatJob(chat, 4, temperature=0.7).batch_key
    assert ChatJob(chat, 4, on_text=print).batch_key == ChatJob(chat, 4).batch_key
    assert ImageJob("a", 1, (4, 4)).batch_key == ImageJob("b", 3, (2, 2), guidance_scale=7.0).batch_key
    assert ImageJob("a", 1, (4, 4), seed=0).batch_key == ImageJob("a", 1, (4, 4)).batch_key


def test_the_server_uses_no_private_method_of_the_pipeline_or_its_components():
    # It called pipeline._image_prompts, _decode_grids, _seeded_generators and llm._resolve_eos.
    folder = Path(unimm.serving.__file__).parent
    private = re.compile(r"\b(?!self\b|cls\b|super\(\)\b)(\w+(?:\(\))?)\.(_[A-Za-z]\w*)\b")
    found = [
        f"{path.name}:{number}: {match.group(0)}"
        for path in sorted(folder.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in private.finditer(line)
        if not match.group(2).startswith("__")
    ]
    assert found == []


def test_chat_jobs_with_images_share_one_visual_tokenizer_call(
    engine, engine_calls, tiny_pipeline, monkeypatch
):
    encoded = []
    original = tiny_pipeline.visual_tokenizer.encode
    monkeypatch.setattr(
        tiny_pipeline.visual_tokenizer,
        "encode",
        lambda pixels: encoded.append(len(pixels)) or original(pixels),
    )
    colours = ["red", "blue", "green"]
    images = [PIL.Image.new("RGB", (20, 20), colour) for colour in colours]
    jobs = [
        ChatJob(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        {"type": "text", "text": "what is this ?"},
                    ],
                }
            ],
            6,
        )
        for image in images
    ]
    answers = engine.run([*jobs, ChatJob(conversation("show me"), 6)])
    assert encoded == [3] and engine_calls == [4]
    for image, answer in zip(images, answers):
        assert answer.text == tiny_pipeline.chat("what is this ?", images=image, max_new_tokens=6).text


def test_streamed_image_jobs_get_their_own_previews_and_the_same_images(engine, engine_calls):
    previews: dict[str, list[tuple[int, int, tuple[int, int]]]] = {"cat": [], "bag": []}

    def collect(name):
        return lambda index, partial, image: previews[name].append((index, partial, image.size))

    jobs = [
        ImageJob("a cat", n=2, grid=(4, 4), seed=1, partial_images=2, on_preview=collect("cat")),
        ImageJob("a dog", n=1, grid=(4, 4), seed=2),
        ImageJob("a bag", n=1, grid=(2, 4), seed=3, partial_images=3, on_preview=collect("bag")),
    ]
    streamed = engine.run(jobs)
    assert engine_calls == [4]  # one engine call, previews or not
    # 4 rows, 2 partial images: after rows 1 and 3; 2 rows, 3 partial images: after row 1 only.
    assert sorted(previews["cat"]) == [(0, 0, (16, 16)), (0, 1, (16, 16)), (1, 0, (16, 16)), (1, 1, (16, 16))]
    assert previews["bag"] == [(0, 0, (16, 8))]
    assert jobs[0].streamed and not jobs[1].streamed and jobs[0].prompt_tokens > 0
    plain = engine.run([ImageJob(job.prompt, n=job.n, grid=job.grid, seed=job.seed) for job in jobs])
    assert [pixels(images) for images in streamed] == [pixels(images) for images in plain]


def test_streamed_image_jobs_stop_the_engine_only_when_every_client_has_gone(engine):
    gone = ImageJob("a cat", n=1, grid=(4, 4), partial_images=3)
    gone.on_preview = lambda *preview: gone.cancelled.set()  # leaves after the first preview
    kept = ImageJob("a dog", n=1, grid=(4, 4))
    outcomes = engine.run([gone, kept])
    assert [len(images) for images in outcomes] == [1, 1]  # the other request still wants its image

    both = [ImageJob(prompt, n=1, grid=(4, 4), partial_images=3) for prompt in ("a cat", "a dog")]
    for job in both:
        job.on_preview = lambda *preview, job=job: job.cancelled.set()
    outcomes = engine.run(both)
    assert all(isinstance(outcome, StreamCancelled) for outcome in outcomes)
