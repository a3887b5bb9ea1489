"""The offline demo datasets: builder logic on small planted IDX files, real data in the integration tier."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from unimm.data import demo_datasets
from unimm.data.demo_datasets import (
    EMOJI_FONT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    emoji_caption,
    emoji_is_held_out,
    fashion_mnist_caption,
    load_emoji,
    load_fashion_mnist,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Path:
    """IDX files laid out like the Debian package: 20 train and 10 test images of 28×28."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)), 2051)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10, 2049)
    return tmp_path


def test_captions() -> None:
    assert fashion_mnist_caption(9, 0) == "a photo of an ankle boot"
    assert fashion_mnist_caption(0, 1) == "a t-shirt"
    assert fashion_mnist_caption(1, 2) == "a picture of a pair of trousers"
    assert emoji_caption(":monkey_face:") == "an emoji of monkey face"


def test_fashion_mnist_builder(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    dataset = load_fashion_mnist(data_dir=fake_fashion_mnist, cache_dir=tmp_path / "cache", allow_hub=False)
    assert (len(dataset["train"]), len(dataset["test"])) == (20, 10)
    row = dataset["train"][3]
    image = row["segments"][0]["image"]
    assert (image.mode, image.size) == ("RGB", (32, 32))
    assert row["label"] == 3
    assert dataset["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
    assert row["segments"][1] == {**row["segments"][1], "type": "text", "text": row["caption"]}
    assert row["caption"].endswith("dress")
    # Padding keeps every original pixel: the 28×28 centre equals the file's bytes.
    original = read_idx(fake_fashion_mnist / "train-images-idx3-ubyte.gz", 2051)[3]
    np.testing.assert_array_equal(np.asarray(image)[2:30, 2:30, 0], original)
    assert np.asarray(image)[:2].max() == 0


def test_fashion_mnist_modes_and_determinism(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    first = load_fashion_mnist(
        16, mode="L", fit="resize", data_dir=fake_fashion_mnist, cache_dir=tmp_path / "a"
    )
    second = load_fashion_mnist(
        16, mode="L", fit="resize", data_dir=fake_fashion_mnist, cache_dir=tmp_path / "b"
    )
    image = first["test"][0]["segments"][0]["image"]
    assert (image.mode, image.size) == ("L", (16, 16))
    assert first["train"]["caption"] == second["train"]["caption"]
    assert len(set(first["train"]["caption"])) > 10  # templates vary
    for a, b in zip(first["test"], second["test"]):
        assert np.array_equal(np.asarray(a["segments"][0]["image"]), np.asarray(b["segments"][0]["image"]))


def test_fashion_mnist_missing_package_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(data_dir=tmp_path / "nowhere", cache_dir=tmp_path, allow_hub=False)


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        (lambda path: path.write_bytes(b"not gzip at all"), "not a readable gzip file"),
        (lambda path: path.write_bytes(gzip.compress(b"\x00\x00")), "truncated"),
        (
            lambda path: path.write_bytes(gzip.compress(struct.pack(">iiii", 1234, 1, 28, 28))),
            "magic number 1234",
        ),
        (lambda path: path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5])), "needs"),
    ],
)
def test_corrupted_idx_names_file_and_fix(
    fake_fashion_mnist: Path, tmp_path: Path, corruption, message
) -> None:
    path = fake_fashion_mnist / "train-images-idx3-ubyte.gz"
    corruption(path)
    with pytest.raises(ValueError, match=message) as error:
        load_fashion_mnist(data_dir=fake_fashion_mnist, cache_dir=tmp_path / "cache", allow_hub=False)
    assert str(path) in str(error.value)
    assert "apt-get install --reinstall dataset-fashion-mnist" in str(error.value)


def test_emoji_split_is_deterministic_and_disjoint() -> None:
    names = [f":name_{i}:" for i in range(2000)]
    held_out = [name for name in names if emoji_is_held_out(name, 0.1)]
    assert held_out == [name for name in names if emoji_is_held_out(name, 0.1)]
    assert 150 < len(held_out) < 250


def test_render_emoji_on_white() -> None:
    if not EMOJI_FONT.exists():
        pytest.fail(f"{EMOJI_FONT} missing: `make data` installs fonts-noto-color-emoji")
    from PIL import ImageFont

    font = ImageFont.truetype(str(EMOJI_FONT), 109)
    image = demo_datasets.render_emoji("🐵", font, 24)
    assert (image.mode, image.size) == ("RGB", (24, 24))
    pixels = np.asarray(image)
    assert (pixels[0, 0] == 255).all()  # white corner
    assert pixels.std() > 20  # a real glyph, not a blank canvas


def test_emoji_missing_font_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        load_emoji(font_path=tmp_path / "missing.ttf", cache_dir=tmp_path)
    (tmp_path / "broken.ttf").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable font"):
        load_emoji(font_path=tmp_path / "broken.ttf", cache_dir=tmp_path)


@pytest.mark.integration
def test_real_fashion_mnist(dataset_cache_dir: str) -> None:
    assert FASHION_MNIST_DIR.exists(), "`make data` installs dataset-fashion-mnist"
    dataset = load_fashion_mnist(cache_dir=dataset_cache_dir)
    assert (len(dataset["train"]), len(dataset["test"])) == (60000, 10000)
    labels = np.asarray(dataset["test"]["label"])
    assert np.bincount(labels).tolist() == [1000] * 10  # the official test split is balanced
    row = dataset["test"][0]
    assert row["label"] == 9 and "ankle boot" in row["caption"]  # first test image is an ankle boot
    image = row["segments"][0]["image"]
    assert (image.mode, image.size) == ("RGB", (32, 32))
    again = load_fashion_mnist(cache_dir=dataset_cache_dir)
    assert again["test"]["caption"][:50] == dataset["test"]["caption"][:50]


@pytest.mark.integration
def test_real_emoji(dataset_cache_dir: str) -> None:
    dataset = load_emoji(image_size=32, cache_dir=dataset_cache_dir)
    train, test = dataset["train"], dataset["test"]
    assert 1500 < len(train) + len(test) < 2500
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.15
    assert not set(train["name"]) & set(test["name"])
    assert all(caption.startswith("an emoji of ") for caption in train["caption"])
    image = train[0]["segments"][0]["image"]
    assert (image.mode, image.size) == ("RGB", (32, 32))
    with_tones = load_emoji(image_size=16, include_skin_tones=True, cache_dir=dataset_cache_dir)
    assert len(with_tones["train"]) > len(train) + 1000


@pytest.mark.integration
def test_demo_mixture(dataset_cache_dir: str) -> None:
    emoji = load_emoji(image_size=32, cache_dir=dataset_cache_dir)
    mixture = demo_datasets.load_demo_mixture(image_size=32, emoji_repeats=3, cache_dir=dataset_cache_dir)
    train, test = mixture["train"], mixture["test"]
    assert len(train) == 60000 + 3 * len(emoji["train"]) and len(test) == 10000 + len(emoji["test"])
    assert train["source"].count("emoji") == 3 * len(emoji["train"])
    # Shuffled: a prefix (what max_eval_samples keeps) holds both sources; emoji rows carry no class.
    head = test.select(range(1000))
    assert {"fashion_mnist", "emoji"} == set(head["source"])
    assert all((label == -1) == (source == "emoji") for label, source in zip(head["label"], head["source"]))
    assert head[0]["segments"][0]["image"].mode == "RGB"
    again = demo_datasets.load_demo_mixture(image_size=32, emoji_repeats=3, cache_dir=dataset_cache_dir)
    assert again["test"]["caption"][:100] == test["caption"][:100]
    with pytest.raises(ValueError, match="emoji_repeats"):
        demo_datasets.load_demo_mixture(emoji_repeats=0, cache_dir=dataset_cache_dir)
    with pytest.raises(ValueError, match="unknown demo dataset"):
        demo_datasets.load_demo_dataset("mnist")
