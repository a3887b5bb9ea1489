"""Chat over a batch of images: the visual tokenizer run once per image against once per batch, in one run.

    python benchmarks/chat_encoding.py                                   # demo checkpoint, 64 images
    python benchmarks/chat_encoding.py --images 250 --device cuda

One batch of --images questions ("What is this?", each about its own Fashion-MNIST test image; random images
when the data is not installed), answered in one engine call either way. The one-by-one path encodes every
image in its own visual tokenizer call, as ``UniMMProcessor`` did before it took ``image_grids``; the batched
path is ``UniMMPipeline.chat``, one visual tokenizer call per image size (the demo processor resizes every
image to one size: one call). Rows: encoding alone (open, preprocess, visual tokenizer) and the whole chat
(encoding, chat template, --max-new-tokens greedy tokens of answer). Both paths must give the same code grids
and answers; each time is the fastest of --repeats runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json

import PIL.Image
import torch
from clocks import Clock, add_device_argument

from unimm.commands.devices import DTYPE_CHOICES, resolve_dtype
from unimm.pipelines import UniMMPipeline

QUESTION = "What is this?"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="checkpoints/demo", help="pipeline folder")
    parser.add_argument("--images", type=int, default=64, help="questions, one image each (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_device_argument(parser)
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on CUDA, float32 on a CPU"
    )
    parser.add_argument("--output-json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def load_images(count: int, size: int) -> tuple[list[PIL.Image.Image], str]:
    """Fashion-MNIST test images, or seeded random ones when the data is not installed."""
    try:
        from unimm.data.demo_datasets import load_fashion_mnist

        test = load_fashion_mnist(image_size=size, allow_hub=False)["test"]
        rows = test.select([index % len(test) for index in range(count)])
        return [row["segments"][0]["image"] for row in rows], "Fashion-MNIST test images"
    except (OSError, ValueError):
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8)
        return [PIL.Image.fromarray(array.numpy()) for array in pixels], "random images"


def encode_one_by_one(pipeline: UniMMPipeline, images: list) -> list[torch.Tensor]:
    """One visual tokenizer call per image."""
    return [pipeline.encode([image])[0] for image in images]


def chat_one_by_one(pipeline: UniMMPipeline, conversations: list, images: list, max_new_tokens: int) -> list:
    """``UniMMPipeline.chat`` with every image encoded in its own visual tokenizer call."""
    grids = encode_one_by_one(pipeline, images)
    batch = pipeline.processor(
        messages=conversations, image_grids=grids, add_generation_prompt=True, padding_side="left"
    )
    output = pipeline.llm.generate_multimodal(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mode="text",
        max_new_tokens=max_new_tokens,
    )
    texts, _ = pipeline.processor.batch_decode(output.sequences, output.sequence_lengths)
    return [text.strip() for text in texts]


def fastest(clock: Clock, function, repeats: int) -> tuple[float, float]:
    """``(main, wall)`` seconds of the fastest of ``repeats`` calls (after one untimed warm-up call)."""
    function()
    return min((clock.time(function) for _ in range(repeats)), key=lambda seconds: seconds[0])


def main() -> None:
    args = parse_arguments()
    clock = Clock(torch.device(args.device))
    clock.pin_threads(args.threads)
    dtype = resolve_dtype(args.dtype, clock.device)
    pipeline = UniMMPipeline.from_pretrained(args.checkpoint, dtype=dtype, device=args.device)
    pipeline.set_progress_bar_config(disable=True)
    images, source = load_images(args.images, pipeline.visual_tokenizer.config.image_size)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
        for image in images
    ]

    # Both paths must agree before they are timed.
    one_grids, batched_grids = encode_one_by_one(pipeline, images), pipeline.encode(images)
    assert all(torch.equal(a, b) for a, b in zip(one_grids, batched_grids)), "the code grids differ"
    one_answers = chat_one_by_one(pipeline, conversations, images, args.max_new_tokens)
    batched_answers = pipeline.chat(conversations, max_new_tokens=args.max_new_tokens).texts
    assert one_answers == batched_answers, "the answers differ"

    stages = {
        "encode": (
            lambda: encode_one_by_one(pipeline, images),
            lambda: pipeline.encode(images),
        ),
        "chat": (
            lambda: chat_one_by_one(pipeline, conversations, images, args.max_new_tokens),
            lambda: pipeline.chat(conversations, max_new_tokens=args.max_new_tokens),
        ),
    }
    results = []
    for stage, (one_by_one, batched) in stages.items():
        one_seconds, one_wall = fastest(clock, one_by_one, args.repeats)
        batch_seconds, batch_wall = fastest(clock, batched, args.repeats)
        results.append(
            {
                "stage": stage,
                "one_by_one_seconds": one_seconds,
                "batched_seconds": batch_seconds,
                "one_by_one_wall_seconds": one_wall,
                "batched_wall_seconds": batch_wall,
                "speedup": one_seconds / batch_seconds,
                "wall_speedup": one_wall / batch_wall,
            }
        )

    print(
        f"chat over {args.images} images ({source}, {images[0].size[0]} px), {args.max_new_tokens} new tokens; "
        f"{args.checkpoint}; {clock.describe()}, {str(dtype).removeprefix('torch.')}; same grids and answers"
    )
    unit = clock.unit
    print(f"| stage | one-by-one encoding ({unit}) | batched encoding ({unit}) | speed-up | wall speed-up |")
    print("|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['stage']} | {row['one_by_one_seconds']:.3f} | {row['batched_seconds']:.3f} | "
            f"{row['speedup']:.2f}x | {row['wall_speedup']:.2f}x |"
        )
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump({"images": args.images, "source": source, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
