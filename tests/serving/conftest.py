"""A tiny random pipeline served in-process (Starlette's TestClient) and over real HTTP (uvicorn in a thread),
and a gate that holds the generation engine so tests can line requests up behind a running batch.

Helpers are fixtures: a conftest is not importable in importlib mode."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
from starlette.testclient import TestClient

from unimm.pipelines import UniMMPipeline
from unimm.serving import BackgroundServer, ServingConfig, create_app

MODEL = "tiny"


def tiny_config(**overrides: Any) -> ServingConfig:
    """Fast settings: 2 diffusion steps, a short batch window, small limits that tests can reach."""
    settings = dict(
        model_name=MODEL, num_inference_steps=2, batch_wait_ms=20.0, max_images_per_request=4,
        max_prompt_length=200, max_image_bytes=64 * 1024, max_image_pixels=256 * 256,
    )  # fmt: skip
    return ServingConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def make_app(tiny_pipeline: UniMMPipeline):
    """``make_app(**overrides)``: a fresh app of the tiny pipeline with ``tiny_config(**overrides)``."""
    return lambda **overrides: create_app(tiny_pipeline, tiny_config(**overrides))


@pytest.fixture(scope="module")
def client(tiny_pipeline: UniMMPipeline) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_pipeline, tiny_config())) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server(tiny_pipeline: UniMMPipeline) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(tiny_pipeline, tiny_config())) as background:
        yield background


def png_bytes(size: tuple[int, int] = (20, 20)) -> bytes:
    image = PIL.Image.new("RGB", size, "white")
    for x in range(0, size[0], 4):
        image.paste((200, 30, 30), (x, 0, x + 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def png_data_url() -> str:
    """A 20x20 striped PNG as a data URL."""
    return f"data:image/png;base64,{base64.b64encode(png_bytes()).decode()}"


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "stripes.png"
    path.write_bytes(png_bytes())
    return path


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, Any]:
    """A request over real HTTP (standard library): ``(status, decoded JSON body)``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="session")
def http():
    """``http(method, url, body=None) -> (status, JSON)`` over real HTTP."""
    return _http


def _wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout, what)``: poll until ``condition()`` is true."""
    return _wait_until


def engine_rows(input_ids: Any, kwargs: dict) -> int:
    """The rows of an engine call: its prompts times their ``num_images_per_prompt``."""
    repeats = kwargs.get("num_images_per_prompt", 1)
    return sum(repeats) if isinstance(repeats, (list, tuple)) else len(input_ids) * repeats


@pytest.fixture(scope="session")
def count_engine_rows():
    """``count_engine_rows(input_ids, kwargs)``: the rows of an engine call."""
    return engine_rows


class EngineGate:
    """Wraps ``pipeline.llm.generate_multimodal``: records the rows of every call and holds each call until
    ``release`` is set."""

    def __init__(self, llm: Any) -> None:
        self.original = llm.generate_multimodal
        self.rows: list[int] = []
        self.release = threading.Event()

    def __call__(self, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        self.rows.append(engine_rows(input_ids, kwargs))
        self.release.wait(timeout=30)
        return self.original(input_ids, *args, **kwargs)


@pytest.fixture
def engine_gate(tiny_pipeline: UniMMPipeline, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineGate]:
    gate = EngineGate(tiny_pipeline.llm)
    monkeypatch.setattr(tiny_pipeline.llm, "generate_multimodal", gate)
    yield gate
    gate.release.set()  # never leave the engine thread waiting
