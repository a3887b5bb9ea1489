"""Data: the sample schema, loaders, dataset specs, pre-tokenization, packing, collators and the offline
demo datasets.

Names are imported on first use: the sample schema alone does not load the loaders, ``datasets`` or the
demo data."""

from __future__ import annotations

from unimm.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "BadRecordError": "bad_records",
    "BadRecords": "bad_records",
    "PaddingCollator": "collators",
    "TextDropout": "collators",
    "FASHION_MNIST_CLASSES": "demo_datasets",
    "load_emoji": "demo_datasets",
    "load_fashion_mnist": "demo_datasets",
    "load_image_folder": "loaders",
    "load_interleaved": "loaders",
    "load_jsonl": "loaders",
    "load_llava": "loaders",
    "load_parquet": "loaders",
    "load_webdataset": "loaders",
    "mix_datasets": "loaders",
    "PackedCollator": "packing",
    "pack_dataset": "packing",
    "pack_examples": "packing",
    "load_pretokenized": "pretokenize",
    "pretokenize_images": "pretokenize",
    "DEFAULT_MAX_IMAGE_PIXELS": "schema",
    "ImageTooLargeError": "schema",
    "check_image_pixels": "schema",
    "drop_text": "schema",
    "image_segment": "schema",
    "image_tokens_segment": "schema",
    "max_image_pixels": "schema",
    "open_image": "schema",
    "sample_features": "schema",
    "text_segment": "schema",
    "validate_sample": "schema",
    "DatasetSpec": "spec",
    "DatasetSpecError": "spec",
    "load_dataset_spec": "spec",
    "load_image_splits": "spec",
    "load_images": "spec",
    "parse_dataset_spec": "spec",
    "resolve_spec_paths": "spec",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
