"""The demo report (:mod:`unimm.evaluation.report`) as an evaluation task, the default of ``unimm eval``.

Before it runs, it checks what the report cannot tell by itself: whether the checkpoint's model card lists
the demo data, and whether the checkpoint's tokenizer knows the words of the question and the captions. A
checkpoint trained on other data scores near zero here, and the report says why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from unimm.data.demo_datasets import FASHION_MNIST_TEMPLATES

from .report import QUESTION, EvaluationReport, evaluate_pipeline, generation_prompts
from .task_base import EvalTask, TaskContext, TaskResult, check_texts, percent
from .task_data import training_data_warning

DEMO_TASK_DATASETS = ("fashion_mnist", "emoji")  # what the report reads, checked against the model card


@dataclass
class DemoTask(EvalTask):
    """The demo report as an evaluation task (``unimm eval --task demo``, the default): the options of
    :func:`evaluate_pipeline`; the run's context gives the seed, batch size and generation settings.

    It writes its own ``report.md``, ``report.json`` and grids: straight into the output folder when it runs
    alone (as ``unimm eval`` always did), else into its own subfolder."""

    name: ClassVar[str] = "demo"
    writes_report: ClassVar[bool] = True
    num_understanding: int = 1000
    images_per_class: int = 100
    num_judge_real: int = 10000
    num_reconstruction: int = 500
    num_diffusion_reconstruction: int = 50
    num_emoji: int = 204
    max_new_tokens: int = 16
    label: str | None = None

    def __post_init__(self) -> None:
        counts = {name: value for name, value in dataclasses.asdict(self).items() if name.startswith("num_")}
        counts["images_per_class"] = self.images_per_class
        negative = [f"--{name.replace('_', '-')}={value}" for name, value in counts.items() if value < 0]
        if negative:
            raise ValueError(f"counts must be >= 0, got {', '.join(negative)}")

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        # A checkpoint trained on other data, or whose tokenizer lacks the words, scores near zero here:
        # say so before the figures.
        warnings: list[str] = []
        checkpoint = context.checkpoint_folder(pipeline)
        if checkpoint is not None:
            for dataset in DEMO_TASK_DATASETS:
                context.warn(warnings, training_data_warning(checkpoint, dataset))
        prompts, _ = generation_prompts(len(FASHION_MNIST_TEMPLATES))
        check_texts(pipeline, [QUESTION, *prompts], "question and captions", context, warnings)
        folder = context.task_dir(self.key)
        options = {name: value for name, value in dataclasses.asdict(self).items() if name != "label"}
        report = evaluate_pipeline(
            pipeline,
            folder,
            **options,
            decoder=context.decoder,
            guidance_scale=context.guidance_scale,
            num_inference_steps=context.num_inference_steps,
            seed=context.seed,
            batch_size=context.batch_size,
            checkpoint_name=context.checkpoint,
            warnings=warnings,
        )
        return TaskResult(
            task=self.name,
            label=self.key,
            description="the demo data: Fashion-MNIST and emoji test splits (see its own report.md)",
            metrics=report.to_dict(),
            table=_summary_rows(report),
            warnings=warnings,
            files={name: context.relative(folder / path) for name, path in report.files.items()},
            summary=f"understanding {percent(report.understanding_accuracy)} ({report.understanding_total} "
            f"images), generation correctness {percent(report.generation_accuracy)} (judge ceiling "
            f"{percent(report.judge_real_accuracy)})",
        )


def _summary_rows(report: EvaluationReport) -> list[tuple[str, str, str]]:
    """The main figures as ``(metric, value, images)`` rows of the combined report."""
    rows = [
        (
            f'understanding accuracy ("{QUESTION}")',
            percent(report.understanding_accuracy),
            str(report.understanding_total),
        ),
        (
            "generation correctness (judged)",
            percent(report.generation_accuracy),
            str(report.generation_total),
        ),
        (
            "judge on real test images (ceiling)",
            percent(report.judge_real_accuracy),
            str(report.judge_real_total),
        ),
    ]
    for key, metrics in report.reconstruction.items():
        rows.append(
            (
                f"reconstruction PSNR / SSIM ({key})",
                f"{metrics['psnr']:.2f} dB / {metrics['ssim']:.3f}",
                str(metrics["num_images"]),
            )
        )
    if report.emoji_frechet_generated is not None:
        rows.append(
            (
                "emoji Fréchet distance in judge features, generated vs real (reference)",
                f"{report.emoji_frechet_generated:.2f} ({report.emoji_frechet_reference:.2f})",
                str(report.emoji_generated_total),
            )
        )
    return rows


__all__ = ["DemoTask"]
