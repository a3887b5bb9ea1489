"""Pre-tokenize a dataset's images with a visual tokenizer, into resumable parquet shards.

Run it again after a crash with the same arguments: finished shards are kept, the rest is done.
Several processes share the shards:

    torchrun --nproc_per_node 4 -m unimm.cli tokenize-images ...   (ACCELERATE_USE_CPU=1 on CPUs)
    accelerate launch -m unimm.cli tokenize-images ...              (GPUs)
"""

from __future__ import annotations

import argparse
import logging

from unimm.commands.devices import add_dtype_argument, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unimm.data.loaders import FORMATS, KINDS, PAIR

    parser.add_argument(
        "--tokenizer", required=True, help="folder (or Hub id) of a visual tokenizer (AutoModel)"
    )
    parser.add_argument("--data", required=True, nargs="+", help="data files (or one image folder)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="how to read --data")
    parser.add_argument("--output", required=True, help="folder of the parquet shards (resumed if it exists)")
    parser.add_argument(
        "--kind", default=PAIR, choices=KINDS, help="sample layout of jsonl/parquet/tar records"
    )
    parser.add_argument(
        "--image-root", help="folder relative image paths start from (default: the data file's)"
    )
    parser.add_argument(
        "--rows-per-shard", type=int, default=1000, help="rows per output shard (default: 1000)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per tokenizer forward (default: 32)"
    )
    add_dtype_argument(parser, default="float32")
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first bad record instead of skipping it"
    )


def main(args: argparse.Namespace) -> int:
    from unimm.data.bad_records import BadRecords
    from unimm.data.pretokenize import pretokenize_images, process_state

    state = process_state()
    device = resolve_device(str(state.device))  # this process's device (accelerate's), with TF32 on CUDA
    visual_tokenizer, image_processor = _load_tokenizer(
        args.tokenizer, device, resolve_dtype(args.dtype, device)
    )
    with state.main_process_first():  # the main process builds the ``datasets`` cache, the others reuse it
        dataset = _load_data(args)
    bad_records = BadRecords(strict=args.strict)
    result = pretokenize_images(
        dataset,
        visual_tokenizer,
        image_processor,
        args.output,
        rows_per_shard=args.rows_per_shard,
        batch_size=args.batch_size,
        strict=args.strict,
        bad_records=bad_records,
    )
    if state.is_main_process:
        logger.info(
            "%d rows pre-tokenized in %s (%d bad records skipped)",
            len(result),
            args.output,
            bad_records.total,
        )
    return 0


def _load_tokenizer(name_or_path: str, device, dtype):
    from transformers import AutoImageProcessor, AutoModel

    import unimm.tokenizer

    visual_tokenizer = AutoModel.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    try:
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:  # a tokenizer saved without its processor: rebuild it from the tokenizer config
        image_processor = unimm.tokenizer.DualCodebookImageProcessor.from_tokenizer_config(
            visual_tokenizer.config
        )
    return visual_tokenizer, image_processor


def _load_data(args: argparse.Namespace):
    from unimm.data.loaders import FORMATS

    load = FORMATS[args.format]
    options = {"strict": args.strict, "image_root": args.image_root}
    if args.format == "imagefolder":
        if len(args.data) != 1:
            raise SystemExit(f"--format imagefolder takes one folder, got {len(args.data)} paths")
        return load(args.data[0], **options)
    if args.format in ("jsonl", "parquet", "webdataset"):
        options["kind"] = args.kind
    return load(args.data, **options)
