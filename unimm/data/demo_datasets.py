"""The offline demo datasets: Fashion-MNIST and Noto Color Emoji, as ``datasets.DatasetDict``s.

Both install from Debian packages (``dataset-fashion-mnist``, ``fonts-noto-color-emoji``) and build in
seconds; the result is cached on disk by ``datasets`` (keyed by the builder arguments), so later
calls are memory-mapped loads. Rows follow the sample schema of :mod:`unimm.data.schema`:
``segments = [image, caption]`` plus metadata columns.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unimm.data.schema import image_segment, sample_features, text_segment

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
# Official class order of the label files.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Names as they read inside a caption ("a photo of an ankle boot").
FASHION_MNIST_CAPTION_NAMES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_MNIST_TEMPLATES = (
    "a photo of {article} {name}",
    "{article} {name}",
    "a picture of {article} {name}",
    "a black and white photo of {article} {name}",
    "an image of {article} {name}",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051  # uint8, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # uint8, 1 dimension
_FASHION_MNIST_SIZE = 28

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_PACKAGE = "fonts-noto-color-emoji"
# The CBDT bitmaps of Noto Color Emoji exist at this one size only.
_EMOJI_FONT_SIZE = 109
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))

ImageMode = Literal["RGB", "L"]


def default_cache_dir() -> Path:
    """``$UNIMM_CACHE/datasets``, by default ``~/.cache/unimm/datasets``."""
    return Path(os.environ.get("UNIMM_CACHE", Path.home() / ".cache" / "unimm")) / "datasets"


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def fashion_mnist_caption(label: int, template_index: int) -> str:
    """The caption of a Fashion-MNIST class with one of :data:`FASHION_MNIST_TEMPLATES`."""
    name = FASHION_MNIST_CAPTION_NAMES[label]
    template = FASHION_MNIST_TEMPLATES[template_index % len(FASHION_MNIST_TEMPLATES)]
    return template.format(article=_article(name), name=name)


def _fix_hint(path: Path, package: str) -> str:
    return f"reinstall it with `apt-get install --reinstall {package}` (or `make data`)"


def read_idx(path: Path, expected_magic: int, package: str = FASHION_MNIST_PACKAGE) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array, validating its header."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path} is not a readable gzip file ({error}); {_fix_hint(path, package)}"
        ) from error
    ndim = expected_magic - 2048
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path} is truncated: {len(data)} bytes, shorter than its header; {_fix_hint(path, package)}"
        )
    magic = struct.unpack(">i", data[:4])[0]
    if magic != expected_magic:
        raise ValueError(
            f"{path} has IDX magic number {magic}, expected {expected_magic}; {_fix_hint(path, package)}"
        )
    shape = struct.unpack(f">{ndim}i", data[4:header_size])
    expected_bytes = header_size + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise ValueError(
            f"{path} holds {len(data)} bytes but its header {shape} needs {expected_bytes}; "
            f"{_fix_hint(path, package)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _read_fashion_mnist_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _IDX_FILES[split]
    images = read_idx(data_dir / images_name, _IDX_IMAGES_MAGIC)  # (N, 28, 28)
    labels = read_idx(data_dir / labels_name, _IDX_LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise ValueError(
            f"{data_dir}: {images_name} holds {len(images)} images but {labels_name} {len(labels)} labels; "
            f"{_fix_hint(data_dir, FASHION_MNIST_PACKAGE)}"
        )
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{data_dir / labels_name}: label {labels.max()} out of range 0..9")
    return images, labels


def _fit_image(pixels: np.ndarray, image_size: int, fit: str, mode: ImageMode) -> Image.Image:
    image = Image.fromarray(pixels, mode="L")
    if image_size != _FASHION_MNIST_SIZE:
        if fit == "pad":
            # The background is black, so padding keeps every original pixel exact.
            canvas = Image.new("L", (image_size, image_size), 0)
            offset = (image_size - _FASHION_MNIST_SIZE) // 2
            canvas.paste(image, (offset, offset))
            image = canvas
        else:
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image.convert(mode)


def _fashion_mnist_rows(
    data_dir: str, split: str, image_size: int, fit: str, mode: ImageMode, seed: int, source_stamp: str
) -> Iterator[dict]:
    # `source_stamp` only enters the cache fingerprint.
    images, labels = _read_fashion_mnist_split(Path(data_dir), split)
    template_indices = np.random.default_rng([seed, len(images)]).integers(
        0, len(FASHION_MNIST_TEMPLATES), len(images)
    )
    for index, (pixels, label) in enumerate(zip(images, labels)):
        caption = fashion_mnist_caption(int(label), int(template_indices[index]))
        yield {
            "segments": [image_segment(_fit_image(pixels, image_size, fit, mode)), text_segment(caption)],
            "label": int(label),
            "caption": caption,
        }


def _fashion_mnist_from_hub(image_size: int, fit: str, mode: ImageMode, seed: int) -> datasets.DatasetDict:
    """The same rows from the Hub copy, for machines without the Debian package but with a network."""
    hub = datasets.load_dataset(FASHION_MNIST_HUB_ID)
    splits = {}
    for split in ("train", "test"):
        template_indices = np.random.default_rng([seed, len(hub[split])]).integers(
            0, len(FASHION_MNIST_TEMPLATES), len(hub[split])
        )

        def convert(row: dict, index: int, template_indices: np.ndarray = template_indices) -> dict:
            caption = fashion_mnist_caption(row["label"], int(template_indices[index]))
            pixels = np.asarray(row["image"].convert("L"))
            image = _fit_image(pixels, image_size, fit, mode)
            return {
                "segments": [image_segment(image), text_segment(caption)],
                "label": row["label"],
                "caption": caption,
            }

        splits[split] = hub[split].map(
            convert,
            with_indices=True,
            remove_columns=hub[split].column_names,
            features=_fashion_mnist_features(),
        )
    return datasets.DatasetDict(splits)


def _fashion_mnist_features() -> datasets.Features:
    return sample_features(
        label=datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES)), caption=datasets.Value("string")
    )


def _missing_package_error(path: Path, package: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} not found: install the Debian package `{package}` "
        f"(`apt-get install -y {package}` as root, or `make data`)"
    )


def load_fashion_mnist(
    image_size: int = 32,
    mode: ImageMode = "RGB",
    fit: Literal["pad", "resize"] = "pad",
    seed: int = 0,
    data_dir: str | Path = FASHION_MNIST_DIR,
    cache_dir: str | Path | None = None,
    allow_hub: bool = True,
) -> datasets.DatasetDict:
    """Fashion-MNIST, official split: ``train`` (60,000) and ``test`` (10,000) image-caption pairs.

    Images are 28 px grayscale, brought to ``image_size`` by padding (``fit="pad"``, exact pixels, the
    default) or bicubic resizing, in ``mode`` ``"RGB"`` or ``"L"``. Captions are drawn deterministically
    (``seed``) from :data:`FASHION_MNIST_TEMPLATES`. Without the Debian package, the Hub copy is used
    when ``allow_hub`` and the Hub is reachable; otherwise the error names the package to install.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if fit not in ("pad", "resize"):
        raise ValueError(f"fit must be 'pad' or 'resize', got {fit!r}")
    if fit == "pad" and image_size < _FASHION_MNIST_SIZE:
        raise ValueError(
            f"fit='pad' needs image_size >= {_FASHION_MNIST_SIZE}, got {image_size}; use fit='resize'"
        )
    data_dir = Path(data_dir)
    missing = [
        data_dir / name for names in _IDX_FILES.values() for name in names if not (data_dir / name).exists()
    ]
    if missing:
        if allow_hub and not datasets.config.HF_HUB_OFFLINE:
            try:
                return _fashion_mnist_from_hub(image_size, fit, mode, seed)
            except Exception as error:  # no network, no Hub: fall through to the package error
                logger.info("Fashion-MNIST Hub copy unavailable (%s)", error)
        raise _missing_package_error(missing[0], FASHION_MNIST_PACKAGE)
    cache_dir = str(cache_dir or default_cache_dir())
    splits = {}
    for split in ("train", "test"):
        splits[split] = _build_split(
            _fashion_mnist_rows,
            _fashion_mnist_features(),
            {
                "data_dir": str(data_dir),
                "split": split,
                "image_size": image_size,
                "fit": fit,
                "mode": mode,
                "seed": seed,
                # Reading the file's size and mtime into the key rebuilds the cache after a reinstall.
                "source_stamp": _source_stamp(data_dir, split),
            },
            cache_dir,
            split,
        )
    return datasets.DatasetDict(splits)


def _build_split(generator, features: datasets.Features, gen_kwargs: dict, cache_dir: str, split: str):
    """``Dataset.from_generator``, fingerprinted by the generator and its kwargs (same arguments, same
    cache), with our own errors about the source files surfaced instead of datasets' wrapper."""
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir, split=split
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, (ValueError, OSError)):
            raise error.__cause__ from None
        raise


def _source_stamp(data_dir: Path, split: str) -> str:
    stats = [(data_dir / name).stat() for name in _IDX_FILES[split]]
    return ",".join(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stats)


def emoji_caption(name: str) -> str:
    """``":monkey_face:"`` → ``"an emoji of monkey face"``."""
    return "an emoji of " + name.strip(":").replace("_", " ")


def emoji_is_held_out(name: str, test_fraction: float) -> bool:
    """Deterministic split by a hash of the name: stable across machines and package versions."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") / 2**32
    return bucket < test_fraction


def _emoji_entries(include_skin_tones: bool) -> list[tuple[str, str]]:
    import emoji  # a small pure-Python package; imported here so `import unimm.data` stays light

    entries = []
    for character, data in emoji.EMOJI_DATA.items():
        if data["status"] != emoji.STATUS["fully_qualified"]:
            continue
        if not include_skin_tones and any(ord(c) in _SKIN_TONES for c in character):
            continue
        entries.append((character, data["en"]))
    return sorted(entries, key=lambda entry: entry[1])


def render_emoji(character: str, font: ImageFont.FreeTypeFont, image_size: int) -> Image.Image | None:
    """Render one emoji on white, centred in a square, resized to ``image_size``; ``None`` if the font lacks it."""
    left, top, right, bottom = font.getbbox(character)
    canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), character, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


def _emoji_rows(
    font_path: str,
    split: str,
    image_size: int,
    include_skin_tones: bool,
    test_fraction: float,
    source_stamp: str,
) -> Iterator[dict]:
    # `source_stamp` only enters the cache fingerprint.
    font = ImageFont.truetype(font_path, _EMOJI_FONT_SIZE)
    for character, name in _emoji_entries(include_skin_tones):
        if emoji_is_held_out(name, test_fraction) != (split == "test"):
            continue
        image = render_emoji(character, font, image_size)
        if image is None:
            continue
        caption = emoji_caption(name)
        yield {
            "segments": [image_segment(image), text_segment(caption)],
            "caption": caption,
            "name": name.strip(":"),
            "emoji": character,
        }


def load_emoji(
    image_size: int = 32,
    include_skin_tones: bool = False,
    test_fraction: float = 0.1,
    font_path: str | Path = EMOJI_FONT,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict:
    """Noto Color Emoji rendered to RGB on white, captioned with the ``emoji`` package's names.

    ``train``/``test`` split by a hash of the name (``test_fraction`` held out). Skin-tone variants are
    left out unless ``include_skin_tones``: they would put near-duplicates on both sides of the split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    font_path = Path(font_path)
    if not font_path.exists():
        raise _missing_package_error(font_path, EMOJI_PACKAGE)
    try:
        ImageFont.truetype(str(font_path), _EMOJI_FONT_SIZE)
    except OSError as error:
        raise ValueError(
            f"{font_path} is not a readable font ({error}); {_fix_hint(font_path, EMOJI_PACKAGE)}"
        ) from error
    features = sample_features(
        caption=datasets.Value("string"), name=datasets.Value("string"), emoji=datasets.Value("string")
    )
    stat = font_path.stat()
    splits = {
        split: _build_split(
            _emoji_rows,
            features,
            {
                "font_path": str(font_path),
                "split": split,
                "image_size": image_size,
                "include_skin_tones": include_skin_tones,
                "test_fraction": test_fraction,
                "source_stamp": f"{stat.st_size}:{stat.st_mtime_ns}",
            },
            str(cache_dir or default_cache_dir()),
            split,
        )
        for split in ("train", "test")
    }
    return datasets.DatasetDict(splits)


DEMO_DATASETS = ("fashion_mnist", "emoji", "demo")


def load_demo_mixture(
    image_size: int = 32,
    emoji_repeats: int = 8,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """The demo model's data: Fashion-MNIST (RGB) and emoji in one ``DatasetDict``.

    ``train`` is Fashion-MNIST's 60,000 images plus the emoji train split repeated ``emoji_repeats``
    times (1,696 glyphs would otherwise be under 3% of a batch), shuffled; ``test`` is both test splits
    shuffled together, so a prefix of it holds both sources. Columns: ``segments``, ``caption`` and
    ``source`` ("fashion_mnist" or "emoji"); Fashion-MNIST's ``label`` is ``-1`` on emoji rows.
    """
    if emoji_repeats < 1:
        raise ValueError(f"emoji_repeats must be >= 1, got {emoji_repeats}")
    fashion = load_fashion_mnist(image_size, mode="RGB", cache_dir=cache_dir)
    emoji = load_emoji(image_size, cache_dir=cache_dir)

    def tagged(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
        labels = dataset["label"] if "label" in dataset.column_names else [-1] * len(dataset)
        table = dataset.select_columns(["segments", "caption"])
        table = table.add_column("label", [int(label) for label in labels])
        return table.add_column("source", [source] * len(dataset))

    splits = {}
    for split, repeats in (("train", emoji_repeats), ("test", 1)):
        parts = [tagged(fashion[split], "fashion_mnist")] + [tagged(emoji[split], "emoji")] * repeats
        splits[split] = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    return datasets.DatasetDict(splits)


def load_demo_dataset(
    name: str, image_size: int = 32, cache_dir: str | Path | None = None
) -> datasets.DatasetDict:
    """One of :data:`DEMO_DATASETS` by name, images in RGB (what the training stages take)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(image_size, mode="RGB", cache_dir=cache_dir)
    if name == "emoji":
        return load_emoji(image_size, cache_dir=cache_dir)
    if name == "demo":
        return load_demo_mixture(image_size, cache_dir=cache_dir)
    raise ValueError(f"unknown demo dataset {name!r}; expected one of {DEMO_DATASETS}")
