"""Every dtype on every path. The checkpoint's teacher config records ``"dtype": "float32"`` as the demo
checkpoint's does (the tokenizer stage copies it from the teacher it loaded by name); a bfloat16 load crashed
on every path that encodes an image ("mat1 and mat2 must have the same dtype") and then kept that teacher in
float32 beside a bfloat16 adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from unimm import cli
from unimm.data.pretokenize import load_pretokenized
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import build_random_pipeline
from unimm.tokenizer import DualCodebookImageProcessor, DualCodebookTokenizer

BF16 = torch.bfloat16
QUESTION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}
]  # the README's first example


@pytest.fixture(scope="module")
def demo_like_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pipeline = build_random_pipeline("tiny", seed=0)
    config = pipeline.visual_tokenizer.config
    config.teacher_config = {**config.teacher_config, "dtype": "float32"}
    folder = tmp_path_factory.mktemp("checkpoint") / "demo-like"
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_pipeline(demo_like_checkpoint: Path) -> UniMMPipeline:
    pipeline = UniMMPipeline.from_pretrained(demo_like_checkpoint, dtype=BF16)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def images() -> list[PIL.Image.Image]:
    stripes = PIL.Image.new("RGB", (20, 20), "white")
    for x in range(0, 20, 4):
        stripes.paste((200, 30, 30), (x, 0, x + 2, 20))
    return [stripes, PIL.Image.new("RGB", (16, 16), "navy")]


def dtypes(pipeline: UniMMPipeline) -> dict[str, set[torch.dtype]]:
    """The parameter dtypes of each model, the visual tokenizer's teacher apart."""
    teacher = pipeline.visual_tokenizer.teacher
    teacher_ids = {id(parameter) for parameter in teacher.parameters()}
    return {
        "teacher": {parameter.dtype for parameter in teacher.parameters()},
        "visual_tokenizer": {
            parameter.dtype
            for parameter in pipeline.visual_tokenizer.parameters()
            if id(parameter) not in teacher_ids
        },
        "llm": {parameter.dtype for parameter in pipeline.llm.parameters()},
        "detokenizer": {parameter.dtype for parameter in pipeline.detokenizer.decoder.parameters()},
    }


def test_a_bfloat16_load_puts_every_model_in_bfloat16_the_teacher_too(bf16_pipeline):
    assert dtypes(bf16_pipeline) == dict.fromkeys(
        ("teacher", "visual_tokenizer", "llm", "detokenizer"), {BF16}
    )


def test_chat_and_interleaved_output_about_images_in_bfloat16(bf16_pipeline, images):
    answer = bf16_pipeline.chat(QUESTION, images=images[:1], max_new_tokens=4)
    assert len(answer.texts) == 1
    streamed = "".join(bf16_pipeline.chat(QUESTION, images=images[:1], max_new_tokens=4, stream=True))
    assert streamed.strip() == answer.text
    output = bf16_pipeline.generate(QUESTION, images=images[:1], max_new_tokens=8, decoder="pixel", seed=0)
    assert len(output.segments) == 1


@pytest.mark.parametrize("decoder", ["pixel", "diffusion"])
def test_generate_images_in_bfloat16(bf16_pipeline, decoder):
    output = bf16_pipeline.generate_images(
        ["a cat", "a dog"], seed=[0, 1], decoder=decoder, num_inference_steps=2
    )
    assert [image.size for image in output.images] == [(16, 16)] * 2
    assert output.image_token_ids.shape == (2, 4, 4)
    assert int(output.image_token_ids.min()) >= 0 and int(output.image_token_ids.max()) < 16


@pytest.mark.parametrize("decoder", ["pixel", "diffusion"])
def test_reconstruct_in_bfloat16(bf16_pipeline, images, decoder):
    output = bf16_pipeline.reconstruct(images, decoder=decoder, num_inference_steps=2, seed=0)
    assert [grid.shape for grid in output.image_token_ids] == [(4, 4)] * 2
    assert [image.size for image in output.images] == [(16, 16)] * 2
    assert all(np.asarray(image).std() > 0 for image in output.images)


def test_a_bfloat16_pipeline_saved_and_loaded_again_stays_bfloat16_and_works(bf16_pipeline, images, tmp_path):
    bf16_pipeline.save_pretrained(tmp_path / "bf16")
    saved = json.loads((tmp_path / "bf16" / "visual_tokenizer" / "config.json").read_text())
    assert "dtype" not in saved["teacher_config"]
    expected = bf16_pipeline.reconstruct(images, decoder="pixel").image_token_ids
    for dtype in (BF16, None):
        loaded = UniMMPipeline.from_pretrained(tmp_path / "bf16", dtype=dtype)
        loaded.set_progress_bar_config(disable=True)
        # None keeps the saved bfloat16 of the transformers models; diffusers loads its models in float32.
        detokenizer = {BF16} if dtype is not None else {torch.float32}
        assert dtypes(loaded) == {**dtypes(bf16_pipeline), "detokenizer": detokenizer}
        codes = loaded.reconstruct(images, decoder="pixel").image_token_ids
        assert all(torch.equal(ours, reference) for ours, reference in zip(codes, expected, strict=True))
        assert len(loaded.chat(QUESTION, images=images[:1], max_new_tokens=2).texts) == 1


def test_each_component_in_its_own_dtype(demo_like_checkpoint, images):
    # As in diffusers, one dtype per component name and a default; the nested detokenizer took the default.
    dtype = {"llm": BF16, "detokenizer": torch.float16, "default": torch.float32}
    pipeline = UniMMPipeline.from_pretrained(demo_like_checkpoint, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    assert dtypes(pipeline) == {
        "teacher": {torch.float32},
        "visual_tokenizer": {torch.float32},
        "llm": {BF16},
        "detokenizer": {torch.float16},
    }
    assert len(pipeline.chat(QUESTION, images=images[:1], max_new_tokens=2).texts) == 1
    diffusion = dict(decoder="diffusion", num_inference_steps=2, seed=0)
    assert len(pipeline.generate_images("a cat", **diffusion).images) == 1
    assert pipeline.reconstruct(images[:1], **diffusion).images[0].size == (16, 16)


@pytest.mark.integration
def test_tokenize_images_command_in_bfloat16(demo_like_checkpoint, images, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    same_size = [images[0], images[0].transpose(PIL.Image.Transpose.ROTATE_90)]  # one batch
    for index, image in enumerate(same_size):
        image.save(tmp_path / f"{index}.png")
    records = [{"image": f"{index}.png", "caption": f"image {index}"} for index in range(len(same_size))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    folder = demo_like_checkpoint / "visual_tokenizer"
    argv = ["tokenize-images", "--tokenizer", str(folder), "--format", "jsonl", "--dtype", "bfloat16"]
    argv += ["--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 0

    rows = load_pretokenized(tmp_path / "out")
    codes = torch.tensor([row["segments"][0]["image_token_ids"] for row in rows])  # (2, h * w)
    tokenizer = DualCodebookTokenizer.from_pretrained(folder, dtype=BF16).eval()
    processor = DualCodebookImageProcessor.from_tokenizer_config(tokenizer.config)
    expected = tokenizer.encode(processor(images=same_size, return_tensors="pt")["pixel_values"])  # (2, 4, 4)
    # The command hands the tokenizer float32 pixels, as the pipeline does: the same codes.
    assert torch.equal(codes, expected.flatten(1))
