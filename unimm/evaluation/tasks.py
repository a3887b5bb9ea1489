"""Evaluation tasks over any checkpoint and any data: understanding, reconstruction, prompt following,
Fréchet distance; the demo report (:class:`unimm.evaluation.report.DemoTask`) is one more.

    from unimm.evaluation import TaskContext, UnderstandingTask, run_tasks

    task = UnderstandingTask(dataset="data/shapes", question="What colour is this?", limit=200)
    run_tasks(pipeline, [task], TaskContext(output_dir="outputs/eval-shapes", checkpoint="checkpoints/mine"))

Each task is a dataclass of its options; ``task.run(pipeline, context)`` returns a
:class:`~unimm.evaluation.task_base.TaskResult` and writes its grids and ``examples.jsonl`` (one record
per example) under ``context.task_dir(task.key)``. Datasets are specs (:mod:`unimm.data.spec`): a demo
name, a path or a mapping; see :mod:`unimm.evaluation.task_data` for the split and rows a task reads.
Before running, each task warns (log and report) when words of its questions or prompts are unknown to
the checkpoint's tokenizer, and when its dataset is not in the checkpoint's model card.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from .answers import score_answer
from .demo_task import DemoTask
from .generation_tasks import FrechetTask, PromptFollowingTask
from .metrics import codebook_counts, codebook_perplexity, codebook_usage, psnr, ssim
from .report import labelled_grid
from .task_base import (
    GRID_COLUMNS,
    GRID_IMAGES,
    NEUTRAL,
    RIGHT,
    WRONG,
    DatasetTask,
    EvalTask,
    TaskContext,
    TaskResult,
    annotated_grid,
    batches,
    check_texts,
    image_paths,
    mean_or_nan,
    percent,
    write_outputs,
)
from .task_data import TaskData, TaskExample

DEFAULT_QUESTION = "What is this?"
SCORE_NAMES = ("exact_match", "contains", "f1")  # of unimm.evaluation.answers.score_answer
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_NUM_DIFFUSION = 50
SSIM_WINDOW = 11  # pixels: images smaller than the SSIM window get no SSIM


# --- understanding ----------------------------------------------------------------------------------


@dataclass
class UnderstandingTask(DatasetTask):
    """Each image asked ``question`` (a conversation row: its own question, unless ``question`` is given),
    greedy answers scored against the reference by exact match, contains and per-word F1
    (:mod:`unimm.evaluation.answers`)."""

    name: ClassVar[str] = "understanding"
    question: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        # 1. Rows with an image and a reference; the words the model would have to read and write.
        data = self.load(pipeline, context, warnings)
        examples = data.captioned
        if not examples:
            raise ValueError(f"understanding: no row of {data.description} has an image and a reference text")
        questions = [self.question or example.question or DEFAULT_QUESTION for example in examples]
        references = [example.reference for example in examples]
        check_texts(pipeline, questions, "questions", context, warnings)
        check_texts(
            pipeline, references, "reference answers", context, warnings, "the model cannot write them"
        )
        # 2. Greedy answers and their scores.
        answers = self._answers(pipeline, examples, questions, context)
        scores = [score_answer(answer, reference) for answer, reference in zip(answers, references)]
        # 3. Records and a grid: image, answer (green when it contains the reference), reference.
        paths = image_paths(examples, context, self.key)
        records = [
            {"index": example.index, "image": path, "question": question, "reference": example.reference}
            | {"answer": answer, **score}
            for example, path, question, answer, score in zip(examples, paths, questions, answers, scores)
        ]
        captions = [
            [
                (f"A: {answer or '(empty)'}", RIGHT if score["contains"] else WRONG),
                (f"R: {reference}", NEUTRAL),
            ]
            for answer, score, reference in zip(answers[:GRID_IMAGES], scores, references)
        ]
        grid = annotated_grid([example.image for example in examples[:GRID_IMAGES]], captions)
        files = write_outputs(context, self.key, records, grid)
        metrics = {name: mean_or_nan([score[name] for score in scores]) for name in SCORE_NAMES}
        metrics |= {"num_examples": len(examples), "num_skipped": len(data.examples) - len(examples)}
        return replace(self._result(data, metrics), files=files, warnings=warnings)

    def _answers(
        self, pipeline: Any, examples: list[TaskExample], questions: list[str], context: TaskContext
    ) -> list[str]:
        """Greedy answers, ``batch_size`` conversations per call."""
        answers: list[str] = []
        for start, batch in batches(examples, context.batch_size, "understanding"):
            output = pipeline.chat(
                questions[start : start + len(batch)],
                images=[example.image for example in batch],
                max_new_tokens=self.max_new_tokens,
                seed=context.seed,
            )
            answers.extend(output.texts)
        return answers

    def _result(self, data: TaskData, metrics: dict[str, Any]) -> TaskResult:
        count = str(metrics["num_examples"])
        asked = f'"{self.question}"' if self.question else f'each row\'s question, else "{DEFAULT_QUESTION}"'
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{data.description}; asked {asked}",
            metrics=metrics | {"question": self.question},
            table=[
                ("exact match", percent(metrics["exact_match"]), count),
                (
                    "contains (reference in answer or answer in reference)",
                    percent(metrics["contains"]),
                    count,
                ),
                ("per-word F1", f"{metrics['f1']:.3f}", count),
            ],
            notes=[
                "Answers are greedy; answer and reference are compared after lower-casing and deleting "
                "punctuation and the articles a/an/the (SQuAD's normalisation).",
                "Contains: one side occurs in the other as whole words. F1: SQuAD's per-word F1.",
                f"Rows without an image or a reference text are left out ({metrics['num_skipped']}).",
            ],
            summary=f"exact match {percent(metrics['exact_match'])}, contains {percent(metrics['contains'])}, "
            f"F1 {metrics['f1']:.3f} ({count} images)",
        )


# --- reconstruction ---------------------------------------------------------------------------------


def _pixels(image: PIL.Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image as RGB floats (1, 3, H, W) in [0, 1], resized (bicubic) to ``size`` (W, H) when given."""
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def image_pair_metrics(
    original: PIL.Image.Image, reconstruction: PIL.Image.Image
) -> tuple[float, float | None]:
    """PSNR (dB) and SSIM of ``reconstruction`` against ``original`` (resized to the reconstruction's size
    when they differ); SSIM is ``None`` for images smaller than its window."""
    decoded = _pixels(reconstruction)
    target = _pixels(original, reconstruction.size)
    structural = float(ssim(decoded, target)) if min(decoded.shape[-2:]) >= SSIM_WINDOW else None
    return float(psnr(decoded, target)), structural


@dataclass
class ReconstructionTask(DatasetTask):
    """Encode -> decode of every image with the pixel decoder and, on the first
    ``num_diffusion_reconstruction``, the diffusion decoder (when the checkpoint has one): PSNR, SSIM,
    and how much of the codebook the images use."""

    name: ClassVar[str] = "reconstruction"
    num_diffusion_reconstruction: int = DEFAULT_NUM_DIFFUSION

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        data = self.load(pipeline, context, warnings)
        examples = data.with_images
        if not examples:
            raise ValueError(f"reconstruction: no row of {data.description} has an image")
        # 1. Encode -> decode: every image with the pixel decoder, a subset with the diffusion decoder.
        originals = [example.image for example in examples]
        subsets = {"pixel": originals}
        if pipeline.detokenizer is not None and self.num_diffusion_reconstruction > 0:
            subsets["diffusion"] = originals[: self.num_diffusion_reconstruction]
        decoded, codes = {}, []
        for decoder, images in subsets.items():
            decoded[decoder], grids = self._reconstruct(pipeline, images, decoder, context)
            codes = codes or grids  # both decoders read the same codes
        # 2. PSNR/SSIM per image and on average; codebook usage of the codes.
        per_image = {
            decoder: list(map(image_pair_metrics, subsets[decoder], decoded[decoder])) for decoder in decoded
        }
        metrics: dict[str, Any] = {decoder: _averages(values) for decoder, values in per_image.items()}
        size = pipeline.visual_tokenizer.config.codebook_size
        counts = codebook_counts(torch.cat([grid.flatten() for grid in codes]), size)
        metrics["codebook"] = {
            "usage": codebook_usage(counts),
            "perplexity": codebook_perplexity(counts),
            "size": size,
            "num_codes": int(counts.sum()),
        }
        # 3. Records and a grid: real images above each decoder's.
        paths = image_paths(examples, context, self.key)
        records = []
        for position, (example, path) in enumerate(zip(examples, paths)):
            records.append({"index": example.index, "image": path})
            for decoder, values in per_image.items():
                if position < len(values):
                    records[-1] |= {
                        f"{decoder}_psnr": values[position][0],
                        f"{decoder}_ssim": values[position][1],
                    }
        rows = [originals[:GRID_COLUMNS], *(images[:GRID_COLUMNS] for images in decoded.values())]
        grid = labelled_grid(rows, ["real", *(f"{decoder} decoder" for decoder in decoded)])
        files = write_outputs(context, self.key, records, grid)
        return replace(self._result(data, metrics, list(decoded)), files=files, warnings=warnings)

    def _reconstruct(
        self, pipeline: Any, images: list[PIL.Image.Image], decoder: str, context: TaskContext
    ) -> tuple[list[PIL.Image.Image], list[torch.Tensor]]:
        """Reconstructions and code grids (h, w), ``batch_size`` images per call."""
        decoded, grids = [], []
        for _, batch in batches(images, context.batch_size, f"reconstruction ({decoder})"):
            output = pipeline.reconstruct(
                list(batch),
                decoder=decoder,
                num_inference_steps=context.num_inference_steps,
                seed=context.seed,
            )
            decoded += output.images
            grids += output.image_token_ids
        return decoded, grids

    def _result(self, data: TaskData, metrics: dict[str, Any], decoders: list[str]) -> TaskResult:
        table = []
        for decoder in decoders:
            values = metrics[decoder]
            structural = "n/a" if values["ssim"] is None else f"{values['ssim']:.3f}"
            table.append(
                (
                    f"PSNR / SSIM, {decoder} decoder",
                    f"{values['psnr']:.2f} dB / {structural}",
                    str(values["num_images"]),
                )
            )
        codebook = metrics["codebook"]
        table.append(
            (
                f"codebook usage / perplexity (of {codebook['size']} entries)",
                f"{percent(codebook['usage'])} / {codebook['perplexity']:.1f}",
                str(metrics["pixel"]["num_images"]),
            )
        )
        return TaskResult(
            task=self.name,
            label=self.key,
            description=data.description,
            metrics=metrics,
            table=table,
            notes=[
                "Each image is encoded to codes by the visual tokenizer and decoded again; PSNR and SSIM compare "
                "the result with the original, resized (bicubic) to the decoded size when they differ.",
                "Codebook usage: the share of codebook entries the images' codes use at least once; "
                "perplexity: exp(entropy) of the codes' distribution.",
            ],
            summary=f"PSNR {metrics['pixel']['psnr']:.2f} dB (pixel decoder), codebook usage "
            f"{percent(codebook['usage'])} ({metrics['pixel']['num_images']} images)",
        )


def _averages(per_image: list[tuple[float, float | None]]) -> dict[str, Any]:
    """Mean PSNR and SSIM (``None`` when no image was large enough for SSIM) and the image count."""
    ssims = [value for _, value in per_image if value is not None]
    return {
        "psnr": mean_or_nan([value for value, _ in per_image]),
        "ssim": mean_or_nan(ssims) if ssims else None,
        "num_images": len(per_image),
    }


TASKS: dict[str, type[EvalTask]] = {
    "understanding": UnderstandingTask,
    "reconstruction": ReconstructionTask,
    "prompt_following": PromptFollowingTask,
    "frechet": FrechetTask,
    DemoTask.name: DemoTask,
    "fashion_mnist": DemoTask,  # the demo report is the Fashion-MNIST (and emoji) report
}


__all__ = [
    "DEFAULT_QUESTION",
    "TASKS",
    "FrechetTask",
    "PromptFollowingTask",
    "ReconstructionTask",
    "UnderstandingTask",
    "image_pair_metrics",
]
