"""Data: the sample schema, loaders, dataset specs, pre-tokenization, packing, collators and the offline
demo datasets."""

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
from unimm.data.spec import (
    DatasetSpec,
    DatasetSpecError,
    load_dataset_spec,
    load_image_splits,
    load_images,
    parse_dataset_spec,
    resolve_spec_paths,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FASHION_MNIST_CLASSES",
    "BadRecordError",
    "DatasetSpec",
    "DatasetSpecError",
    "ImageTooLargeError",
    "BadRecords",
    "PackedCollator",
    "PaddingCollator",
    "TextDropout",
    "check_image_pixels",
    "drop_text",
    "image_segment",
    "image_tokens_segment",
    "load_dataset_spec",
    "load_emoji",
    "load_fashion_mnist",
    "load_image_folder",
    "load_image_splits",
    "load_images",
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
    "parse_dataset_spec",
    "pretokenize_images",
    "resolve_spec_paths",
    "sample_features",
    "text_segment",
    "validate_sample",
]
