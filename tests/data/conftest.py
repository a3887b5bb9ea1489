"""Small data fixtures built in ``tmp_path``: images of known colours and files in every format."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets.config
import numpy as np
import PIL.Image
import pytest

IMAGE_SIZE = 8


class DataFiles:
    """Writes fixture files under one folder. An image of colour ``value`` has every pixel equal to it,
    so a test can tell which image ended up in which sample."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def png_bytes(value: int, size: int = IMAGE_SIZE) -> bytes:
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    @staticmethod
    def pixel_value(image) -> int:
        return int(np.asarray(image)[0, 0, 0])

    def png(self, name: str, value: int) -> Path:
        return self.write(name, self.png_bytes(value))

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return path

    def jsonl(self, name: str, records: list) -> Path:
        return self.write(name, "".join(json.dumps(record) + "\n" for record in records))

    def tar(self, name: str, members: list[tuple[str, bytes]]) -> Path:
        path = self.root / name
        with tarfile.open(path, "w") as archive:
            for member_name, data in members:
                info = tarfile.TarInfo(member_name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return path

    def pairs_jsonl(self, name: str = "pairs.jsonl", count: int = 3) -> Path:
        """``count`` pairs with relative image paths; colour ``10 * i`` goes with caption ``caption i``."""
        for index in range(count):
            self.png(f"images/{index}.png", 10 * index)
        return self.jsonl(
            name, [{"image": f"images/{i}.png", "caption": f"caption {i}"} for i in range(count)]
        )


@pytest.fixture
def files(tmp_path: Path) -> DataFiles:
    return DataFiles(tmp_path)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test keeps its ``datasets`` cache in its own folder, never in the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
