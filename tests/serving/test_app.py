"""Every endpoint in-process: the OpenAI shapes of answers, streams and errors."""

from __future__ import annotations

import base64
import io
import json

import PIL.Image
import PIL.ImageFile
import pytest


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def sse_payloads(text: str) -> list:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded (``[DONE]`` kept as a string)."""
    payloads = []
    for event in text.strip().split("\n\n"):
        assert event.startswith("data: "), event
        data = event.removeprefix("data: ")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def assert_openai_error(response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error["message"]


def test_health_models_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["queued"] == 0
    assert client.get("/v1/models").json() == {
        "object": "list",
        "data": [
            {"id": "tiny", "object": "model", "created": pytest.approx(0, abs=1e10), "owned_by": "unimm"}
        ],
    }
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="guidance"' in page.text and 'id="image-input"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # no external assets


def test_chat_about_an_image(client, png_data_url):
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "you answer"},
            {
                "role": "user",
                "content": [image_part(png_data_url), {"type": "text", "text": "what is this ?"}],
            },
        ],
        "max_tokens": 5,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion" and completion["model"] == "tiny"
    assert completion["id"].startswith("chatcmpl-")
    (choice,) = completion["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = completion["usage"]
    assert usage["completion_tokens"] <= 5
    # The image's code grid is part of the prompt: more tokens than the text alone.
    text_only = client.post(
        "/v1/chat/completions", json={**body, "messages": [body["messages"][0], *user("what is this ?")]}
    ).json()
    assert usage["prompt_tokens"] > text_only["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_answer_equals_the_pipelines_greedy_answer(client, tiny_pipeline):
    answer = client.post("/v1/chat/completions", json={"messages": user("what is this ?"), "max_tokens": 12})
    expected = tiny_pipeline.chat("what is this ?", max_new_tokens=12).text
    assert answer.json()["choices"][0]["message"]["content"] == expected


def test_streamed_chat_is_server_sent_events_of_the_same_answer(client):
    body = {"messages": user("what is this ?"), "max_tokens": 8}
    whole = client.post("/v1/chat/completions", json=body).json()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response.read().decode())
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(
        chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"] for chunk in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]]
    assert len([piece for piece in pieces if piece]) > 1  # streamed in pieces, not in one
    assert "".join(pieces).strip() == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_image_generation(client):
    response = client.post(
        "/v1/images/generations",
        json={"model": "tiny", "prompt": "a cat", "n": 2, "size": "24x16", "response_format": "b64_json"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["data"]) == 2 and result["size"] == "24x16" and result["output_format"] == "png"
    for item in result["data"]:
        image = PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.format == "PNG" and image.size == (24, 16)
    jpeg = client.post("/v1/images/generations", json={"prompt": "a cat", "output_format": "jpeg"}).json()
    assert PIL.Image.open(io.BytesIO(base64.b64decode(jpeg["data"][0]["b64_json"]))).format == "JPEG"


def test_a_seed_gives_the_pipelines_images(client, tiny_pipeline):
    body = {"prompt": "a red cat", "n": 2, "guidance_scale": 2.5, "seed": 11}
    first = client.post("/v1/images/generations", json=body).json()["data"]
    again = client.post("/v1/images/generations", json=body).json()["data"]
    assert [item["b64_json"] for item in first] == [item["b64_json"] for item in again]
    expected = tiny_pipeline.generate_images(
        "a red cat", num_images_per_prompt=2, guidance_scale=2.5, seed=[11], num_inference_steps=2
    ).images
    for item, image in zip(first, expected):
        served = PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert served.tobytes() == image.convert("RGB").tobytes()


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ("{not json", 400, None, "invalid_json"),
        ({"messages": []}, 400, "messages", None),
        ({"messages": "hello"}, 400, "messages", None),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
        ({"messages": user([{"type": "video"}])}, 400, "messages[0].content[0]", None),
        ({"messages": user([{"type": "text"}])}, 400, "messages[0].content[0].text", None),
        ({"messages": user("hi"), "temperature": "hot"}, 400, "temperature", None),
        ({"model": "gpt-4o", "messages": user("hi")}, 404, "model", "model_not_found"),
        ({"messages": user("hi"), "n": 2}, 400, "n", None),
        ({"messages": user("hi"), "max_tokens": 100000}, 400, "max_tokens", None),
        ({"messages": user("what " * 100)}, 400, "messages", "string_above_max_length"),
        ({"messages": user("what is " * 40), "max_tokens": 200}, 400, None, None),  # over the context
    ],
)
def test_bad_chat_requests_get_openai_errors(client, body, status, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post(
        "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, status, param, code)


def test_bad_images_in_chat_get_openai_errors(client):
    def ask(url: str):
        return client.post("/v1/chat/completions", json={"messages": user([image_part(url)])})

    param = "messages[0].content[0].image_url"
    assert_openai_error(ask("https://example.com/cat.png"), 400, param, "invalid_image_url")
    assert_openai_error(ask("data:image/png,rawbytes"), 400, param, "invalid_image_url")
    assert_openai_error(ask("data:image/png;base64,%%%"), 400, param, "invalid_image")
    undecodable = "data:image/png;base64," + base64.b64encode(b"this is not a png").decode()
    assert "cannot decode the image" in assert_openai_error(ask(undecodable), 400, param, "invalid_image")
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (300, 300)).save(buffer, format="PNG")  # 90,000 pixels > the 65,536 allowed
    too_many_pixels = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert_openai_error(ask(too_many_pixels), 400, param, "image_too_large")
    too_many_bytes = "data:image/png;base64," + "A" * 100_000  # > 64 KiB once decoded
    assert_openai_error(ask(too_many_bytes), 400, param, "image_too_large")
    assert "not valid base64" in assert_openai_error(
        ask("data:image/png;base64,é"), 400, param, "invalid_image"
    )


def png_data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(make_app, monkeypatch):
    from starlette.testclient import TestClient

    huge = png_data_url(PIL.Image.new("L", (12000, 12000)))  # 144 Mpx in about 140 KB
    bomb = png_data_url(PIL.Image.new("1", (15000, 15000)))  # past Pillow's own limit (179 Mpx)

    def decoded(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", decoded)
    param = "messages[0].content[0].image_url"
    with TestClient(make_app(max_image_bytes=256 * 1024)) as client:
        for url, size in ((huge, "12000x12000"), (bomb, "225000000 pixels")):
            response = client.post("/v1/chat/completions", json={"messages": user([image_part(url)])})
            message = assert_openai_error(response, 400, param, "image_too_large")
            assert size in message and "65536" in message  # the size and the app's limit


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": user("hi \ud800")}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": user("\udfff"), "stream": True}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": user([{"type": "text", "text": "a\ud83d"}])}, "messages[0].content[0].text"),
        ("/v1/chat/completions", {"messages": user([image_part("data:\ud800")])}, "messages[0].content[0].image_url.url"),
        ("/v1/chat/completions", {"model": "\ud800", "messages": user("hi")}, "model"),
        ("/v1/images/generations", {"prompt": "a cat \ud800"}, "prompt"),
        ("/v1/images/generations", {"prompt": "a cat", "size": "16x16\ud800"}, "size"),
    ],
)  # fmt: skip
def test_text_with_a_lone_surrogate_gets_a_400_naming_its_field(client, path, body, param):
    # JSON's \uXXXX escapes carry a lone surrogate, which UTF-8 and the tokenizer cannot.
    def post(body: dict):
        content = json.dumps(body, ensure_ascii=True)
        return client.post(path, content=content, headers={"Content-Type": "application/json"})

    message = assert_openai_error(post(body), 400, param, "invalid_unicode")
    assert "lone surrogate" in message and "more problems" not in message  # union members are one problem
    with_another_problem = post({**body, "seed": -1})
    assert "(and 1 more problems)" in assert_openai_error(with_another_problem, 400, param, "invalid_unicode")


def test_an_error_message_echoing_a_lone_surrogate_still_encodes():
    from starlette.responses import JSONResponse

    from unimm.serving.schemas import error_body

    assert b"\\ud800" in JSONResponse(error_body("no model '\ud800'")).body


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "a cat", "n": 5}, 400, "n"),  # over max_images_per_request=4
        ({"prompt": "a cat", "n": 0}, 400, "n"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "a cat " * 50}, 400, "prompt"),
        ({"prompt": "a cat", "size": "17x16"}, 400, "size"),
        ({"prompt": "a cat", "size": "1024x1024"}, 400, "size"),
        ({"prompt": "a cat", "size": "large"}, 400, "size"),
        ({"prompt": "a cat", "response_format": "url"}, 400, "response_format"),
        ({"prompt": "a cat", "guidance_scale": 0.5}, 400, "guidance_scale"),
        ({"prompt": "a cat", "seed": -1}, 400, "seed"),
        ({"prompt": "a cat", "model": "dall-e-3"}, 404, "model"),
        ({"n": 1}, 400, "prompt"),
    ],
)
def test_bad_image_requests_get_openai_errors(client, body, status, param):
    assert_openai_error(client.post("/v1/images/generations", json=body), status, param)


def test_unknown_routes_methods_and_huge_bodies_get_openai_errors(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)
    huge = json.dumps({"prompt": "x" * (client.app.state.served.config.max_request_bytes + 10)})
    response = client.post(
        "/v1/images/generations", content=huge, headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 413)


def test_an_unexpected_failure_is_a_500_in_the_openai_shape_without_traceback(make_app, monkeypatch):
    from starlette.testclient import TestClient

    from unimm.serving.engine import ServingEngine

    def broken(self, jobs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ServingEngine, "generate_images", broken)
    with TestClient(make_app(), raise_server_exceptions=False) as test_client:
        response = test_client.post("/v1/images/generations", json={"prompt": "a cat"})
        message = assert_openai_error(response, 500)
    assert "secret" not in message and response.json()["error"]["type"] == "server_error"


def sse_events(text: str) -> list[tuple[str, dict]]:
    """``(event name, JSON data)`` of each event of a stream with named events."""
    events = []
    for event in text.strip().split("\n\n"):
        name, data = event.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), event
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def stream_images(client, body: dict):
    with client.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.read().decode())


def test_streamed_image_generation_sends_openais_events(client):
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    events = stream_images(client, {"prompt": "a cat", "size": "24x16", "partial_images": 3, "seed": 1})
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 3 + [
        "image_generation.completed"
    ]
    for name, data in events:
        model = ImageGenPartialImageEvent if name.endswith("partial_image") else ImageGenCompletedEvent
        event = model.model_validate(data)  # every field OpenAI's types require, of the right types
        assert event.type == name and event.size == "24x16" and data["image_index"] == 0
        assert PIL.Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (24, 16)
    assert [data["partial_image_index"] for _, data in events[:-1]] == [0, 1, 2]
    plain = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "24x16", "seed": 1}).json()
    assert events[-1][1]["b64_json"] == plain["data"][0]["b64_json"]


def test_streamed_image_generation_without_partial_images_sends_the_images(client):
    events = stream_images(client, {"prompt": "a cat", "n": 2, "partial_images": 0})
    assert [(name, data["image_index"]) for name, data in events] == [
        ("image_generation.completed", 0),
        ("image_generation.completed", 1),
    ]


def test_streamed_image_errors_before_the_stream_are_json(client, tiny_pipeline, monkeypatch):
    images = "/v1/images/generations"
    stream = {"prompt": "a cat", "stream": True}
    assert_openai_error(client.post(images, json={**stream, "partial_images": 4}), 400, "partial_images")
    assert_openai_error(client.post(images, json={**stream, "size": "17x16"}), 400, "size", "invalid_size")
    assert_openai_error(client.post(images, json={**stream, "n": 9}), 400, "n")

    def refuse(*args, **kwargs):
        raise ValueError("the prompt is too long for this model")

    monkeypatch.setattr(tiny_pipeline, "generate_images", refuse)
    message = assert_openai_error(client.post(images, json={**stream, "partial_images": 2}), 400)
    assert message == "the prompt is too long for this model"


def test_a_streamed_image_generation_that_fails_after_its_previews_ends_with_an_error_event(
    client, tiny_pipeline, monkeypatch
):
    original = tiny_pipeline.generate_images

    def fail_after_the_codes(*args, **kwargs):
        original(*args, **kwargs)  # the previews go out
        raise RuntimeError("the decoder ran out of memory")

    monkeypatch.setattr(tiny_pipeline, "generate_images", fail_after_the_codes)
    events = stream_images(client, {"prompt": "a cat", "partial_images": 1})
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    error = events[-1][1]["error"]
    assert error["type"] == "server_error" and "memory" not in error["message"]  # the details go to the log
