"""The evaluation tasks that generate images: prompt following (judged) and Fréchet distance (in a named
feature space). See :mod:`unimm.evaluation.tasks` for the interface they share with the others."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from .feature_spaces import TEACHER, FeatureSpace, load_feature_space
from .frechet import frechet_distance
from .prompt_judges import PromptJudge, load_prompt_judge
from .task_base import (
    GRID_IMAGES,
    NEUTRAL,
    RIGHT,
    WRONG,
    DatasetTask,
    TaskContext,
    TaskResult,
    annotated_grid,
    check_texts,
    generate_images,
    generated_records,
    mean_or_nan,
    percent,
    write_outputs,
)
from .task_data import TaskData, TaskExample

RIGHT_THRESHOLD = 0.5  # a judge score at or above it is drawn as right
MIN_FRECHET_IMAGES = 4  # two real halves of at least two images each (a covariance needs two)


# --- prompt following -------------------------------------------------------------------------------


@dataclass
class PromptFollowingTask(DatasetTask):
    """Images generated from prompts (``prompts``, else the dataset's captions; ``images_per_prompt``
    each), scored by a judge (:mod:`unimm.evaluation.prompt_judges`); the judge's score on the dataset's
    real images with their captions is the ceiling."""

    name: ClassVar[str] = "prompt_following"
    needs_dataset: ClassVar[bool] = False
    judge: str | None = None
    prompts: list[str] | None = None
    images_per_prompt: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.judge:
            raise ValueError(
                "task prompt_following needs a judge (--judge module:function|FOLDER|fashion_mnist)"
            )
        if self.dataset is None and not self.prompts:
            raise ValueError("task prompt_following needs prompts: --dataset (its captions) or --prompt")
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be at least 1, got {self.images_per_prompt}")

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        # 1. The judge, the prompts and the real images.
        judge = load_prompt_judge(self.judge)
        data = None if self.dataset is None else self.load(pipeline, context, warnings)
        prompts = self._prompts(data)
        check_texts(pipeline, prompts, "prompts", context, warnings)
        real = [] if data is None else data.captioned
        # 2. Generate and judge; the judge on the real images with their captions is the ceiling.
        prompts = [prompt for prompt in prompts for _ in range(self.images_per_prompt)]
        generated = generate_images(pipeline, prompts, context, "prompt following")
        scores = judge.score(generated, prompts)
        ceiling = None
        if real:
            ceiling = mean_or_nan(
                judge.score([item.image for item in real], [item.reference for item in real])
            )
        # 3. Records (with the saved images) and a grid of images, prompts and verdicts.
        records = generated_records(context, self.key, prompts, generated)
        for record, score in zip(records, scores):
            record["score"] = score
        captions = [
            [(prompt, NEUTRAL), (f"judge: {score:.2f}", RIGHT if score >= RIGHT_THRESHOLD else WRONG)]
            for prompt, score in zip(prompts[:GRID_IMAGES], scores)
        ]
        files = write_outputs(context, self.key, records, annotated_grid(generated[:GRID_IMAGES], captions))
        result = self._result(judge, data, mean_or_nan(scores), len(generated), ceiling, len(real), context)
        return replace(result, files=files, warnings=warnings)

    def _prompts(self, data: TaskData | None) -> list[str]:
        if self.prompts:
            return list(self.prompts)[: self.limit]
        prompts = [example.reference for example in data.examples if example.reference]
        if not prompts:
            raise ValueError(f"prompt_following: no row of {data.description} has a caption to generate from")
        return prompts

    def _result(
        self,
        judge: PromptJudge,
        data: TaskData | None,
        accuracy: float,
        num_images: int,
        ceiling: float | None,
        num_real: int,
        context: TaskContext,
    ) -> TaskResult:
        table = [("judged prompt following (mean judge score)", percent(accuracy), str(num_images))]
        if ceiling is not None:
            table.append(
                ("judge on real images with their captions (ceiling)", percent(ceiling), str(num_real))
            )
        source = "the prompts given" if self.prompts else "the dataset's captions"
        where = "" if data is None else f" ({data.description})"
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{num_images} images generated from {source}{where}; judge: {judge.name}",
            metrics={
                "accuracy": accuracy,
                "num_images": num_images,
                "num_prompts": num_images // self.images_per_prompt,
                "judge": judge.name,
                "judge_real_accuracy": ceiling,
                "judge_real_total": num_real,
            },
            table=table,
            notes=[
                f"Judge: {judge.rule}. The score is the mean over images (for a right/wrong judge, the share "
                "right). The judge also errs on real images: its score on them is the practical ceiling.",
                f"Image i is generated with seed {context.seed} + i, the {context.decoder} decoder, guidance "
                f"{context.guidance_scale:g}.",
            ],
            summary=f"prompt following {percent(accuracy)} by {judge.name}"
            + ("" if ceiling is None else f" (ceiling {percent(ceiling)})")
            + f" ({num_images} images)",
        )


# --- Fréchet distance -------------------------------------------------------------------------------


@dataclass
class FrechetTask(DatasetTask):
    """Fréchet distance in a named feature space (:mod:`unimm.evaluation.feature_spaces`) between images
    generated from the captions of one half of the real images (or from ``prompts``) and the other half;
    the distance between the two real halves is the reference (a perfect generator's score with as many
    images). ``judge`` serves ``features="judge"``."""

    name: ClassVar[str] = "frechet"
    features: str = TEACHER
    judge: str | None = None
    prompts: list[str] | None = None

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        data = self.load(pipeline, context, warnings)
        # 1. Two disjoint halves of the real images, drawn by the seed; prompts for the first.
        first, second = self._halves(data, context.seed)
        prompts = self._prompts(first, data)
        check_texts(pipeline, prompts, "prompts", context, warnings)
        # 2. Generate; features of the three sets; both distances against the second half.
        space = load_feature_space(
            self.features, pipeline, load_prompt_judge(self.judge) if self.judge else None
        )
        generated = generate_images(pipeline, prompts, context, "frechet generation")
        first_features = space.features([example.image for example in first])
        second_features = space.features([example.image for example in second])
        distances = {
            "frechet_generated": frechet_distance(space.features(generated), second_features),
            "frechet_reference": frechet_distance(first_features, second_features),
        }
        dimension = second_features.shape[1]
        if dimension > len(second):
            context.warn(
                warnings,
                f"the features have {dimension} dimensions and a set only {len(second)} images: the covariances "
                "are rank-deficient and the distances large; compare them with each other only",
            )
        # 3. Records (with the saved images) and a grid of the generated images.
        records = generated_records(context, self.key, prompts, generated)
        grid = annotated_grid(generated[:GRID_IMAGES], [[(prompt, NEUTRAL)] for prompt in prompts])
        files = write_outputs(context, self.key, records, grid)
        counts = {"num_generated": len(generated), "num_real_reference": len(first), "num_real": len(second)}
        result = self._result(space, data, distances | counts | {"feature_dim": dimension})
        return replace(result, files=files, warnings=warnings)

    def _halves(self, data: TaskData, seed: int) -> tuple[list[TaskExample], list[TaskExample]]:
        real = data.with_images
        if len(real) < MIN_FRECHET_IMAGES:
            raise ValueError(
                f"frechet: needs at least {MIN_FRECHET_IMAGES} images, {data.description} has {len(real)}"
            )
        order = np.random.default_rng(seed).permutation(len(real)).tolist()
        half = len(real) // 2
        first = [real[index] for index in sorted(order[:half])]
        return first, [real[index] for index in sorted(order[half : 2 * half])]

    def _prompts(self, first: list[TaskExample], data: TaskData) -> list[str]:
        """The first half's captions, or the prompts given, cycled to the half's size."""
        if self.prompts:
            return [self.prompts[index % len(self.prompts)] for index in range(len(first))]
        prompts = [example.reference for example in first if example.reference]
        if len(prompts) < 2:  # a covariance needs two samples
            raise ValueError(
                f"frechet: {data.description} has too few captions to generate from; give --prompt"
            )
        return prompts

    def _result(self, space: FeatureSpace, data: TaskData, metrics: dict[str, Any]) -> TaskResult:
        where = f"Fréchet distance in {space.name}"
        generated, reference = metrics["frechet_generated"], metrics["frechet_reference"]
        real = metrics["num_real"]
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{data.description}; Fréchet distance in {space.description}",
            metrics=metrics | {"feature_space": space.name, "feature_space_description": space.description},
            table=[
                (f"{where}, generated vs real", f"{generated:.3f}", f"{metrics['num_generated']} vs {real}"),
                (
                    f"{where}, real vs real (reference)",
                    f"{reference:.3f}",
                    f"{metrics['num_real_reference']} vs {real}",
                ),
            ],
            notes=[
                "The real images are split in two disjoint halves by the seed; images are generated from the "
                "first half's captions and compared with the second half, as the first half itself is.",
                "The number depends on the feature space and the number of images: compare it with the "
                "reference only. It is not an FID (no Inception features).",
            ],
            summary=f"{where} {generated:.3f} (real-vs-real reference {reference:.3f})",
        )


__all__ = ["FrechetTask", "PromptFollowingTask"]
