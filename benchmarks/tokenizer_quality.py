"""Quality of the dual-codebook tokenizer on Fashion-MNIST (test split), against JPEG and WebP.

Three steps, each resumable from its outputs (defaults under ``outputs/``):

    python benchmarks/tokenizer_quality.py pretrain-teacher   # built-in ViT as a classifier -> teacher
    python benchmarks/tokenizer_quality.py train              # the tokenizer (plain PyTorch driver of
                                                               # the `tokenizer` training stage)
    python benchmarks/tokenizer_quality.py evaluate           # PSNR/SSIM/usage/probe vs JPEG/WebP

``evaluate`` prints a table: the tokens' PSNR/SSIM at their fixed size (grid cells x log2 K bits), and
Pillow's JPEG and WebP at the smallest quality whose file is at least as large, plus codebook usage and
linear-probe accuracy of the semantic codes vs raw pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from unimm.data.demo_datasets import FASHION_MNIST_CLASSES
from unimm.evaluation import metrics
from unimm.tokenizer import DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.stages.tokenizer import (
    TokenizerStage,
    TokenizerStageArguments,
    TokenizerTrainingModel,
    collect_codes,
    pretrain_teacher_classifier,
    save_reconstruction_grid,
)

logger = logging.getLogger("tokenizer_quality")


def pretrain_teacher(args: argparse.Namespace) -> None:
    stage = TokenizerStage(
        TokenizerStageArguments(
            dataset="fashion_mnist", tokenizer_config=args.config, image_size=args.image_size
        )
    )
    train, test = stage.build_datasets()
    accuracy = pretrain_teacher_classifier(
        stage.config.teacher_config,
        train,
        test,
        num_labels=len(FASHION_MNIST_CLASSES),
        output_dir=args.teacher_dir,
        epochs=args.teacher_epochs,
        learning_rate=args.teacher_learning_rate,
        log_path=Path(args.teacher_dir) / "log.jsonl",
    )
    print(f"teacher classifier test accuracy (first {len(test)} test images): {accuracy:.4f}")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> None:
    """A plain-PyTorch driver of the stage's build_model/build_datasets/collate/compute_loss."""
    output_dir, checkpoint_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"
    stage = TokenizerStage(
        TokenizerStageArguments(
            dataset="fashion_mnist",
            tokenizer_config=args.config,
            image_size=args.image_size,
            teacher_name_or_path=args.teacher_dir if Path(args.teacher_dir).exists() else None,
            codebook_size=args.codebook_size,
            max_eval_samples=1000,
        )
    )
    train_set, eval_set = stage.build_datasets()
    if (checkpoint_dir / "model.safetensors").exists():
        # The checkpoint is the exported tokenizer: the loss has no state without a discriminator.
        model = TokenizerTrainingModel(
            DualCodebookTokenizer.from_pretrained(checkpoint_dir), stage.build_loss()
        )
        state = torch.load(checkpoint_dir / "trainer_state.pt", weights_only=False)
        logger.info("resuming from step %d", state["step"])
    else:
        model, state = stage.build_model(), None
    model.train()
    optimizer = torch.optim.AdamW(
        stage.parameter_groups(model), lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=1e-4
    )
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    generator = torch.Generator().manual_seed(args.seed + step)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=stage.collate,
        generator=generator,
    )
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=250, collate_fn=stage.collate)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = open(output_dir / "log.jsonl", "a")  # noqa: SIM115 - closed after the loop
    start = time.time()
    progress = tqdm(total=args.max_steps, initial=step, desc="tokenizer")
    while step < args.max_steps:
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * lr_multiplier(step, args.max_steps, args.warmup_steps)
            loss, logged = stage.compute_loss(model, batch, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", psnr=f"{logged['psnr']:.2f}")
            if step % 10 == 0:
                record = {"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], **logged}
                log.write(json.dumps({**record, "elapsed_s": round(time.time() - start, 1)}) + "\n")
                log.flush()
            if step % args.checkpoint_steps == 0 or step >= args.max_steps:
                evaluation = stage.evaluate(model, eval_loader)
                log.write(
                    json.dumps({"step": step, **{f"eval_{k}": v for k, v in evaluation.items()}}) + "\n"
                )
                log.flush()
                logger.info("step %d eval %s", step, evaluation)
                save_checkpoint(stage, model, optimizer, step, output_dir, checkpoint_dir)
            if step >= args.max_steps:
                break
    progress.close()
    log.close()


def save_checkpoint(stage, model, optimizer, step: int, output_dir: Path, checkpoint_dir: Path) -> None:
    """A resumable checkpoint (written whole, then swapped in) and the Hub-layout export in ``output_dir``
    (each file replaced atomically), so readers of ``output_dir`` never see a half-written model."""
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    stage.export(model, tmp)
    state = {"optimizer": optimizer.state_dict(), "step": step, "rng": torch.get_rng_state()}
    torch.save(state, tmp / "trainer_state.pt")
    old = checkpoint_dir.with_name(checkpoint_dir.name + ".old")
    if checkpoint_dir.exists():
        checkpoint_dir.rename(old)
    tmp.rename(checkpoint_dir)
    shutil.rmtree(old, ignore_errors=True)
    export_tmp = output_dir / "export.tmp"
    stage.export(model, export_tmp)
    for path in export_tmp.iterdir():
        os.replace(path, output_dir / path.name)
    export_tmp.rmdir()
    stage.write_samples(model, step, output_dir / "samples")


def encode_with_codec(
    images: np.ndarray, codec: str, quality: int, scale: float = 1.0
) -> tuple[np.ndarray, float]:
    """Round-trip uint8 (B, H, W) grayscale images through Pillow, optionally coded at ``scale`` of their size
    and upsampled back (bicubic); returns the decoded images and the mean file size in bytes."""
    decoded, sizes = [], []
    height, width = images.shape[1:]
    coded_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).resize(coded_size, Image.BICUBIC).save(buffer, format=codec, quality=quality)
        sizes.append(buffer.tell())
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer).convert("L").resize((width, height), Image.BICUBIC)))
    return np.stack(decoded), float(np.mean(sizes))


def codec_at_budget(
    images: np.ndarray, codec: str, budget_bytes: float, scale: float = 1.0
) -> dict[str, float]:
    """The codec at the lowest quality whose mean file size is >= the token budget (quality 1 if every
    quality is larger), found by bisection (size grows with quality): PSNR/SSIM on the same images."""
    low, high = 1, 100
    while low < high:
        middle = (low + high) // 2
        if encode_with_codec(images, codec, middle, scale)[1] >= budget_bytes:
            high = middle
        else:
            low = middle + 1
    decoded, size = encode_with_codec(images, codec, low, scale)
    prediction = torch.from_numpy(decoded).float().div(255).unsqueeze(1)  # (B, 1, H, W)
    target = torch.from_numpy(images).float().div(255).unsqueeze(1)
    return {
        "quality": low,
        "scale": scale,
        "bytes": size,
        "psnr": float(metrics.psnr(prediction, target).mean()),
        "ssim": float(metrics.ssim(prediction, target).mean()),
    }


def evaluate(args: argparse.Namespace) -> None:
    model = DualCodebookTokenizer.from_pretrained(args.output_dir).eval()
    processor = DualCodebookImageProcessor.from_pretrained(args.output_dir)
    stage_args = TokenizerStageArguments(
        dataset="fashion_mnist",
        image_size=model.config.image_size,
        max_train_samples=args.probe_train_samples,
        max_eval_samples=args.test_samples,
    )
    stage = TokenizerStage(stage_args)
    train_set, test_set = stage.build_datasets()
    test = collect_codes(model, test_set)
    probe_train = collect_codes(model, train_set)
    config = model.config
    grid_h, grid_w = test["image_token_ids"].shape[1:]
    bits = metrics.bits_per_image(grid_h, grid_w, config.codebook_size)
    counts = metrics.codebook_counts(test["image_token_ids"], config.codebook_size)
    # Fashion-MNIST is grayscale: compare on the luma channel, which JPEG/WebP then code as grayscale.
    gray = test["pixels"].mean(1, keepdim=True)
    gray_reconstruction = test["reconstructions"].mean(1, keepdim=True)
    tokens = {
        "psnr": float(metrics.psnr(gray_reconstruction, gray).mean()),
        "ssim": float(metrics.ssim(gray_reconstruction, gray).mean()),
        "bytes": bits / 8,
    }
    images_u8 = (gray[:, 0] * 255).round().to(torch.uint8).numpy()
    codecs = {
        f"{codec}@{scale}": codec_at_budget(images_u8, codec, bits / 8, scale)
        for codec in ("JPEG", "WEBP")
        for scale in (1.0, 0.5)
    }

    @torch.no_grad()
    def semantic_features(ids: torch.Tensor) -> torch.Tensor:
        return model.embed(ids).semantic_embeddings.flatten(1)  # (N, h*w*Ds)

    probe_semantic = metrics.linear_probe_accuracy(
        semantic_features(probe_train["image_token_ids"]),
        probe_train["labels"],
        semantic_features(test["image_token_ids"]),
        test["labels"],
    )
    probe_pixels = metrics.linear_probe_accuracy(
        probe_train["pixels"].mean(1).flatten(1), probe_train["labels"], gray.flatten(1), test["labels"]
    )
    report = {
        "test_images": len(gray),
        "grid": [int(grid_h), int(grid_w)],
        "codebook_size": config.codebook_size,
        "bits_per_image": bits,
        "tokens": tokens,
        "codecs": codecs,
        "codebook_usage": metrics.codebook_usage(counts),
        "codebook_perplexity": metrics.codebook_perplexity(counts),
        "linear_probe": {
            "semantic_codes": probe_semantic,
            "raw_pixels": probe_pixels,
            "train_images": len(probe_train["labels"]),
        },
    }
    Path(args.output_dir, "quality.json").write_text(json.dumps(report, indent=2))
    first = torch.stack([test_set[i]["pixel_values"] for i in range(min(32, len(test_set)))])
    grid_path = save_reconstruction_grid(
        model, processor, first, Path(args.output_dir) / "reconstructions-test.png"
    )
    print_report(report, grid_path)


def print_report(report: dict, grid_path: Path) -> None:
    print(
        f"\nFashion-MNIST test split, {report['test_images']} images, 32x32, grid {report['grid'][0]}x{report['grid'][1]}, K={report['codebook_size']}"
    )
    print(f"{'method':<34}{'bytes/image':>12}{'PSNR dB':>10}{'SSIM':>8}")
    tokens = report["tokens"]
    print(
        f"{'unimm tokens (ids, fixed length)':<34}{tokens['bytes']:>12.1f}{tokens['psnr']:>10.2f}{tokens['ssim']:>8.4f}"
    )
    for key, row in report["codecs"].items():
        codec = key.split("@")[0]
        coded = round(32 * row["scale"])
        name = f"{codec} q={row['quality']} at {coded}x{coded}"
        print(f"{name:<34}{row['bytes']:>12.1f}{row['psnr']:>10.2f}{row['ssim']:>8.4f}")
    print("(Pillow codecs on the luma channel; 16x16 rows are coded downscaled, then upsampled bicubic;")
    print(" each codec row is its lowest quality whose mean size is >= the tokens' bytes, or quality 1)")
    print(
        f"\ncodebook usage on test: {report['codebook_usage'] * 100:.1f}% of entries, perplexity {report['codebook_perplexity']:.1f}"
    )
    probe = report["linear_probe"]
    print(
        f"linear probe (train {probe['train_images']} images -> test): semantic codes {probe['semantic_codes'] * 100:.2f}%, "
        f"raw pixels {probe['raw_pixels'] * 100:.2f}%"
    )
    print(f"grid of originals (odd rows) vs reconstructions: {grid_path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["pretrain-teacher", "train", "evaluate"])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher-dir", default="outputs/teacher-fmnist-vit")
    parser.add_argument("--teacher-epochs", type=float, default=2.0)
    parser.add_argument("--teacher-learning-rate", type=float, default=3e-3)
    parser.add_argument("--output-dir", default="outputs/tokenizer-fmnist")
    parser.add_argument("--codebook-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--checkpoint-steps", type=int, default=250)
    parser.add_argument("--probe-train-samples", type=int, default=10000)
    parser.add_argument("--test-samples", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    {"pretrain-teacher": pretrain_teacher, "train": train, "evaluate": evaluate}[args.command](args)


if __name__ == "__main__":
    main()
