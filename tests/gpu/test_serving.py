"""`unimm serve` on CUDA: its default options load the demo model in bf16 with TF32 matmuls, and the server
(real HTTP, requests batched) answers as the pipeline it serves."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import PIL.Image
import pytest
import torch

from unimm import cli
from unimm.commands.pipeline_arguments import load_pipeline
from unimm.serving import BackgroundServer, ServingConfig, create_app

pytestmark = pytest.mark.gpu

QUESTION = "What is this?"
CONCURRENT = 8
ANSWER_AGREEMENT = 0.85  # batched bf16 rows may flip a near tie against the same question alone


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())


def data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat_body(image: PIL.Image.Image) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": QUESTION},
    ]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 16}


@pytest.fixture(scope="module")
def server(demo_cuda):
    with BackgroundServer(
        create_app(demo_cuda, ServingConfig(model_name="demo", decoder="pixel"))
    ) as background:
        yield background


def test_serve_defaults_load_bfloat16_on_cuda_with_tf32(demo_checkpoint):
    args = cli.build_parser().parse_args(["serve", demo_checkpoint])
    assert args.dtype == "auto" and args.device is None
    pipeline = load_pipeline(args)
    assert pipeline.llm.dtype == torch.bfloat16 and pipeline.llm.device.type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32


def test_an_answer_is_the_pipelines(server, demo_cuda, demo_images):
    image = demo_images[0][0]
    answer = post(f"{server.url}/v1/chat/completions", chat_body(image))["choices"][0]["message"]["content"]
    assert answer == demo_cuda.chat(QUESTION, images=[image], max_new_tokens=16).text


def test_seeded_images_are_the_pipelines(server, demo_cuda, class_prompts):
    body = {"model": "demo", "prompt": class_prompts[7], "n": 2, "guidance_scale": 3.0, "seed": 11}
    served = post(f"{server.url}/v1/images/generations", {**body, "response_format": "b64_json"})["data"]
    expected = demo_cuda.generate_images(
        class_prompts[7], num_images_per_prompt=2, guidance_scale=3.0, seed=[11], decoder="pixel"
    ).images
    assert len(served) == len(expected) == 2
    for item, image in zip(served, expected):
        decoded = PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert decoded.convert("RGB").tobytes() == image.convert("RGB").tobytes()


def test_concurrent_requests_are_batched_and_answered_as_alone(server, demo_cuda, demo_images):
    images = demo_images[0][:CONCURRENT]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        replies = list(
            pool.map(lambda image: post(f"{server.url}/v1/chat/completions", chat_body(image)), images)
        )
    answers = [reply["choices"][0]["message"]["content"] for reply in replies]
    alone = [demo_cuda.chat(QUESTION, images=[image], max_new_tokens=16).text for image in images]
    assert sum(a == b for a, b in zip(answers, alone)) / CONCURRENT >= ANSWER_AGREEMENT, list(
        zip(answers, alone)
    )
