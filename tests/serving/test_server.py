"""The server over real HTTP: the official ``openai`` client, batching of concurrent requests, a server that
stays responsive while the engine works, and a full queue."""

from __future__ import annotations

import base64
import io
import threading

import openai
import PIL.Image
import pytest

from unimm.serving import BackgroundServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_lists_the_model_and_chats_about_an_image(openai_client, png_data_url):
    assert [model.id for model in openai_client.models.list()] == ["tiny"]
    completion = openai_client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url}},
                    {"type": "text", "text": "what is this ?"},
                ],
            }
        ],
        max_tokens=6,
    )
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content  # the untrained model's words
    assert completion.usage.completion_tokens <= 6


def test_openai_client_streams_a_chat_answer(openai_client):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "what is this ?"}], "max_tokens": 8}
    whole = openai_client.chat.completions.create(**request).choices[0].message.content
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in openai_client.chat.completions.create(**request, stream=True)
        if chunk.choices
    ]
    assert len([piece for piece in pieces if piece]) > 1
    assert "".join(pieces).strip() == whole


def test_openai_client_generates_images_with_our_guidance_and_seed(openai_client):
    result = openai_client.images.generate(
        model="tiny",
        prompt="a cat",
        n=2,
        size="16x16",
        response_format="b64_json",
        extra_body={"guidance_scale": 2.0, "seed": 3},
    )
    images = [PIL.Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [image.size for image in images] == [(16, 16), (16, 16)]
    again = openai_client.images.generate(
        model="tiny", prompt="a cat", n=2, size="16x16", extra_body={"seed": 3}
    )
    assert len(again.data) == 2


def test_openai_client_raises_the_servers_errors(openai_client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="limit of 4") as error:
        openai_client.images.generate(model="tiny", prompt="a cat", n=9)
    assert error.value.body["param"] == "n"


def test_concurrent_requests_are_decoded_in_one_batch_while_health_answers(
    server, engine_gate, http, wait_until
):
    """One request holds the engine; four more arrive meanwhile and are decoded together next."""
    url = f"{server.url}/v1/images/generations"
    statuses: list[int] = []

    def generate(prompt: str) -> None:
        statuses.append(http("POST", url, {"prompt": prompt, "n": 1})[0])

    def health() -> dict:
        return http("GET", f"{server.url}/health", timeout=5)[1]

    first = threading.Thread(target=generate, args=("a cat",))
    first.start()
    wait_until(lambda: engine_gate.rows == [1], what="the first request to reach the engine")
    # The engine is busy (held): the server still answers at once.
    assert health()["running"] == 1
    others = [threading.Thread(target=generate, args=(f"a dog {index}",)) for index in range(4)]
    for thread in others:
        thread.start()
    wait_until(lambda: health()["queued"] == 4, what="four queued requests")
    batches_before = health()["batches"]
    engine_gate.release.set()
    for thread in (first, *others):
        thread.join(timeout=60)
    assert statuses == [200] * 5
    assert engine_gate.rows == [1, 4]  # the four waiting requests: one engine call
    assert health()["batches"] == batches_before + 2


def test_seeded_image_requests_and_streamed_chats_batch_with_others(
    server, openai_client, engine_gate, http, wait_until
):
    """Held behind a running request, a seeded and an unseeded image request share the next engine call,
    and two streamed chats the one after; each answers as it does alone."""
    url = f"{server.url}/v1/images/generations"
    seeded = {"prompt": "a dog", "n": 2, "size": "16x16", "seed": 7}
    results: dict[str, object] = {}

    def post(name: str, body: dict) -> None:
        results[name] = http("POST", url, body)

    def stream(name: str, text: str) -> None:
        chunks = openai_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": text}], max_tokens=8, stream=True
        )
        results[name] = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    first = threading.Thread(target=post, args=("first", {"prompt": "a cat"}))
    first.start()
    wait_until(lambda: engine_gate.rows == [1], what="the first request to reach the engine")
    threads = [
        threading.Thread(target=post, args=("seeded", seeded)),
        threading.Thread(target=post, args=("plain", {"prompt": "a bag", "size": "16x16"})),
        threading.Thread(target=stream, args=("what", "what is this ?")),
        threading.Thread(target=stream, args=("show", "show me")),
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: http("GET", f"{server.url}/health")[1]["queued"] == 4, what="four queued requests")
    engine_gate.release.set()
    for thread in (first, *threads):
        thread.join(timeout=60)
    # The images in one call, the two streams in another (in the order they arrived).
    assert engine_gate.rows[0] == 1 and sorted(engine_gate.rows[1:]) == [2, 3]
    assert results["seeded"][0] == results["plain"][0] == 200
    alone = http("POST", url, seeded)[1]
    assert [item["b64_json"] for item in results["seeded"][1]["data"]] == [
        item["b64_json"] for item in alone["data"]
    ]
    for name, text in (("what", "what is this ?"), ("show", "show me")):
        answer = openai_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": text}], max_tokens=8
        )
        assert results[name].strip() == answer.choices[0].message.content


def test_a_full_queue_answers_429_in_the_openai_shape(make_app, engine_gate, http, wait_until):
    with BackgroundServer(make_app(max_queue_size=1, batch_wait_ms=0.0)) as small:
        url = f"{small.url}/v1/images/generations"
        threads = [threading.Thread(target=http, args=("POST", url, {"prompt": "a cat"})) for _ in range(2)]
        threads[0].start()
        wait_until(lambda: engine_gate.rows == [1], what="the first request to reach the engine")
        threads[1].start()
        wait_until(lambda: http("GET", f"{small.url}/health")[1]["queued"] == 1, what="a queued request")
        status, body = http("POST", url, {"prompt": "one too many"})
        engine_gate.release.set()
        for thread in threads:
            thread.join(timeout=60)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"


def test_a_chunked_body_over_the_limit_is_refused(server):
    import http.client

    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    limit = server.app.state.served.config.max_request_bytes
    chunks = (b"x" * 65536 for _ in range(limit // 65536 + 2))
    connection.request(
        "POST", "/v1/images/generations", body=chunks, headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )  # fmt: skip
    response = connection.getresponse()
    assert response.status == 413
    assert b'"error"' in response.read()


def test_openai_client_streams_partial_images_then_the_images(openai_client):
    """``stream=True, partial_images=2``: OpenAI's partial-image events of each image, then each image, the
    same as unstreamed."""
    request = dict(model="tiny", prompt="a cat", n=2, size="16x16", extra_body={"seed": 3})
    events = list(openai_client.images.generate(**request, stream=True, partial_images=2))
    partial = [event for event in events if isinstance(event, openai.types.ImageGenPartialImageEvent)]
    completed = [event for event in events if isinstance(event, openai.types.ImageGenCompletedEvent)]
    assert len(partial) + len(completed) == len(events) and events[-2:] == completed
    # Our own field image_index says which of the n images an event is about.
    assert sorted((event.image_index, event.partial_image_index) for event in partial) == [
        (0, 0), (0, 1), (1, 0), (1, 1),
    ]  # fmt: skip
    assert [event.image_index for event in completed] == [0, 1]
    for event in events:
        assert event.size == "16x16" and event.output_format == "png"
        assert PIL.Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (16, 16)
    assert (
        completed[0].usage.output_tokens == 24
    )  # <|boi|> <|h|> <|w|>, 4 rows of 4 codes and <|eol|>, <|eoi|>
    whole = openai_client.images.generate(**request)
    assert [event.b64_json for event in completed] == [item.b64_json for item in whole.data]
