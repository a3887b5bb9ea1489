"""Streamed image previews: the engine's batch streamer hook and ``generate_images(streamer=...)``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from unimm.llm.streamers import BatchStreamer
from unimm.pipelines import ImagePreviewStreamer
from unimm.pipelines.previews import PREVIEW_FILL

FACTOR = 4  # pixels per code of the tiny visual tokenizer


class Recorder(BatchStreamer):
    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.blocks.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def same_pixels(first, second) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("mode", ["image", "interleaved"])
def test_batch_streamer_gets_every_written_token_once(tiny_pipeline, mode):
    """Scheduled (image) and state-machine (interleaved) plans: the blocks put, side by side, are the output."""
    prompt_ids, unconditional_ids = tiny_pipeline.image_prompt_ids(["a cat", "the red dog"])
    recorder = Recorder()
    output = tiny_pipeline.llm.generate_multimodal(
        prompt_ids, mode=mode, image_grid=[(2, 3), (3, 2)], guidance_scale=2.0,
        unconditional_input_ids=unconditional_ids, num_images_per_prompt=[2, 1], max_new_tokens=12, seed=3,
        streamer=recorder,
    )  # fmt: skip
    streamed = torch.cat(recorder.blocks, dim=1)
    assert recorder.ended == 1
    assert streamed.shape[0] == 3 and all(block.shape[0] == 3 for block in recorder.blocks)
    assert torch.equal(streamed, output.sequences)  # rows done before the last write pad ids


def test_previews_every_n_rows_for_every_image_of_the_batch(tiny_pipeline):
    previews = []
    streamer = ImagePreviewStreamer(preview_every=2, callback=previews.append)
    output = tiny_pipeline.generate_images(
        ["a cat", "a dog"], num_images_per_prompt=[2, 1], height=[16, 28], width=[16, 8], seed=[1, 2],
        decoder="pixel", streamer=streamer,
    )  # fmt: skip
    grids = output.image_token_ids  # two sizes: a list of (h, w) grids
    # Image 0 and 1: 4 rows -> a preview after row 2; image 2: 7 rows -> after rows 2, 4, 6.
    seen = sorted((p.index, p.prompt_index, p.partial_image_index, p.rows, p.height) for p in previews)
    assert seen == [(0, 0, 0, 2, 4), (1, 0, 0, 2, 4), (2, 1, 0, 2, 7), (2, 1, 1, 4, 7), (2, 1, 2, 6, 7)]
    for preview in previews:
        final = output.images[preview.index]
        assert preview.image.size == final.size
        assert torch.equal(preview.image_token_ids, grids[preview.index][: preview.rows])
        pixels = np.asarray(preview.image)
        top = tiny_pipeline.decode([preview.image_token_ids], decoder="pixel")[0]
        assert np.array_equal(pixels[: preview.rows * FACTOR], np.asarray(top))  # rows written: pixel decoder
        assert (pixels[preview.rows * FACTOR :] == PREVIEW_FILL).all()  # the rest: grey


@pytest.mark.parametrize("seed", [5, [5, None]])
def test_final_images_are_bitwise_the_same_with_and_without_previews(tiny_pipeline, seed):
    """Diffusion decoder (random noise after the codes): previews consume no randomness."""
    arguments = dict(num_images_per_prompt=2, seed=seed, decoder="diffusion", num_inference_steps=2)
    torch.manual_seed(0)
    plain = tiny_pipeline.generate_images(["a cat", "a dog"], **arguments)
    torch.manual_seed(0)
    previews = []
    streamed = tiny_pipeline.generate_images(
        ["a cat", "a dog"],
        **arguments,
        streamer=ImagePreviewStreamer(partial_images=3, callback=previews.append),
    )
    assert len(previews) == 4 * 3  # 4 images of 4 rows: after rows 1, 2 and 3
    assert torch.equal(plain.image_token_ids, streamed.image_token_ids)
    assert same_pixels(plain.images, streamed.images)


def test_partial_images_are_evenly_spaced_and_never_the_complete_grid():
    streamer = ImagePreviewStreamer(partial_images=2)
    assert streamer.preview_rows(2, 4) == [1, 3]
    assert streamer.preview_rows(2, 9) == [3, 6]
    assert streamer.preview_rows(3, 2) == [1]  # fewer rows than previews: one per row before the last
    assert streamer.preview_rows(0, 8) == [] and streamer.preview_rows(3, 1) == []
    assert ImagePreviewStreamer(preview_every=3).preview_rows(3, 7) == [3, 6]


def test_iterating_the_streamer_from_another_thread_ends_with_the_call(tiny_pipeline):
    streamer = ImagePreviewStreamer(partial_images=[1, 2], timeout=60)
    results = {}
    arguments = dict(seed=0, decoder="pixel", streamer=streamer)
    thread = threading.Thread(
        target=lambda: results.update(output=tiny_pipeline.generate_images(["a cat", "a dog"], **arguments))
    )
    thread.start()
    previews = list(streamer)
    thread.join()
    assert [(p.index, p.rows) for p in previews if p.index == 0] == [(0, 2)]
    assert [p.rows for p in previews if p.index == 1] == [1, 3]
    assert len(results["output"].images) == 2


def test_a_failing_call_still_ends_the_iteration(tiny_pipeline):
    streamer = ImagePreviewStreamer(partial_images=[1, 2, 3], timeout=60)
    with pytest.raises(ValueError, match="partial_images` has 3 entries but there are 2 prompts"):
        tiny_pipeline.generate_images(["a cat", "a dog"], decoder="pixel", streamer=streamer)
    assert list(streamer) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "one of `preview_every` and `partial_images`"),
        ({"preview_every": 1, "partial_images": 1}, "one of `preview_every` and `partial_images`"),
        ({"preview_every": 0}, "`preview_every` must be an int >= 1, got 0"),
        ({"partial_images": [1, -1]}, r"`partial_images\[1\]` must be an int >= 0, got -1"),
    ],
)
def test_bad_settings_name_the_argument(arguments, message):
    with pytest.raises(ValueError, match=message):
        ImagePreviewStreamer(**arguments)


@pytest.mark.integration
def test_previews_with_the_compiled_engine(tiny_pipeline):
    """enable_compile(): the previews come from the eager loop around the compiled steps; same final images."""
    arguments = dict(num_images_per_prompt=[2, 1], seed=[4, 9], decoder="pixel")
    previews = []
    streamer = ImagePreviewStreamer(preview_every=1, callback=previews.append)
    tiny_pipeline.enable_compile()
    try:
        plain = tiny_pipeline.generate_images(["a cat", "a dog"], **arguments)
        streamed = tiny_pipeline.generate_images(["a cat", "a dog"], **arguments, streamer=streamer)
    finally:
        tiny_pipeline.enable_compile(False)
    assert len(previews) == 3 * 3  # 3 images of 4 rows: after rows 1, 2 and 3
    assert torch.equal(plain.image_token_ids, streamed.image_token_ids)
    assert same_pixels(plain.images, streamed.images)
    for preview in previews:
        assert torch.equal(preview.image_token_ids, streamed.image_token_ids[preview.index][: preview.rows])
