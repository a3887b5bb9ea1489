"""UniMMPipeline end to end: 16 images (4 prompts x 4) in one call against the same 16 one call at a time.

    python benchmarks/pipeline.py                                  # untrained, demo model's shapes
    python benchmarks/pipeline.py --checkpoint checkpoints/demo    # a checkpoint folder
    python benchmarks/pipeline.py --device cuda                    # 64 images (4 prompts x 16), bf16

For each decoder (the diffusion detokenizer at --steps steps, and the tokenizer's pixel decoder) it times
``generate_images(4 prompts, num_images_per_prompt=4)`` — one guided, constrained language-model call for
all 16 images, then one batched decode — and 16 calls of ``generate_images([prompt])``, and prints seconds
per image and the ratio. Each measurement is the fastest of --repeats runs after one warm-up call. Without
--checkpoint the weights are random (``build_random_pipeline("demo")``): the images are noise, the amount of
work per image is the demo model's (8x8 grid, 76 tokens per image, guidance on).

On CUDA the clock is read after the device finishes (``benchmarks/clocks.py``), ``--dtype auto`` is bf16 (float32
on a CPU, as ``unimm generate``), and a call draws 16 images per prompt (a GPU's batch; the CPU keeps 4).
"""

from __future__ import annotations

import argparse
import json

import torch
from clocks import Clock, add_device_argument

from unimm.commands.devices import DTYPE_CHOICES, resolve_dtype
from unimm.llm import ModalitySampling
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import build_random_pipeline

PROMPTS = ["a photo of a sneaker", "a photo of a bag", "an emoji of a cat face", "an emoji of a red heart"]
IMAGES_PER_PROMPT = {"cpu": 4, "cuda": 16}  # per device type
DECODERS = ("diffusion", "pixel")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", default=None, help="pipeline folder (default: random demo-size model)"
    )
    parser.add_argument("--steps", type=int, default=20, help="diffusion decoder steps (default: 20)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="LLM guidance (default: 3.0)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (default: 1)")
    add_device_argument(parser)
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on CUDA, float32 on a CPU"
    )
    parser.add_argument("--output-json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def fastest(clock: Clock, function, repeats: int) -> float:
    """Wall seconds of the fastest of ``repeats`` calls of ``function`` (after one untimed warm-up call)."""
    function()
    return min(clock.time(function)[1] for _ in range(repeats))


def main() -> None:
    args = parse_arguments()
    clock = Clock(torch.device(args.device))
    dtype = resolve_dtype(args.dtype, clock.device)
    images_per_prompt = IMAGES_PER_PROMPT[clock.device.type]
    if args.checkpoint:
        pipeline = UniMMPipeline.from_pretrained(args.checkpoint, dtype=dtype, device=args.device)
        source = args.checkpoint
    else:
        pipeline = build_random_pipeline("demo").to(args.device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
        source = "random weights, demo-model shapes"
    pipeline.set_progress_bar_config(disable=True)
    grid = pipeline.image_grid()
    sampling = ModalitySampling(do_sample=True, temperature=1.0)
    count = len(PROMPTS) * images_per_prompt
    options = {
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.steps,
        "image_sampling": sampling,
    }

    def batched(decoder: str):
        def run() -> None:
            output = pipeline.generate_images(
                PROMPTS, num_images_per_prompt=images_per_prompt, seed=0, decoder=decoder, **options
            )
            assert len(output.images) == count

        return run

    def one_at_a_time(decoder: str):
        def run() -> None:
            for index in range(count):
                prompt = PROMPTS[index // images_per_prompt]
                output = pipeline.generate_images([prompt], seed=index, decoder=decoder, **options)
                assert len(output.images) == 1

        return run

    results = []
    for decoder in DECODERS:
        batch_seconds = fastest(clock, batched(decoder), args.repeats) / count
        single_seconds = fastest(clock, one_at_a_time(decoder), args.repeats) / count
        results.append(
            {
                "decoder": decoder,
                "batched_seconds_per_image": batch_seconds,
                "one_at_a_time_seconds_per_image": single_seconds,
                "speedup": single_seconds / batch_seconds,
            }
        )

    print(
        f"{count} images ({len(PROMPTS)} prompts x {images_per_prompt}), {grid[0]}x{grid[1]} codes each, "
        f"LLM guidance {args.guidance_scale}, diffusion {args.steps} steps; {source}; "
        f"{args.device} {str(dtype).removeprefix('torch.')}, {clock.describe()}"
    )
    print(f"| decoder | one call for {count} (s/image) | {count} calls of 1 (s/image) | speed-up |")
    print("|---|---|---|---|")
    for row in results:
        print(
            f"| {row['decoder']} | {row['batched_seconds_per_image']:.3f} | "
            f"{row['one_at_a_time_seconds_per_image']:.3f} | {row['speedup']:.1f}x |"
        )
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(
                {"source": source, "grid": grid, "steps": args.steps, "results": results}, file, indent=2
            )


if __name__ == "__main__":
    main()
