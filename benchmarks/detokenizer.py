"""Diffusion detokenizer benchmarks: reconstruction quality against the tokenizer's own pixel decoder, and speed.

    # quality on held-out Fashion-MNIST test images (PSNR, SSIM, Fréchet distance in the tokenizer's
    # semantic-teacher feature space), 10/20/50 steps, PNG grid side by side: pure diffusion (strength 1)
    # and the pixel decoder's images refined by diffusion (img2img at strength 0.7/0.5/0.3):
    python benchmarks/detokenizer.py quality --tokenizer outputs/tokenizer-fmnist \
        --detokenizer outputs/detokenizer-fmnist/export
    # the trained demo model, a guidance sweep:
    python benchmarks/detokenizer.py quality --tokenizer checkpoints/demo/visual_tokenizer \
        --detokenizer checkpoints/demo/detokenizer --guidance-scale 1 1.5 2 3
    # a decoder trained with condition_on_reconstruction (it runs the tokenizer's pixel decoder itself), pure
    # diffusion only; figures in recipes/demo/README.md:
    python benchmarks/detokenizer.py quality --tokenizer checkpoints/demo/visual_tokenizer \
        --detokenizer outputs/demo/detokenizer-recon/export --strengths 1.0
    # the same on a second, disjoint set of 500 test images (and its own paired and reference sets): the paired
    # distance moves more with the subset than between the decoders (recipes/demo/README.md)
    python benchmarks/detokenizer.py quality --tokenizer checkpoints/demo/visual_tokenizer \
        --detokenizer checkpoints/demo/detokenizer --strengths 1.0 --offset 5000
    # images/s at 20 steps, batch 1 and 16: our batched-CFG pipeline vs the unbatched-CFG reference loop
    # (one image at a time, conditional and unconditional forwards separately, as ILLUME+/Emu3 do):
    python benchmarks/detokenizer.py speed --detokenizer outputs/detokenizer-fmnist/export

Images are compared in [0, 1] on all channels. Two Fréchet distances per feature space, both between mean
teacher features over the token grid (and again in the judge's features, below):
- paired: the reconstructions against their own originals. At a few hundred images this mostly measures how
  close each reconstruction is to its original (reconstructions can score far below a second, disjoint set of
  real images, printed as the reference row), not whether they look like real images.
- reference: the reconstructions against the statistics of --reference-images *other* real test images, the
  usual FID protocol (generated set vs a large real set); the originals themselves get a row too, so the
  sampling noise of the evaluated set is visible.
The pixel decoder was trained with a perceptual loss in that same teacher feature space, so the same distances
are reported in a space neither decoder was trained against: the Fashion-MNIST judge's 128-d features
(`unimm.evaluation.judge`). Keep --num-images at 500 or more: with fewer, the covariance estimates inflate the
distances (for the demo model's pixel decoder, 0.064 at 200 images against 0.023 at 500 and 1000).
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
from unimm.evaluation.judge import FashionMNISTJudge, judge_outputs, load_judge
from unimm.evaluation.judge import images_to_tensor as judge_inputs
from unimm.tokenizer import DualCodebookTokenizer
from unimm.training.stages.detokenizer import from_tokenizer_range, images_to_tensor, to_tokenizer_range

FASHION_MNIST_TEST_IMAGES = 10_000


def load_test_images(image_size: int, count: int, offset: int = 0) -> torch.Tensor:
    """Fashion-MNIST test images [offset, offset + count) in [-1, 1], (N, 3, H, W); indices past the end of the
    10,000 test images wrap around to the start."""
    from unimm.data.demo_datasets import load_fashion_mnist

    test = load_fashion_mnist(image_size=image_size)["test"]
    test = test.select([(offset + index) % len(test) for index in range(count)])
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


def embeddings(
    tokenizer: DualCodebookTokenizer, judge: FashionMNISTJudge, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Teacher and judge features of images in [-1, 1] (the judge sees them as 8-bit grey, as saved)."""
    grey = judge_inputs([_pil(image) for image in images])
    return {"teacher": teacher_embeddings(tokenizer, images, 256), "judge": judge_outputs(judge, grey)[1]}


def score(
    row: dict,
    reconstructions: torch.Tensor,
    originals: torch.Tensor,
    real_features: dict[str, torch.Tensor],
    reference_features: dict[str, torch.Tensor],
    tokenizer: DualCodebookTokenizer,
    judge: FashionMNISTJudge,
    seconds: float,
) -> dict:
    """`row` plus PSNR/SSIM against the originals, Fréchet distances to the originals' features (paired) and
    to the reference images' features."""
    prediction, target = (reconstructions + 1) / 2, (originals + 1) / 2
    features = embeddings(tokenizer, judge, reconstructions)
    return {
        **row,
        "psnr": float(metrics.psnr(prediction.clamp(0, 1), target).mean()),
        "ssim": float(metrics.ssim(prediction.clamp(0, 1), target).mean()),
        **{f"frechet_{space}": frechet_distance(features[space], real_features[space]) for space in features},
        **{
            f"frechet_reference_{space}": frechet_distance(features[space], reference_features[space])
            for space in features
        },
        "seconds_per_image": seconds / reconstructions.shape[0],
    }


def detokenize(
    pipeline: DetokenizerPipeline,
    ids: torch.Tensor,
    steps: int,
    guidance_scale: float,
    strength: float,
    initial: torch.Tensor,
    args: argparse.Namespace,
) -> torch.Tensor:
    """Images in [-1, 1] of `ids` by diffusion, refining `initial` (in [-1, 1]) when `strength` < 1.

    Chunk `i` draws its noise from seed `args.seed + i` whatever the strength, so rows share their noise."""
    outputs = []
    chunks = zip(ids.split(args.batch_size), initial.split(args.batch_size))
    for index, (chunk, start) in enumerate(tqdm(list(chunks), desc=f"{steps} steps, strength {strength:g}")):
        images = pipeline(
            chunk,
            steps,
            guidance_scale,
            generator=torch.Generator().manual_seed(args.seed + index),
            output_type="pt",
            image=(start + 1) / 2,  # ignored at strength 1.0: pure diffusion
            strength=strength,
        ).images
        outputs.append(images * 2 - 1)
    return torch.cat(outputs)


def quality(args: argparse.Namespace) -> None:
    if 2 * args.num_images + args.reference_images > FASHION_MNIST_TEST_IMAGES:
        raise ValueError(
            f"2 x --num-images + --reference-images must be <= {FASHION_MNIST_TEST_IMAGES} to keep the sets disjoint"
        )
    torch.set_num_threads(args.threads)
    tokenizer = DualCodebookTokenizer.from_pretrained(args.tokenizer).eval()
    pipeline = DetokenizerPipeline.from_pretrained(args.detokenizer)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler is not None:
        pipeline.scheduler = getattr(diffusers, args.scheduler).from_config(pipeline.scheduler.config)
    scheduler = type(pipeline.scheduler).__name__
    judge = load_judge()
    size = tokenizer.config.image_size
    # Evaluated images, the paired reference and the reference set: consecutive disjoint ranges of the test
    # images from --offset on (wrapping around past the last one).
    originals = load_test_images(size, args.num_images, offset=args.offset)
    real_features = embeddings(tokenizer, judge, originals)
    floor_features = embeddings(
        tokenizer, judge, load_test_images(size, args.num_images, offset=args.offset + args.num_images)
    )
    reference_features = embeddings(
        tokenizer,
        judge,
        load_test_images(size, args.reference_images, offset=args.offset + 2 * args.num_images),
    )
    real = (real_features, reference_features)
    benchmark_start = time.perf_counter()
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
        pixel_seconds = time.perf_counter() - start
        pixel_row = {"decoder": "tokenizer pixel decoder", "scheduler": None, "steps": None}
        pixel_row |= {"strength": None, "guidance_scale": None}
        rows = [score(pixel_row, pixel_decoded, originals, *real, tokenizer, judge, pixel_seconds)]
        columns = {"original": originals, "pixel decoder": pixel_decoded}
        for guidance_scale in args.guidance_scale:
            for steps in args.steps:
                for strength in args.strengths:
                    start = time.perf_counter()
                    images = detokenize(pipeline, ids, steps, guidance_scale, strength, pixel_decoded, args)
                    # Refining needs the pixel decoder's images first: their time counts.
                    seconds = time.perf_counter() - start + (pixel_seconds if strength < 1 else 0.0)
                    name = "diffusion" if strength == 1 else "pixel decoder + diffusion refine"
                    row = {"decoder": name, "scheduler": scheduler, "steps": steps, "strength": strength}
                    row["guidance_scale"] = guidance_scale
                    rows.append(score(row, images, originals, *real, tokenizer, judge, seconds))
                    tqdm.write(  # each row as soon as it is measured (the full table comes at the end)
                        f"{steps} steps, cfg {guidance_scale:g}, strength {strength:g}: Fréchet teacher "
                        f"{rows[-1]['frechet_teacher']:.4f} paired / {rows[-1]['frechet_reference_teacher']:.4f} "
                        f"reference (pixel decoder {rows[0]['frechet_teacher']:.4f} / "
                        f"{rows[0]['frechet_reference_teacher']:.4f})"
                    )
                    label = "diffusion" if strength == 1 else f"refine {strength:g}"
                    cfg = f" cfg {guidance_scale:g}" if len(args.guidance_scale) > 1 else ""
                    columns[f"{label} {steps}{cfg}"] = images
    floor = {space: frechet_distance(floor_features[space], real_features[space]) for space in floor_features}
    originals_to_reference = {
        space: frechet_distance(real_features[space], reference_features[space]) for space in real_features
    }
    wall = time.perf_counter() - benchmark_start

    args.output_dir.mkdir(parents=True, exist_ok=True)
    grid_path = args.output_dir / "detokenizer_quality_grid.png"
    shown = min(args.grid_images, args.num_images)
    tiles = [_pil(column[row]) for row in range(shown) for column in columns.values()]
    make_image_grid(tiles, rows=shown, cols=len(columns)).resize(
        (len(columns) * 64, shown * 64), Image.NEAREST
    ).save(grid_path)
    report = {
        "num_images": args.num_images,
        "offset": args.offset,
        "other_real_images_frechet_teacher": floor["teacher"],
        "other_real_images_frechet_judge": floor["judge"],
        "reference_images": args.reference_images,
        "originals_frechet_reference_teacher": originals_to_reference["teacher"],
        "originals_frechet_reference_judge": originals_to_reference["judge"],
        "wall_seconds": wall,
        "rows": rows,
        "columns": list(columns),
    }
    (args.output_dir / "detokenizer_quality.json").write_text(json.dumps(report, indent=2))

    print(
        f"\nHeld-out Fashion-MNIST test images: {args.num_images} from test image {args.offset} on "
        f"(tokens from {args.tokenizer})"
    )
    print(f"scheduler: {scheduler}; strength 1 = pure diffusion, < 1 = refining the pixel decoder's images")
    header = f"{'decoder':<34}{'steps':>6}{'strength':>9}{'cfg':>5}{'PSNR dB':>9}{'SSIM':>8}"
    print(f"{'':<71}{'Fréchet, paired':>20}{'Fréchet vs reference':>24}")
    print(f"{header}{'teacher':>10}{'judge':>10}{'teacher':>12}{'judge':>12}{'s/image':>9}")
    for row in rows:
        steps, strength, cfg = (
            "" if row[key] is None else f"{row[key]:g}" for key in ("steps", "strength", "guidance_scale")
        )
        print(
            f"{row['decoder']:<34}{steps:>6}{strength:>9}{cfg:>5}{row['psnr']:>9.2f}{row['ssim']:>8.4f}"
            f"{row['frechet_teacher']:>10.4f}{row['frechet_judge']:>10.3f}"
            f"{row['frechet_reference_teacher']:>12.4f}{row['frechet_reference_judge']:>12.3f}"
            f"{row['seconds_per_image']:>9.4f}"
        )
    print(
        f"{'other real test images (paired reference)':<71}{floor['teacher']:>10.4f}{floor['judge']:>10.3f}"
    )
    print(
        f"{'the originals themselves':<71}{'':>20}"
        f"{originals_to_reference['teacher']:>12.4f}{originals_to_reference['judge']:>12.3f}"
    )
    print(f"reference: {args.reference_images} other Fashion-MNIST test images (after the paired reference)")
    print(f"grid (columns: {', '.join(columns)}): {grid_path}")
    print(f"wall time: {wall:.0f} s")


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
        # quality: one set of rows per value
        nargs = "+" if name == "quality" else None
        default = [1.5] if name == "quality" else 1.5
        command.add_argument("--guidance-scale", type=float, nargs=nargs, default=default)
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--seed", type=int, default=0)
    sub.choices["quality"].add_argument("--tokenizer", required=True, help="DualCodebookTokenizer folder")
    sub.choices["quality"].add_argument("--num-images", type=int, default=500)
    sub.choices["quality"].add_argument(
        "--offset",
        type=int,
        default=0,
        help="first evaluated test image; the paired reference and the reference images follow it (wrapping "
        "around), so e.g. --offset 5000 evaluates a second subset disjoint from the default one",
    )
    sub.choices["quality"].add_argument(
        "--reference-images",
        type=int,
        default=5000,
        help="real test images (after the evaluated ones and the paired reference) for the reference statistics",
    )
    sub.choices["quality"].add_argument(
        "--scheduler", default=None, help="a diffusers scheduler class to swap in (default: the saved one)"
    )
    sub.choices["quality"].add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    sub.choices["quality"].add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=[1.0, 0.7, 0.5, 0.3],
        help="1.0: pure diffusion from noise; < 1: refine the pixel decoder's images from that point",
    )
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
