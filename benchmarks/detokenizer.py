"""Diffusion detokenizer benchmarks: reconstruction quality against the tokenizer's own pixel decoder, and speed.

    # quality on held-out Fashion-MNIST test images (PSNR, SSIM, Fréchet distance in the tokenizer's
    # semantic-teacher feature space), 10/20/50 steps, PNG grid side by side:
    python benchmarks/detokenizer.py quality --tokenizer outputs/tokenizer-fmnist \
        --detokenizer outputs/detokenizer-fmnist/export
    # images/s at 20 steps, batch 1 and 16: our batched-CFG pipeline vs the unbatched-CFG reference loop
    # (one image at a time, conditional and unconditional forwards separately, as ILLUME+/Emu3 do):
    python benchmarks/detokenizer.py speed --detokenizer outputs/detokenizer-fmnist/export

Images are compared in [0, 1] on all channels. The Fréchet distance is computed between the teacher features
(mean over the token grid) of the originals and of the reconstructions. As a reference for its sampling noise,
a second, disjoint set of real test images of the same size against the originals (reconstructions are paired
with the originals, so they can score below that reference).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import diffusers
import torch
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from unimm.detokenizer import DetokenizerPipeline
from unimm.detokenizer.pipeline_detokenizer import autoencoder_downsample_factor
from unimm.evaluation import metrics
from unimm.evaluation.frechet import frechet_distance
from unimm.tokenizer import DualCodebookTokenizer
from unimm.training.stages.detokenizer import from_tokenizer_range, images_to_tensor, to_tokenizer_range


def load_test_images(image_size: int, count: int, offset: int = 0) -> torch.Tensor:
    """Fashion-MNIST test images [offset, offset + count) in [-1, 1], (N, 3, H, W)."""
    from unimm.data.demo_datasets import load_fashion_mnist

    test = load_fashion_mnist(image_size=image_size)["test"].select(range(offset, offset + count))
    return images_to_tensor([row["segments"][0]["image"] for row in test], 3).float() / 127.5 - 1.0


@torch.no_grad()
def teacher_embeddings(
    tokenizer: DualCodebookTokenizer, images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Teacher features averaged over the token grid, (N, Dt), for images in [-1, 1]."""
    factor = tokenizer.config.downsample_factor
    features = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_tokenizer_range(images[start : start + batch_size], tokenizer)
        grid = (batch.shape[-2] // factor, batch.shape[-1] // factor)
        features.append(tokenizer.teacher_features(batch, grid)[0].mean(dim=(1, 2)))  # (B, Dt)
    return torch.cat(features)


def score(
    name: str,
    reconstructions: torch.Tensor,
    originals: torch.Tensor,
    real_features: torch.Tensor,
    tokenizer,
    seconds: float,
) -> dict:
    """PSNR/SSIM against the originals and Fréchet distance to the originals' teacher features."""
    prediction, target = (reconstructions + 1) / 2, (originals + 1) / 2
    features = teacher_embeddings(tokenizer, reconstructions, 256)
    return {
        "decoder": name,
        "psnr": float(metrics.psnr(prediction.clamp(0, 1), target).mean()),
        "ssim": float(metrics.ssim(prediction.clamp(0, 1), target).mean()),
        "frechet_teacher": frechet_distance(features, real_features),
        "seconds_per_image": seconds / reconstructions.shape[0],
    }


def quality(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tokenizer = DualCodebookTokenizer.from_pretrained(args.tokenizer).eval()
    pipeline = DetokenizerPipeline.from_pretrained(args.detokenizer)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler is not None:
        pipeline.scheduler = getattr(diffusers, args.scheduler).from_config(pipeline.scheduler.config)
    size = tokenizer.config.image_size
    originals = load_test_images(size, args.num_images)
    real_features = teacher_embeddings(tokenizer, originals, 256)
    floor_features = teacher_embeddings(
        tokenizer, load_test_images(size, args.num_images, offset=args.num_images), 256
    )
    with torch.no_grad():
        ids = torch.cat(
            [
                tokenizer.encode(to_tokenizer_range(chunk, tokenizer))
                for chunk in originals.split(args.batch_size)
            ]
        )
        start = time.perf_counter()
        pixel_decoded = torch.cat(
            [from_tokenizer_range(tokenizer.decode(chunk), tokenizer) for chunk in ids.split(args.batch_size)]
        )
        rows = [
            score(
                "tokenizer pixel decoder",
                pixel_decoded,
                originals,
                real_features,
                tokenizer,
                time.perf_counter() - start,
            )
        ]
        columns = {"original": originals, "pixel decoder": pixel_decoded}
        for steps in args.steps:
            start, outputs = time.perf_counter(), []
            for index, chunk in enumerate(tqdm(ids.split(args.batch_size), desc=f"diffusion {steps} steps")):
                generator = torch.Generator().manual_seed(args.seed + index)
                images = pipeline(
                    chunk, steps, args.guidance_scale, generator=generator, output_type="pt"
                ).images
                outputs.append(images * 2 - 1)
            diffused = torch.cat(outputs)
            name = (
                f"diffusion {type(pipeline.scheduler).__name__[:8]} {steps} st, cfg {args.guidance_scale:g}"
            )
            rows.append(
                score(name, diffused, originals, real_features, tokenizer, time.perf_counter() - start)
            )
            columns[f"diffusion {steps}"] = diffused
    floor = frechet_distance(floor_features, real_features)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    grid_path = args.output_dir / "detokenizer_quality_grid.png"
    shown = min(args.grid_images, args.num_images)
    tiles = [_pil(column[row]) for row in range(shown) for column in columns.values()]
    make_image_grid(tiles, rows=shown, cols=len(columns)).resize(
        (len(columns) * 64, shown * 64), Image.NEAREST
    ).save(grid_path)
    report = {
        "num_images": args.num_images,
        "other_real_images_frechet_teacher": floor,
        "rows": rows,
        "columns": list(columns),
    }
    (args.output_dir / "detokenizer_quality.json").write_text(json.dumps(report, indent=2))

    print(f"\nHeld-out Fashion-MNIST test images: {args.num_images} (tokens from {args.tokenizer})")
    print(f"{'decoder':<40}{'PSNR dB':>9}{'SSIM':>8}{'Fréchet (teacher feats)':>25}{'s/image':>10}")
    for row in rows:
        print(
            f"{row['decoder']:<40}{row['psnr']:>9.2f}{row['ssim']:>8.4f}{row['frechet_teacher']:>25.4f}{row['seconds_per_image']:>10.4f}"
        )
    print(f"{'other real test images (reference)':<40}{'':>9}{'':>8}{floor:>25.4f}")
    print(f"grid (columns: {', '.join(columns)}): {grid_path}")


@torch.no_grad()
def unbatched_cfg_reference(
    pipeline: DetokenizerPipeline, ids: torch.Tensor, steps: int, guidance_scale: float
) -> torch.Tensor:
    """The reference loop: one image at a time, conditional and unconditional forwards separately."""
    decoder, scheduler, images = pipeline.decoder, pipeline.scheduler, []
    for index in range(ids.shape[0]):
        grid = ids[index : index + 1]
        latents = torch.randn(pipeline.sample_shape(grid), generator=torch.Generator().manual_seed(index))
        scheduler.set_timesteps(steps)
        null = torch.ones(1, dtype=torch.bool)
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, timestep)
            conditional = decoder(model_input, timestep, image_token_ids=grid).sample
            unconditional = decoder(model_input, timestep, image_token_ids=grid, drop_condition=null).sample
            prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, timestep, latents).prev_sample
        images.append(pipeline.decode_samples(latents))
    return torch.cat(images)


def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipeline = DetokenizerPipeline.from_pretrained(args.detokenizer)
    pipeline.set_progress_bar_config(disable=True)
    config = pipeline.decoder.config
    image_size = config.sample_size * autoencoder_downsample_factor(pipeline.vae)
    grid = image_size // config.downsample_factor
    steps, guidance = args.speed_steps, args.guidance_scale
    print(
        f"\nimages/s at {steps} steps, guidance {guidance:g}, {grid}x{grid} tokens -> {image_size} px, {args.threads} thread(s)"
    )
    print(
        f"{'batch':>6}{'unbatched CFG (reference)':>28}{'unimm pipeline (batched CFG)':>31}{'speed-up':>10}"
    )
    for batch_size in args.batch_sizes:
        ids = torch.randint(
            0, config.codebook_size, (batch_size, grid, grid), generator=torch.Generator().manual_seed(0)
        )
        pipeline(ids[:1], 2, guidance, output_type="pt")  # warm-up
        reference_run = functools.partial(unbatched_cfg_reference, pipeline, ids, steps, guidance)
        reference = batch_size / best_time(reference_run, args.repeats)
        our_run = functools.partial(
            pipeline, ids, steps, guidance, generator=torch.Generator(), output_type="pt"
        )
        ours = batch_size / best_time(our_run, args.repeats)
        print(f"{batch_size:>6}{reference:>28.2f}{ours:>31.2f}{ours / reference:>9.2f}x")


def best_time(run, repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds (the least disturbed by other processes on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _pil(image: torch.Tensor) -> Image.Image:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(array)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("quality", "speed"):
        command = sub.add_parser(name)
        command.add_argument(
            "--detokenizer", required=True, help="DetokenizerPipeline folder (a training export)"
        )
        command.add_argument("--guidance-scale", type=float, default=1.5)
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--seed", type=int, default=0)
    sub.choices["quality"].add_argument("--tokenizer", required=True, help="DualCodebookTokenizer folder")
    sub.choices["quality"].add_argument("--num-images", type=int, default=500)
    sub.choices["quality"].add_argument(
        "--scheduler", default=None, help="a diffusers scheduler class to swap in (default: the saved one)"
    )
    sub.choices["quality"].add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    sub.choices["quality"].add_argument("--batch-size", type=int, default=100)
    sub.choices["quality"].add_argument("--grid-images", type=int, default=12)
    sub.choices["quality"].add_argument(
        "--output-dir", type=Path, default=Path("outputs/detokenizer-benchmark")
    )
    sub.choices["speed"].add_argument("--speed-steps", type=int, default=20)
    sub.choices["speed"].add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    sub.choices["speed"].add_argument("--repeats", type=int, default=3, help="report the fastest of N runs")
    args = parser.parse_args()
    quality(args) if args.command == "quality" else speed(args)


if __name__ == "__main__":
    main()
