"""The quality report of a pipeline checkpoint (``unimm eval``): understanding, generation, reconstruction.

    report = evaluate_pipeline(UniMMPipeline.from_pretrained("checkpoints/demo"), "outputs/eval")

1. Understanding: Fashion-MNIST test images asked "What is this?"; a free-text answer is right when it
   names the true class and no other (:func:`answer_to_class`).
2. Generation: ``images_per_class`` images per class generated from captions, judged by the Fashion-MNIST
   judge (:mod:`unimm.evaluation.judge`); the judge's accuracy on real test images is the ceiling.
3. Reconstruction: PSNR/SSIM of encode -> decode on Fashion-MNIST and emoji test images, with the pixel
   decoder and (on a subset) the diffusion detokenizer when the checkpoint has one.
4. Emoji: Fréchet distance in judge features between images generated from the test captions and the real
   test images; the same distance between real train and real test images is the reference scale.

Writes ``report.md``, ``report.json`` and PNG grids to ``output_dir``. The same seed (and batch size)
gives the same numbers and images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from PIL import ImageDraw
from tqdm.auto import tqdm

from unimm.data.demo_datasets import (
    FASHION_MNIST_CAPTION_NAMES,
    FASHION_MNIST_CLASSES,
    fashion_mnist_caption,
    load_emoji,
    load_fashion_mnist,
)
from unimm.llm.sampling import default_image_sampling, describe_sampling

from .frechet import frechet_distance
from .judge import FashionMNISTJudge, images_to_tensor, judge_outputs, load_judge
from .metrics import psnr, ssim

logger = logging.getLogger(__name__)

QUESTION = "What is this?"
# The aims for the demo model; shown next to the measured values.
UNDERSTANDING_TARGET = 0.88
GENERATION_TARGET = 0.85
NUM_EXAMPLES = 10  # understanding answers listed in report.md
GRID_COLUMNS = 10
GRID_CELL = 64

# Extra names a free-text answer may use for a class, beside its caption name and official name.
_CLASS_ALIASES: dict[int, tuple[str, ...]] = {
    0: ("t shirt", "tshirt", "tee shirt", "top"),
    1: ("trousers", "trouser", "pants"),
    9: ("boot",),
}


def _class_patterns() -> list[tuple[re.Pattern[str], int]]:
    """(pattern, class) for every name of every class, longest name first so that "t-shirt" is consumed
    before "shirt" can match inside it."""
    names: dict[str, int] = {}
    for label, (official, caption_name) in enumerate(zip(FASHION_MNIST_CLASSES, FASHION_MNIST_CAPTION_NAMES)):
        for name in (
            official.lower(),
            caption_name,
            *official.lower().split("/"),
            *_CLASS_ALIASES.get(label, ()),
        ):
            names.setdefault(name, label)
    ordered = sorted(names.items(), key=lambda item: -len(item[0]))
    # Plurals ("sneakers", "dresses"); letters must not continue on either side ("address", "overcoat").
    return [(re.compile(rf"(?<![a-z]){re.escape(name)}(?:e?s)?(?![a-z])"), label) for name, label in ordered]


_PATTERNS = _class_patterns()


def answer_to_class(answer: str) -> int | None:
    """The Fashion-MNIST class a free-text answer names, or ``None`` when it names none or several.

    Case-insensitive; caption names ("pair of trousers"), official names ("T-shirt/top") and plurals count.
    Each match is blanked out before shorter names are tried, so "a t-shirt" is not also a "shirt".
    """
    text = " ".join(answer.lower().replace("\u2019", "'").split())
    found: set[int] = set()
    for pattern, label in _PATTERNS:
        if pattern.search(text):
            found.add(label)
            text = pattern.sub(lambda match: " " * len(match.group()), text)
    return found.pop() if len(found) == 1 else None


@dataclass
class EvaluationReport:
    """Every number of the report (``report.json``); accuracies are fractions in [0, 1]."""

    checkpoint: str
    seed: int
    decoder: str
    guidance_scale: float
    understanding_accuracy: float
    understanding_total: int
    understanding_per_class: list[float | None]
    generation_accuracy: float
    generation_total: int
    generation_per_class: list[float | None]
    judge_real_accuracy: float
    judge_real_total: int
    judge_real_per_class: list[float | None]
    # {"fashion_mnist/pixel": {"psnr": dB, "ssim": ..., "num_images": n}, ...}
    reconstruction: dict[str, dict[str, float]]
    emoji_frechet_generated: float | None
    emoji_frechet_reference: float | None
    emoji_generated_total: int
    emoji_reference_total: int
    emoji_real_total: int
    understanding_examples: list[dict[str, Any]] = field(default_factory=list)
    # How image codes were sampled (ModalitySampling's fields): the checkpoint's own, see default_image_sampling.
    image_sampling: dict[str, Any] = field(default_factory=dict)
    # Unknown words, data the checkpoint did not train on (see DemoTask): read before the figures.
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    timings_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _batches(items: Sequence, batch_size: int, description: str) -> Iterator[tuple[int, Sequence]]:
    """``(start, items[start:start + batch_size])`` under a progress bar."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=description, total=len(starts), leave=False):
        yield start, items[start : start + batch_size]


def _per_class(predictions: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    """Accuracy per class (``None`` for a class with no samples)."""
    accuracies: list[float | None] = []
    for label in range(len(FASHION_MNIST_CLASSES)):
        mask = labels == label
        accuracies.append(float((predictions[mask] == label).float().mean()) if mask.any() else None)
    return accuracies


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def _pixels(images: Sequence[PIL.Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB images to (N, 3, H, W) floats in [0, 1], resized to ``size`` (W, H) when given."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, PIL.Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _tile(image: PIL.Image.Image, cell: int) -> PIL.Image.Image:
    return image.convert("RGB").resize((cell, cell), PIL.Image.Resampling.NEAREST)


def labelled_grid(
    rows: Sequence[Sequence[PIL.Image.Image]],
    labels: Sequence[str],
    cell: int = GRID_CELL,
    label_width: int = 120,
) -> PIL.Image.Image:
    """One row of images per label, the label written on the left (upscaled with nearest neighbours)."""
    columns = max((len(row) for row in rows), default=0)
    grid = PIL.Image.new("RGB", (label_width + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for index, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, index * cell + cell // 2 - 6), label[: label_width // 6], fill="black")
        for column, image in enumerate(images):
            grid.paste(_tile(image, cell), (label_width + column * cell, index * cell))
    return grid


def _captioned_grid(
    images: Sequence[PIL.Image.Image], captions: Sequence[str], columns: int, cell: int = GRID_CELL
) -> PIL.Image.Image:
    """Images in rows of ``columns``, each with (the end of) its caption underneath."""
    caption_height = 14
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    grid = PIL.Image.new("RGB", (columns * cell, max(rows, 1) * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(zip(images, captions)):
        left, top = (index % columns) * cell, (index // columns) * (cell + caption_height)
        grid.paste(_tile(image, cell), (left, top))
        draw.text((left + 1, top + cell + 1), caption.removeprefix("an emoji of ")[: cell // 6], fill="black")
    return grid


@contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    logger.info("%s: %.1f s", name, timings[name])


def evaluate_understanding(
    pipeline: Any,
    images: Sequence[PIL.Image.Image],
    batch_size: int = 250,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """Ask "What is this?" about every image (greedy answers, ``batch_size`` conversations per call); the
    class each answer names (-1 for none or several) and the answers."""
    answers: list[str] = []
    for _, batch in _batches(images, batch_size, "understanding"):
        output = pipeline.chat(
            [QUESTION] * len(batch), images=list(batch), max_new_tokens=max_new_tokens, seed=seed
        )
        answers.extend(output.texts)
    classes = [answer_to_class(answer) for answer in answers]
    predictions = torch.tensor([-1 if label is None else label for label in classes], dtype=torch.long)
    return predictions, answers


def generation_prompts(images_per_class: int) -> tuple[list[str], torch.Tensor]:
    """Class-major prompts: image ``j`` of class ``c`` is captioned with template ``j mod 5``."""
    prompts, labels = [], []
    for label in range(len(FASHION_MNIST_CLASSES)):
        for index in range(images_per_class):
            prompts.append(fashion_mnist_caption(label, index))
            labels.append(label)
    return prompts, torch.tensor(labels, dtype=torch.long)


def generate_from_prompts(
    pipeline: Any,
    prompts: Sequence[str],
    description: str,
    batch_size: int = 250,
    guidance_scale: float = 3.0,
    decoder: str = "pixel",
    num_inference_steps: int = 20,
    seed: int = 0,
) -> list[PIL.Image.Image]:
    """One image per prompt, ``batch_size`` prompts per batched call; call ``i`` uses seed ``seed + i``."""
    images: list[PIL.Image.Image] = []
    for call, (_, batch) in enumerate(_batches(prompts, batch_size, description)):
        output = pipeline.generate_images(
            list(batch),
            num_images_per_prompt=1,
            guidance_scale=guidance_scale,
            seed=seed + call,
            decoder=decoder,
            num_inference_steps=num_inference_steps,
        )
        images.extend(output.images)
    return images


def reconstruction_metrics(
    pipeline: Any,
    images: Sequence[PIL.Image.Image],
    decoder: str,
    batch_size: int = 250,
    num_inference_steps: int = 20,
    seed: int = 0,
    description: str = "reconstruction",
) -> tuple[dict[str, float], list[PIL.Image.Image]]:
    """Mean PSNR (dB) and SSIM of encode -> decode over ``images`` (RGB, [0, 1]; originals resized to the
    decoder's output size if they differ), and the reconstructions."""
    reconstructions: list[PIL.Image.Image] = []
    for _, batch in _batches(images, batch_size, description):
        output = pipeline.reconstruct(
            list(batch), decoder=decoder, num_inference_steps=num_inference_steps, seed=seed
        )
        reconstructions.extend(output.images)
    decoded = _pixels(reconstructions)
    originals = _pixels(images, size=(decoded.shape[-1], decoded.shape[-2]))
    metrics = {
        "psnr": float(psnr(decoded, originals).mean()),
        "ssim": float(ssim(decoded, originals).mean()),
        "num_images": len(images),
    }
    return metrics, reconstructions


def evaluate_pipeline(
    pipeline: Any,
    output_dir: str | Path,
    num_understanding: int = 1000,
    images_per_class: int = 100,
    num_judge_real: int = 10000,
    num_reconstruction: int = 500,
    num_diffusion_reconstruction: int = 50,
    num_emoji: int = 204,
    decoder: str = "pixel",
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 250,
    judge: FashionMNISTJudge | None = None,
    checkpoint_name: str | None = None,
    warnings: Sequence[str] = (),
) -> EvaluationReport:
    """Evaluate ``pipeline`` on the demo data and write ``report.md``, ``report.json`` and PNG grids.

    Args:
        num_understanding: Fashion-MNIST test images asked "What is this?" (the first ones of the split).
        images_per_class: images generated per Fashion-MNIST class (10 classes) and judged.
        num_judge_real: real test images the judge classifies: its accuracy is the ceiling of generation.
        num_reconstruction: Fashion-MNIST test images (and as many emoji, at most all 204) reconstructed
            with the pixel decoder; ``num_diffusion_reconstruction`` of them also with the detokenizer.
        num_emoji: images generated from the emoji test captions (cycled past 204) for the Fréchet distance.
        decoder: ``"pixel"`` (fast, the default) or ``"diffusion"``: how generated codes become images.
        guidance_scale, num_inference_steps: of generation (the LM's guidance; the diffusion decoder's steps).
        batch_size: images or conversations per pipeline call.
        judge: the Fashion-MNIST judge (default: the packaged one).
        warnings: shown at the top of ``report.md`` (``DemoTask`` checks vocabulary and training data).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    judge = judge or load_judge()
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1. Data: the first test images of Fashion-MNIST (as the demo model saw them: RGB, padded to 32 px).
    fashion_test = load_fashion_mnist(32, mode="RGB")["test"]
    needed = min(max(num_understanding, num_judge_real, num_reconstruction), len(fashion_test))
    fashion_rows = fashion_test.select(range(needed))
    fashion_images = [segments[0]["image"] for segments in fashion_rows["segments"]]
    fashion_labels = torch.tensor(fashion_rows["label"], dtype=torch.long)
    emoji = load_emoji(32)
    emoji_test_images = [segments[0]["image"] for segments in emoji["test"]["segments"]]
    emoji_test_captions = list(emoji["test"]["caption"])

    # 2. Understanding.
    understanding_labels = fashion_labels[:num_understanding]
    with _timer(timings, "understanding"):
        answer_classes, answers = evaluate_understanding(
            pipeline, fashion_images[:num_understanding], batch_size, max_new_tokens, seed
        )
    examples = [
        {"index": index, "label": FASHION_MNIST_CLASSES[label], "answer": answer, "correct": label == guess}
        for index, (label, guess, answer) in enumerate(
            zip(understanding_labels.tolist(), answer_classes.tolist(), answers)
        )
    ]
    # Half wrong and half right answers where there are enough of both: more telling than the first ten.
    wrong = [example for example in examples if not example["correct"]]
    right = [example for example in examples if example["correct"]]
    num_right = min(len(right), NUM_EXAMPLES - min(len(wrong), NUM_EXAMPLES // 2))
    wrong, right = wrong[: NUM_EXAMPLES - num_right], right[:num_right]
    listed = sorted(wrong + right, key=lambda example: example["index"])

    # 3. The judge on real test images (its ceiling), then on images generated from captions.
    real_labels = fashion_labels[:num_judge_real]
    with _timer(timings, "judge_real"):
        real_predictions, _ = judge_outputs(judge, images_to_tensor(fashion_images[:num_judge_real]))
    prompts, generation_labels = generation_prompts(images_per_class)
    generation_options = {
        "batch_size": batch_size,
        "guidance_scale": guidance_scale,
        "decoder": decoder,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
    }
    with _timer(timings, "generation"):
        generated = generate_from_prompts(pipeline, prompts, "generation", **generation_options)
    generated_predictions, _ = judge_outputs(judge, images_to_tensor(generated))

    # 4. Reconstruction: pixel decoder on both datasets; the detokenizer, if any, on a subset.
    sources = {
        "fashion_mnist": fashion_images[:num_reconstruction],
        "emoji": emoji_test_images[:num_reconstruction],
    }
    decoders = {"pixel": num_reconstruction}
    if pipeline.detokenizer is not None and num_diffusion_reconstruction > 0:
        decoders["diffusion"] = min(num_diffusion_reconstruction, num_reconstruction)
    reconstruction: dict[str, dict[str, float]] = {}
    reconstructed: dict[str, list[PIL.Image.Image]] = {}
    with _timer(timings, "reconstruction"):
        for decoder_name, count in decoders.items():
            for source, images in sources.items():
                if not images[:count]:
                    continue
                key = f"{source}/{decoder_name}"
                reconstruction[key], reconstructed[key] = reconstruction_metrics(
                    pipeline, images[:count], decoder_name, batch_size, num_inference_steps, seed, key
                )

    # 5. Emoji: Fréchet distance in judge features between images generated from the test captions and the
    # real test images; the reference compares as many real train images with the same real test images.
    emoji_prompts = [emoji_test_captions[index % len(emoji_test_captions)] for index in range(num_emoji)]
    emoji_generated: list[PIL.Image.Image] = []
    emoji_frechet_generated = emoji_frechet_reference = None
    reference_count = min(num_emoji, len(emoji["train"]))
    if num_emoji >= 2:  # a covariance needs two samples
        with _timer(timings, "emoji_generation"):
            emoji_generated = generate_from_prompts(
                pipeline, emoji_prompts, "emoji generation", **generation_options
            )
        _, real_features = judge_outputs(judge, images_to_tensor(emoji_test_images))
        _, generated_features = judge_outputs(judge, images_to_tensor(emoji_generated))
        emoji_frechet_generated = frechet_distance(generated_features, real_features)
        reference_indices = np.random.default_rng(seed).permutation(len(emoji["train"]))[:reference_count]
        reference_rows = emoji["train"].select(sorted(reference_indices.tolist()))
        reference_images = [segments[0]["image"] for segments in reference_rows["segments"]]
        _, reference_features = judge_outputs(judge, images_to_tensor(reference_images))
        emoji_frechet_reference = frechet_distance(reference_features, real_features)

    # 6. Grids, report.json, report.md.
    files = _write_grids(
        output_dir, generated, generation_labels, emoji_generated, emoji_prompts, sources, reconstructed
    )
    files |= {"report_json": "report.json", "report_md": "report.md"}
    timings["total"] = round(time.perf_counter() - start, 2)
    report = EvaluationReport(
        checkpoint=checkpoint_name or str(getattr(pipeline, "name_or_path", "") or ""),
        seed=seed,
        decoder=decoder,
        guidance_scale=guidance_scale,
        understanding_accuracy=_accuracy(answer_classes, understanding_labels),
        understanding_total=len(understanding_labels),
        understanding_per_class=_per_class(answer_classes, understanding_labels),
        generation_accuracy=_accuracy(generated_predictions, generation_labels),
        generation_total=len(generation_labels),
        generation_per_class=_per_class(generated_predictions, generation_labels),
        judge_real_accuracy=_accuracy(real_predictions, real_labels),
        judge_real_total=len(real_labels),
        judge_real_per_class=_per_class(real_predictions, real_labels),
        reconstruction=reconstruction,
        emoji_frechet_generated=emoji_frechet_generated,
        emoji_frechet_reference=emoji_frechet_reference,
        emoji_generated_total=len(emoji_generated),
        emoji_reference_total=reference_count if emoji_generated else 0,
        emoji_real_total=len(emoji_test_images),
        understanding_examples=listed,
        image_sampling=dataclasses.asdict(default_image_sampling(pipeline.llm.generation_config)),
        warnings=list(warnings),
        files=files,
        timings_seconds=timings,
    )
    (output_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    (output_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    logger.info("report written to %s (%.0f s)", output_dir / "report.md", timings["total"])
    return report


def _write_grids(
    output_dir: Path,
    generated: list[PIL.Image.Image],
    generation_labels: torch.Tensor,
    emoji_generated: list[PIL.Image.Image],
    emoji_prompts: list[str],
    sources: dict[str, list[PIL.Image.Image]],
    reconstructed: dict[str, list[PIL.Image.Image]],
) -> dict[str, str]:
    files = {}
    if generated:
        rows = [
            [image for image, label in zip(generated, generation_labels.tolist()) if label == class_index][
                :GRID_COLUMNS
            ]
            for class_index in range(len(FASHION_MNIST_CLASSES))
        ]
        labelled_grid(rows, list(FASHION_MNIST_CLASSES)).save(output_dir / "generation_grid.png")
        files["generation_grid"] = "generation_grid.png"
    if emoji_generated:
        shown = 4 * GRID_COLUMNS
        _captioned_grid(emoji_generated[:shown], emoji_prompts[:shown], GRID_COLUMNS).save(
            output_dir / "emoji_grid.png"
        )
        files["emoji_grid"] = "emoji_grid.png"
    if reconstructed:
        rows, labels = [], []
        for key, images in reconstructed.items():
            source = key.split("/")[0]
            rows += [sources[source][:GRID_COLUMNS], images[:GRID_COLUMNS]]
            labels += [f"{source} (real)", f"{key.split('/')[1]} decoder"]
        labelled_grid(rows, labels).save(output_dir / "reconstruction_grid.png")
        files["reconstruction_grid"] = "reconstruction_grid.png"
    return files


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _target(value: float, target: float) -> str:
    return f">= {100 * target:.0f}% ({'met' if value >= target else 'not met'})"


def render_markdown(report: EvaluationReport) -> str:
    """``report.md``: the summary table, per-class accuracies, reconstruction, emoji, example answers."""
    lines = [
        f"# Evaluation of `{report.checkpoint or 'pipeline'}`",
        "",
        f"Seed {report.seed}; generated images decoded with the {report.decoder} decoder, "
        f"language-model guidance {report.guidance_scale:g}{describe_sampling(report.image_sampling)}.",
        "",
    ]
    if report.warnings:
        lines += ["**Read the warnings before the figures:**", ""]
        lines += [f"- {warning}" for warning in report.warnings]
        lines.append("")
    lines += [
        "| metric | value | images | target |",
        "|---|---|---|---|",
        f'| understanding accuracy ("{QUESTION}", Fashion-MNIST test) | {_percent(report.understanding_accuracy)} '
        f"| {report.understanding_total} | {_target(report.understanding_accuracy, UNDERSTANDING_TARGET)} |",
        f"| generation correctness (judged by the classifier) | {_percent(report.generation_accuracy)} "
        f"| {report.generation_total} | {_target(report.generation_accuracy, GENERATION_TARGET)} |",
        f"| judge accuracy on real test images (ceiling of generation) | {_percent(report.judge_real_accuracy)} "
        f"| {report.judge_real_total} | |",
    ]
    for key, metrics in report.reconstruction.items():
        source, decoder = key.split("/")
        lines.append(
            f"| reconstruction PSNR / SSIM ({source.replace('_', '-')}, {decoder} decoder) "
            f"| {metrics['psnr']:.2f} dB / {metrics['ssim']:.3f} | {metrics['num_images']} | |"
        )
    if report.emoji_frechet_generated is not None:
        lines += [
            f"| emoji Fréchet distance in judge features, generated vs real test | "
            f"{report.emoji_frechet_generated:.2f} | {report.emoji_generated_total} vs {report.emoji_real_total} | |",
            f"| emoji Fréchet distance in judge features, real train vs real test (reference) | "
            f"{report.emoji_frechet_reference:.2f} | {report.emoji_reference_total} vs "
            f"{report.emoji_real_total} | |",
        ]
    lines += [
        "",
        "## Per class",
        "",
        "| class | understanding | generation correctness | judge on real images |",
        "|---|---|---|---|",
    ]
    for index, name in enumerate(FASHION_MNIST_CLASSES):
        lines.append(
            f"| {name} | {_percent(report.understanding_per_class[index])} "
            f"| {_percent(report.generation_per_class[index])} | {_percent(report.judge_real_per_class[index])} |"
        )
    lines += [
        "",
        "## How it is measured",
        "",
        '- Understanding: greedy answers to "What is this?"; an answer is right when it names the true class '
        "(caption name, official name or plural) and no other.",
        "- Generation: images generated from the Fashion-MNIST captions (five templates in turn), classified by a "
        "small CNN trained on real Fashion-MNIST (`unimm/evaluation/judge.py`). The judge also errs on real "
        "images: its accuracy on them is the practical ceiling of generation correctness.",
        "- Fréchet distances are in the judge's 128-d penultimate features, not Inception features: compare "
        "them with the real-train-vs-real-test reference only. Generated emoji come from the held-out test captions.",
        "",
        "## Understanding examples",
        "",
        "| # | true class | answer | right |",
        "|---|---|---|---|",
    ]
    for example in report.understanding_examples:
        answer = example["answer"].replace("|", "\\|").replace("\n", " ")[:80] or "(empty)"
        lines.append(
            f"| {example['index']} | {example['label']} | {answer} | {'yes' if example['correct'] else 'no'} |"
        )
    lines += ["", "## Images", ""]
    titles = {
        "generation_grid": "Generated Fashion-MNIST, one row per class",
        "emoji_grid": "Generated emoji (test captions)",
        "reconstruction_grid": "Reconstructions (originals above each decoder's output)",
    }
    for key, title in titles.items():
        if key in report.files:
            lines += [f"### {title}", "", f"![{title}]({report.files[key]})", ""]
    timing = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.timings_seconds.items())
    lines += [f"Time: {timing}.", ""]
    return "\n".join(lines)


__all__ = [
    "QUESTION",
    "EvaluationReport",
    "answer_to_class",
    "evaluate_pipeline",
    "evaluate_understanding",
    "generation_prompts",
    "labelled_grid",
    "reconstruction_metrics",
    "render_markdown",
]
