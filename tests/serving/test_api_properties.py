"""Property: no request body, however odd, gets a 5xx. Hypothesis builds bodies field by field from the
request schemas (valid values, odd unicode, huge and non-finite numbers, wrong types, missing and extra
fields, nested garbage, odd image data URLs) and raw bytes that are not JSON; every answer must be a
success or a 4xx in OpenAI's error shape."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import PIL.Image
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from unimm.serving.schemas import MAX_SEED, ChatCompletionRequest, ImageGenerationRequest

CHAT, IMAGES = "/v1/chat/completions", "/v1/images/generations"
# Fixed seed: the same examples on every run, so CI cannot turn red by chance.
PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------- text and numbers
def mostly(usual: st.SearchStrategy, rarely: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """``usual`` three times in four, else ``rarely`` (default: ``garbage``): bodies must get past
    validation to reach the model. Hypothesis tries small draws first: 0 picks ``usual``."""
    rarely = garbage if rarely is None else rarely
    return st.integers(0, 3).flatmap(lambda draw: rarely if draw == 3 else usual)


ODD_CHARACTERS = [
    "\ud800", "\udfff", "\ud83d",  # lone surrogates: JSON's \uXXXX escapes carry them, UTF-8 cannot
    "\x00", "\x1b", "\u202e", "\u200f", "\u2066", "\ufeff", "\uffff", "\U0010ffff", "\u0301",
    "😀", "👩\u200d👩\u200d👧", "𝕏", "é", "\n", "\\", '"', "١", "⁄",
]  # fmt: skip
odd_text = st.lists(st.one_of(st.characters(), st.sampled_from(ODD_CHARACTERS)), max_size=24).map("".join)
text = mostly(st.text(max_size=24), odd_text)  # st.text: any character but lone surrogates
numbers = st.one_of(
    st.integers(-3, 10),
    st.integers(),
    st.floats(),  # NaN and ±Infinity included: Python's json writes and reads them
    st.sampled_from([10**30, -(10**30), 2**63, 2**64, MAX_SEED, 1e308, -0.0, 5e-324, True]),
)
garbage = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


# ---------------------------------------------------------------------- image data URLs
def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_files() -> list[bytes]:
    small = PIL.Image.new("RGB", (20, 20), (200, 30, 30))
    jpeg = io.BytesIO()
    small.save(jpeg, format="JPEG")
    gif = io.BytesIO()
    small.convert("P").save(gif, format="GIF")
    palette = PIL.Image.new("P", (8, 8))
    palette.info["transparency"] = 0
    return [
        _png(small),
        jpeg.getvalue(),
        gif.getvalue(),
        _png(PIL.Image.new("I;16", (12, 12), 40000)),  # 16-bit greyscale
        _png(palette),
        _png(PIL.Image.new("LA", (1, 1))),
        _png(PIL.Image.new("RGB", (300, 300))),  # over the app's pixel limit
        _png(small)[:60],  # truncated
        _png(PIL.Image.new("1", (12000, 12000))),  # 17 KB: a bomb under the byte limit
        _png(PIL.Image.new("1", (15000, 15000))),  # past Pillow's own decompression-bomb limit
        b"GIF89a",
        b"not an image at all",
        b"",
    ]


IMAGE_FILES = _image_files()
encoded = st.sampled_from(IMAGE_FILES).map(lambda raw: base64.b64encode(raw).decode())
odd_payloads = st.one_of(
    st.sampled_from(["é", "\ud800", "AAAA\x00", "====", "A", "iVBORw0KGgo", "８８８８", "%%%"]),
    encoded.map(lambda data: data.rstrip("=")),
    encoded.map(lambda data: "\n".join(data[i : i + 8] for i in range(0, len(data), 8))),
    st.sampled_from(IMAGE_FILES).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
    st.binary(max_size=48).map(lambda raw: base64.b64encode(raw).decode()),
    text,
)
MEDIA_TYPES = ["image/png", "image/jpeg"], ["text/plain", "", "image/png;x=y"]
BASE64_FLAGS = [";base64"], ["", ";BASE64", ";base64;"]
ODD_URLS = ["https://example.com/cat.png", "data:", "data:,", "data:;base64,", "file:///etc/passwd"]


def data_urls(odd: bool) -> st.SearchStrategy[str]:
    """``data:`` URLs of the image files, mostly well formed; with ``odd``, the media type and payload may
    well be odd."""
    pick = st.one_of if odd else mostly
    return st.builds(
        lambda media_type, flag, payload: f"data:{media_type}{flag},{payload}",
        pick(st.sampled_from(MEDIA_TYPES[0]), st.sampled_from(MEDIA_TYPES[1])),
        mostly(st.sampled_from(BASE64_FLAGS[0]), st.sampled_from(BASE64_FLAGS[1])),
        pick(encoded, odd_payloads),
    )


urls = mostly(data_urls(odd=False), st.sampled_from(ODD_URLS) | text)
odd_urls = mostly(data_urls(odd=True), st.sampled_from(ODD_URLS) | text)

# ---------------------------------------------------------------------- request bodies
# Each field: the right type, edge values now and then; ``request_bodies`` swaps in garbage.
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
image_url = mostly(st.fixed_dictionaries({"url": urls}, optional={"detail": text}), urls)
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": mostly(image_url)})
odd_part = st.fixed_dictionaries({"type": text}) | garbage  # the tag itself odd, or no part at all
parts = st.lists(mostly(st.one_of(text_part, image_part), odd_part), min_size=1, max_size=3)
message = mostly(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
        optional={"content": st.one_of(text, parts, st.none()), "name": text},
    )
)
positive = st.sampled_from([0, -1, 9, 10**30, 2**64])  # edges of ``max_tokens``, ``n``, ``seed``
fraction = st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 2.0000001, float("nan"), float("inf")])

CHAT_FIELDS = {
    "model": mostly(st.just("tiny"), text),
    "messages": st.lists(message, min_size=1, max_size=3),
    "stream": st.booleans(),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), garbage),
    "max_tokens": mostly(st.integers(1, 4), positive),
    "max_completion_tokens": mostly(st.integers(1, 4), positive),
    "temperature": mostly(st.floats(0.0, 2.0), fraction),
    "top_p": mostly(st.floats(0.0, 1.0, exclude_min=True), fraction),
    "seed": mostly(st.integers(0, MAX_SEED), positive),
    "n": mostly(st.just(1), positive),
}
IMAGE_FIELDS = {
    "prompt": text.filter(bool),
    "model": mostly(st.just("tiny"), text),
    "n": mostly(st.integers(1, 2), positive),
    "size": mostly(
        st.sampled_from(["16x16", "24x8", "auto", "32x32"]),
        st.sampled_from(["0x0", "17x16", "-16x16", " 16x16 ", "16X16", "١٦x١٦", "16x16\n", "9" * 30 + "x16"])
        | text,
    ),
    "response_format": mostly(st.just("b64_json"), st.just("url") | text),
    "output_format": mostly(st.sampled_from(["png", "jpeg", "webp"]), text),
    "guidance_scale": mostly(st.floats(1.0, 50.0), fraction),
    "seed": mostly(st.integers(0, MAX_SEED), positive),
    "stream": st.booleans(),
    "partial_images": mostly(st.integers(0, 3), positive),
}


@st.composite
def request_bodies(draw: st.DrawFn, fields: dict[str, st.SearchStrategy], required: str) -> Any:
    """Usually an object with ``required`` and some other fields, now and then one of them (``required``
    too) garbage or missing, plus unknown fields; now and then any JSON value at all."""
    if draw(st.integers(0, 7)) == 7:
        return draw(garbage)
    body = {name: draw(value) for name, value in fields.items() if name == required or draw(st.booleans())}
    if draw(st.integers(0, 2)) == 2:
        name = draw(st.sampled_from(sorted(fields)))
        if draw(st.booleans()):
            body[name] = draw(garbage)
        else:
            body.pop(name, None)
    return {**draw(st.dictionaries(text, garbage, max_size=2)), **body}


def encode(body: Any, surrogatepass: bool) -> bytes:
    """JSON as Python writes it (NaN and Infinity included). ASCII escapes carry lone surrogates; raw
    ``surrogatepass`` bytes are invalid UTF-8."""
    if surrogatepass:
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(body, ensure_ascii=True).encode()


raw_bodies = st.one_of(
    st.binary(max_size=64),
    text.map(lambda value: value.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b"{",
            b"[]",
            b"null",
            b"1e999999",
            b'"\\ud800"',
            b'{"prompt": "a"} trailing',
            b'\xef\xbb\xbf{"prompt": "a"}',
            '{"prompt": "é"}'.encode("utf-16"),
            b'{"prompt": "\xff"}',
            b'{"messages": [{"role": "user", "content": "\xc3"}]}',
            b"[" * 100_000,
            b"[" * 900 + b"]" * 900,
            b'{"messages": ' + b"[" * 900 + b"]" * 900 + b"}",
            b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}",  # past Python's digits limit of int()
        ]
    ),
)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-16", "text/plain", "multipart/form-data", None]
)


# ---------------------------------------------------------------------- the property
@pytest.fixture(scope="module")
def client(make_app) -> Iterator[TestClient]:
    """Short answers and no batch window keep each example to tens of milliseconds."""
    app = make_app(default_max_tokens=4, max_new_tokens=8, batch_wait_ms=0.0)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_success_or_openai_error(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code < 400:
        event(f"HTTP {response.status_code}")  # --hypothesis-show-statistics: how deep examples reach
        if response.headers["content-type"].startswith("text/event-stream"):
            assert "server_error" not in response.text
        else:
            assert isinstance(response.json(), dict)
        return
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    event(f"HTTP {response.status_code} {error.get('code')} {error.get('param')}")
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def post(client: TestClient, path: str, content: bytes, content_type: str | None = "application/json"):
    headers = {} if content_type is None else {"Content-Type": content_type}
    return client.post(path, content=content, headers=headers)


def test_the_fields_fuzzed_are_the_schemas_fields():
    # A new request field is fuzzed too, or this fails.
    assert set(CHAT_FIELDS) == set(ChatCompletionRequest.model_fields)
    assert set(IMAGE_FIELDS) == set(ImageGenerationRequest.model_fields)


@settings(PROPERTY, max_examples=80)
@given(body=request_bodies(CHAT_FIELDS, "messages"), surrogatepass=st.booleans())
def test_no_chat_request_gets_a_server_error(client, body, surrogatepass):
    assert_success_or_openai_error(post(client, CHAT, encode(body, surrogatepass)))


@settings(PROPERTY, max_examples=40)
@given(url=odd_urls, as_object=st.booleans())
def test_no_image_url_gets_a_server_error(client, url, as_object):
    part = {"type": "image_url", "image_url": {"url": url} if as_object else url}
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is it"}]}]}
    assert_success_or_openai_error(post(client, CHAT, encode(body, surrogatepass=False)))


@settings(PROPERTY, max_examples=50)
@given(body=request_bodies(IMAGE_FIELDS, "prompt"), surrogatepass=st.booleans())
def test_no_image_request_gets_a_server_error(client, body, surrogatepass):
    assert_success_or_openai_error(post(client, IMAGES, encode(body, surrogatepass)))


@settings(PROPERTY, max_examples=30)
@given(path=st.sampled_from([CHAT, IMAGES]), content=raw_bodies, content_type=content_types)
def test_no_raw_body_gets_a_server_error(client, path, content, content_type):
    assert_success_or_openai_error(post(client, path, content, content_type))
