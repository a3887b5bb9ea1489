"""A tiny random pipeline (hidden 32, 2 layers, 16 codes, 16 px) and its saved checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import pytest

from unimm.pipelines import UniMMPipeline


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_pipeline: UniMMPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    tiny_pipeline.save_pretrained(folder, training_data=["random weights"], metrics={"psnr_db": 12.5})
    return folder


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "stripes.png"
    image = PIL.Image.new("RGB", (20, 20), "white")
    for x in range(0, 20, 4):
        image.paste((200, 30, 30), (x, 0, x + 2, 20))
    image.save(path)
    return path
