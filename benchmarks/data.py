"""Is the data pipeline ever the bottleneck? Loader and pre-tokenization rates against training steps.

One run measures, on Fashion-MNIST images (32 px RGB, the demo data):

1. the rate a training step consumes samples: the tokenizer stage (``DualCodebookTokenizer``
   ``demo`` config, forward + backward) and the LLM stage (Llama forward + backward on packed rows, at
   the recipe ``tiny`` size and at SmolLM2-135M's size; weights random, speed does not depend on them);
2. the rate each loader delivers samples: first load (reading + validating every image), a pass over
   the loaded dataset with images decoded, and a streaming pass; for the LLM stage, pre-tokenized rows
   read back, turned into ids and packed;
3. pre-tokenization images/s, its time split between the tokenizer's ``encode`` and the rest (reading,
   decoding, image processing, writing shards): the rest bounds the rate on a fast accelerator.

It prints one table per question with the ratio "supplier rate / consumer rate" (> 1: the pipeline
keeps up). The machine may be shared: each rate is the best of ``--repeats`` runs.

    python benchmarks/data.py [--samples 2000] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unimm.data import demo_datasets, loaders
from unimm.data.packing import PackedCollator, pack_examples
from unimm.data.pretokenize import load_pretokenized, pretokenize_images
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer

TAR_SHARDS = 4
LLM_MAX_LENGTH = 1024
LLM_BATCH_ROWS = 2
TOKENIZER_BATCH = 32
TEXT_ID_OFFSET = 2048  # caption bytes become ids above the image codebook, a stand-in for the text tokenizer

LLM_SIZES = {  # Llama shapes: the recipe's tiny smoke-run model and SmolLM2-135M (the demo backbone)
    "llm tiny (2x32)": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "llm SmolLM2-135M shape": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
}


# About a minute a step on 2 shared cores: one timed step after the warm-up.
SINGLE_STEP_MODELS = ("llm SmolLM2-135M shape",)


def best_rate(count: int, run: Callable[[], object], repeats: int) -> float:
    """Items per second of ``run`` (which handles ``count`` items), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


# --- fixtures in every format ------------------------------------------------------------------------


class TimedTokenizer:
    """A visual tokenizer that adds up the seconds spent in ``encode``, to split a job's time."""

    def __init__(self, tokenizer: DualCodebookTokenizer) -> None:
        self.tokenizer = tokenizer
        self.device, self.dtype = tokenizer.device, tokenizer.dtype
        self.seconds = 0.0

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        ids = self.tokenizer.encode(pixel_values)
        self.seconds += time.perf_counter() - start
        return ids


def pretokenize_seconds(dataset, tokenizer, processor, repeats: int) -> tuple[float, float]:
    """(whole job, inside encode) seconds of the fastest of ``repeats`` pre-tokenization runs."""
    runs = []
    for _ in range(repeats):
        timed = TimedTokenizer(tokenizer)
        with tempfile.TemporaryDirectory() as output:
            start = time.perf_counter()
            pretokenize_images(dataset, timed, processor, output, rows_per_shard=500, batch_size=64)
            runs.append((time.perf_counter() - start, timed.seconds))
    return min(runs)


def write_formats(images: list, captions: list[str], root: Path) -> dict[str, Path | list[Path]]:
    """The same samples as JSONL + PNG files, parquet with bytes, tar shards and an image folder."""
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    folder = root / "imagefolder"
    folder.mkdir(parents=True)
    for index, data in enumerate(pngs):
        (folder / f"{index:06d}.png").write_bytes(data)
    metadata = [{"file_name": f"{i:06d}.png", "caption": caption} for i, caption in enumerate(captions)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in metadata))
    jsonl = root / "pairs.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"image": f"imagefolder/{r['file_name']}", "caption": r["caption"]}) + "\n"
            for r in metadata
        )
    )
    parquet = root / "pairs.parquet"
    pyarrow.parquet.write_table(
        pyarrow.table({"image": [{"bytes": d, "path": None} for d in pngs], "caption": captions}), parquet
    )
    shards = []
    for shard in range(TAR_SHARDS):
        path = root / f"shard-{shard}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(shard, len(pngs), TAR_SHARDS):
                for name, data in (
                    (f"{index:06d}.png", pngs[index]),
                    (f"{index:06d}.txt", captions[index].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        shards.append(path)
    return {"jsonl": jsonl, "parquet": parquet, "webdataset": shards, "imagefolder": folder}


def decode_all(dataset) -> int:
    count = 0
    for sample in dataset:
        sample["segments"][0]["image"].load()  # datasets decodes lazily; force the pixels
        count += 1
    return count


def loader_rates(paths: dict, count: int, repeats: int) -> list[tuple[str, float]]:
    rates = []
    for name, path in paths.items():
        load = loaders.FORMATS[name]

        # A fresh cache per run, so "first load" really reads and validates every image.
        def first_load(load=load, path=path):
            with tempfile.TemporaryDirectory() as cache:
                return load(path, cache_dir=cache)

        rates.append((f"{name}: first load (read + validate)", best_rate(count, first_load, repeats)))
        loaded = load(path)
        rates.append(
            (f"{name}: pass, images decoded", best_rate(count, lambda d=loaded: decode_all(d), repeats))
        )
        streamed = load(path, streaming=True)
        rates.append((f"{name}: streaming pass", best_rate(count, lambda d=streamed: decode_all(d), repeats)))
    return rates


# --- consumers: training steps ----------------------------------------------------------------------


def tokenizer_step_rate(tokenizer: DualCodebookTokenizer, repeats: int) -> float:
    tokenizer.train()
    optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=1e-4)
    size = tokenizer.config.image_size
    pixel_values = torch.rand(TOKENIZER_BATCH, 3, size, size) * 2 - 1  # (B, C, H, W)

    def step():
        loss = tokenizer(pixel_values, step=0).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    rate = best_rate(TOKENIZER_BATCH, step, repeats)
    tokenizer.eval()
    return rate


def llm_examples(pretokenized: datasets.Dataset) -> list[dict[str, list[int]]]:
    """Token ids of pre-tokenized rows: caption bytes then image ids (stand-in for UniMMProcessor)."""
    examples = []
    for row in pretokenized:
        image, caption = row["segments"]
        input_ids = [TEXT_ID_OFFSET + byte for byte in caption["text"].encode()] + list(
            image["image_token_ids"]
        )
        examples.append({"input_ids": input_ids})
    return examples


def llm_step_rate(shape: dict, examples: list[dict], repeats: int) -> float:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TEXT_ID_OFFSET + 256, max_position_embeddings=LLM_MAX_LENGTH, **shape)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = list(pack_examples(examples, LLM_MAX_LENGTH))[:LLM_BATCH_ROWS]
    samples_per_step = sum(row["position_ids"].count(0) for row in rows)
    batch = PackedCollator(LLM_MAX_LENGTH, pad_token_id=0)(rows)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    return best_rate(samples_per_step, step, repeats)


def llm_loader_rate(output_dir: Path, count: int, repeats: int) -> float:
    """Pre-tokenized shards streamed back, turned into ids, packed and collated: the LLM stage's input."""

    def run():
        dataset = load_pretokenized(output_dir, streaming=True)
        collator = PackedCollator(LLM_MAX_LENGTH, pad_token_id=0)
        rows = list(pack_examples(llm_examples(dataset), LLM_MAX_LENGTH))
        for start in range(0, len(rows), LLM_BATCH_ROWS):
            collator(rows[start : start + LLM_BATCH_ROWS])

    return best_rate(count, run, repeats)


# --- the report -------------------------------------------------------------------------------------


def print_table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, tuple("-" * width for width in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()

    train = demo_datasets.load_fashion_mnist(image_size=32)["train"].select(range(args.samples))
    images = [row["segments"][0]["image"] for row in train]
    captions = [row["segments"][1]["text"] for row in train]
    torch.manual_seed(0)
    tokenizer = DualCodebookTokenizer(DualCodebookConfig.named("demo")).eval()
    processor = DualCodebookImageProcessor.from_tokenizer_config(tokenizer.config)

    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        paths = write_formats(images, captions, root)
        # The first run (it is also the LLM stage's input below) warms up the processor and the tokenizer.
        pretokenize_images(
            train, tokenizer, processor, root / "pretokenized", rows_per_shard=500, batch_size=64
        )
        pretokenize_split = pretokenize_seconds(train, tokenizer, processor, args.repeats)
        examples = llm_examples(load_pretokenized(root / "pretokenized"))
        rates = loader_rates(paths, args.samples, args.repeats)
        llm_loader = llm_loader_rate(root / "pretokenized", args.samples, args.repeats)

    tokenizer_rate = tokenizer_step_rate(tokenizer, args.repeats)
    llm_rates = {
        name: llm_step_rate(shape, examples, 1 if name in SINGLE_STEP_MODELS else args.repeats)
        for name, shape in LLM_SIZES.items()
    }

    mean_tokens = sum(len(example["input_ids"]) for example in examples) / len(examples)
    print(f"{args.samples} Fashion-MNIST samples at 32 px, {args.threads} threads, best of {args.repeats}")
    print(f"LLM samples average {mean_tokens:.0f} tokens, packed into rows of {LLM_MAX_LENGTH}")
    print_table(
        "Training steps consume (samples/s)",
        ("stage", "samples/s"),
        [("tokenizer demo, fwd+bwd, batch 32", f"{tokenizer_rate:.0f}")]
        + [
            (f"{name}, fwd+bwd, {LLM_BATCH_ROWS} packed rows", f"{rate:.3g}")
            for name, rate in llm_rates.items()
        ],
    )
    print_table(
        "Image loaders against the tokenizer stage",
        ("loader", "samples/s", "x tokenizer step"),
        [(name, f"{rate:.0f}", f"{rate / tokenizer_rate:.1f}") for name, rate in rates],
    )
    print_table(
        "LLM input (pre-tokenized shards -> ids -> packed batches) against the LLM stage",
        ("consumer", "LLM input samples/s", "consumer samples/s", "ratio"),
        [
            (name, f"{llm_loader:.0f}", f"{rate:.3g}", f"{llm_loader / rate:.1f}")
            for name, rate in llm_rates.items()
        ],
    )
    total_seconds, encode_seconds = pretokenize_split
    data_seconds = total_seconds - encode_seconds
    print_table(
        "Pre-tokenization (one pretokenize_images run, its time split by where it went)",
        ("part", "seconds", "share", "images/s", "x encode"),
        [
            ("whole job", f"{total_seconds:.2f}", "100%", f"{args.samples / total_seconds:.0f}", ""),
            (
                "tokenizer.encode (demo tokenizer)",
                f"{encode_seconds:.2f}",
                f"{encode_seconds / total_seconds:.0%}",
                f"{args.samples / encode_seconds:.0f}",
                "1.0",
            ),
            (
                "the rest: read, decode, process, write",
                f"{data_seconds:.2f}",
                f"{data_seconds / total_seconds:.0%}",
                f"{args.samples / data_seconds:.0f}",
                f"{encode_seconds / data_seconds:.1f}",
            ),
        ],
    )


if __name__ == "__main__":
    main()
