"""The compiled engine where users are: the pipeline's switch, the CLI's --compile, the server's warm-up."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from unimm import cli
from unimm.pipelines.testing import build_random_pipeline
from unimm.serving import ServingConfig, create_app


def test_enable_compile_reaches_every_engine_call(tiny_pipeline, monkeypatch):
    """chat, generate_images and generate decode through ``generate_multimodal(compile=...)``."""
    engine = tiny_pipeline.llm.generate_multimodal
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return engine(*args, **{**kwargs, "compile": False})  # the switch is what is tested here, not dynamo

    monkeypatch.setattr(tiny_pipeline.llm, "generate_multimodal", recording)
    tiny_pipeline.enable_compile()
    try:
        tiny_pipeline.chat([{"role": "user", "content": "w1"}], max_new_tokens=2)
        tiny_pipeline.generate_images(["w1"], decoder="pixel")
        tiny_pipeline.generate([{"role": "user", "content": "w1"}], output="text", max_new_tokens=2)
        tiny_pipeline.enable_compile(False)
        tiny_pipeline.chat([{"role": "user", "content": "w1"}], max_new_tokens=2)
    finally:
        tiny_pipeline.enable_compile(False)
    assert seen == [True, True, True, False]


def test_cli_compile_options():
    parser = cli.build_parser()
    assert parser.parse_args(["chat", "--compile", "--prompt", "hi"]).compile is True
    assert (
        parser.parse_args(["generate", "--prompt", "a cat"]).compile is False
    )  # one short call: eager by default
    assert parser.parse_args(["serve"]).compile is True  # a server pays the compile once, at start-up
    assert parser.parse_args(["serve", "--no-compile"]).compile is False


@pytest.mark.integration
def test_a_compiled_server_warms_up_and_answers_as_the_eager_pipeline(caplog):
    eager = build_random_pipeline("tiny", seed=0)
    compiled = build_random_pipeline("tiny", seed=0)
    compiled.enable_compile()
    with caplog.at_level("INFO", logger="unimm.serving.app"):
        app = create_app(compiled, ServingConfig(max_batch_size=1, decoder="pixel"))
    assert "compiled warm-up over batches up to 1 rows" in caplog.text
    body = {"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 4}
    with TestClient(app) as client:
        answer = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        images = client.post(
            "/v1/images/generations", json={"prompt": "w3", "seed": 5, "response_format": "b64_json"}
        )
    assert answer == eager.chat([{"role": "user", "content": "w1 w2"}], max_new_tokens=4).texts[0]
    assert images.status_code == 200
    counters = torch._dynamo.utils.counters["stats"]
    assert counters["unique_graphs"] > 0  # the warm-up did compile


def test_serve_quantize_option_loads_an_int8_language_model(tmp_path):
    """``from_pretrained(..., quantization="int8")`` and ``unimm serve --quantize int8`` (torchao)."""
    pytest.importorskip("torchao", reason="the `quantization` extra (installed by `make install`)")
    from unimm.commands.pipeline_arguments import load_pipeline
    from unimm.pipelines.quantization import is_quantized

    build_random_pipeline("tiny", seed=0).save_pretrained(tmp_path / "tiny")
    args = cli.build_parser().parse_args(
        ["serve", str(tmp_path / "tiny"), "--quantize", "int8", "--no-compile"]
    )
    pipeline = load_pipeline(args)
    assert is_quantized(pipeline.llm) and not is_quantized(pipeline.visual_tokenizer)
    answer = pipeline.chat([{"role": "user", "content": "w1"}], max_new_tokens=2)
    assert len(answer.texts) == 1
