"""Data: the sample schema, loaders, pre-tokenization, packing, collators and the offline demo datasets."""

from unimm.data.bad_records import BadRecordError, BadRecords
from unimm.data.collators import PaddingCollator, TextDropout
from unimm.data.demo_datasets import FASHION_MNIST_CLASSES, load_emoji, load_fashion_mnist
from unimm.data.loaders import (
    load_image_folder,
    load_interleaved,
    load_jsonl,
    load_llava,
    load_parquet,
    load_webdataset,
    mix_datasets,
)
from unimm.data.packing import PackedCollator, pack_dataset, pack_examples
from unimm.data.pretokenize import load_pretokenized, pretokenize_images
from unimm.data.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    check_image_pixels,
    drop_text,
    image_segment,
    image_tokens_segment,
    max_image_pixels,
    open_image,
    sample_features,
    text_segment,
    validate_sample,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FASHION_MNIST_CLASSES",
    "BadRecordError",
    "ImageTooLargeError",
    "BadRecords",
    "PackedCollator",
    "PaddingCollator",
    "TextDropout",
    "check_image_pixels",
    "drop_text",
    "image_segment",
    "image_tokens_segment",
    "load_emoji",
    "load_fashion_mnist",
    "load_image_folder",
    "load_interleaved",
    "load_jsonl",
    "load_llava",
    "load_parquet",
    "load_pretokenized",
    "load_webdataset",
    "max_image_pixels",
    "mix_datasets",
    "open_image",
    "pack_dataset",
    "pack_examples",
    "pretokenize_images",
    "sample_features",
    "text_segment",
    "validate_sample",
]
