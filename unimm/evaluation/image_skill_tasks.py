"""The unified skills' evaluation tasks whose answer is an image of a given kind: edits (image in, image out)
and wide or tall compositions. The options every skill task has (classes, subject, judge) are
:mod:`unimm.evaluation.skill_base`'s; :data:`unimm.evaluation.skill_tasks.SKILL_TASKS` lists these tasks with the
others."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import PIL.Image

from unimm.data.skills import (
    DARKER,
    DEFAULT_DARKER_FACTOR,
    EDITS,
    INVERT,
    LAYOUTS,
    MIRROR,
    RELABEL,
    TALL,
    WIDE,
    edit_pixels,
)

from .prompt_judges import PromptJudge, load_prompt_judge
from .report import labelled_grid
from .skill_base import (
    CLASS_FIELDS,
    PAIR_FIELDS,
    SkillDatasetTask,
    SkillTask,
    default_image_size,
    fill,
    first_image,
    letterboxed,
    phrase_template,
    records_of,
    reply_segments,
    saved_paths,
    scores_of,
    share,
    user,
    verdict,
)
from .task_base import (
    GRID_COLUMNS,
    GRID_IMAGES,
    NEUTRAL,
    TaskContext,
    TaskResult,
    annotated_grid,
    batches,
    check_texts,
    mean_or_nan,
    percent,
    write_outputs,
)
from .tasks import image_pair_metrics

# The skill templates' plainest forms (unimm.data.skills DEFAULT_EDIT_INSTRUCTIONS, DEFAULT_COMPOSITION_PROMPTS).
DEFAULT_INSTRUCTIONS = {
    MIRROR: "mirror it.",
    DARKER: "make it darker.",
    INVERT: "invert the colours.",
    RELABEL: "turn it into {subject}.",
}
DEFAULT_COMPOSITION_PROMPTS = {WIDE: "{subject_1} next to {subject_2}", TALL: "{subject_1} above {subject_2}"}
DEFAULT_NUM_PER_LAYOUT = 50  # compositions per layout
# Issue 26's aim: an edit's PSNR within 3 dB of the tokenizer's own reconstruction of the exact result.
EDIT_TARGET_DB = 3.0


# --- edits ---------------------------------------------------------------------------------------


def pixel_edit_metrics(
    exact: Sequence[PIL.Image.Image],
    outputs: Sequence[PIL.Image.Image],
    reconstructions: Sequence[PIL.Image.Image],
    inputs: Sequence[PIL.Image.Image],
    max_gap_db: float = EDIT_TARGET_DB,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An exact edit's scores: mean PSNR/SSIM of the model's outputs against the exact results, next to the
    visual tokenizer's reconstructions of the exact results (the best a model writing codes can do) and the
    unedited inputs (a model that does nothing); within target when the output's mean PSNR is at most
    ``max_gap_db`` below the reconstructions'. Also per image."""
    per_image = []
    for target, output, reconstruction, source in zip(exact, outputs, reconstructions, inputs):
        output_psnr, output_ssim = image_pair_metrics(target, output)
        reconstruction_psnr, _ = image_pair_metrics(target, reconstruction)
        unedited_psnr, _ = image_pair_metrics(target, source)
        per_image.append(
            {"psnr": output_psnr, "ssim": output_ssim, "reconstruction_psnr": reconstruction_psnr}
            | {"unedited_psnr": unedited_psnr, "within": output_psnr >= reconstruction_psnr - max_gap_db}
        )
    psnr, reconstruction = (
        mean_or_nan([item[key] for item in per_image]) for key in ("psnr", "reconstruction_psnr")
    )
    ssims = [item["ssim"] for item in per_image if item["ssim"] is not None]
    metrics = {
        "psnr": psnr,
        "ssim": mean_or_nan(ssims) if ssims else None,
        "reconstruction_psnr": reconstruction,
        "unedited_psnr": mean_or_nan([item["unedited_psnr"] for item in per_image]),
        "gap_db": reconstruction - psnr,
        "within_target": bool(reconstruction - psnr <= max_gap_db),
        "share_within": share([item["within"] for item in per_image]),
        "num_images": len(per_image),
    }
    return metrics, per_image


@dataclass
class EditTask(SkillDatasetTask):
    """Held-out images edited on instruction (image in, image out). ``mirror``, ``darker`` and ``invert`` are
    scored by PSNR against the exact transform (:func:`unimm.data.skills.edit_pixels`), next to the PSNR of the
    visual tokenizer's own reconstruction of the exact result; ``relabel`` ("turn it into a sandal", another
    class drawn by the seed) by the judge."""

    name: ClassVar[str] = "edit"
    ops: list[str] = field(default_factory=lambda: list(EDITS))
    instructions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INSTRUCTIONS))
    darker_factor: float = DEFAULT_DARKER_FACTOR
    max_gap_db: float = EDIT_TARGET_DB

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [op for op in self.ops or [] if op not in EDITS]
        if not self.ops or unknown:
            raise ValueError(f"edit: ops must be some of {list(EDITS)}, got {self.ops}")
        missing = [op for op in self.ops if op not in self.instructions]
        if missing:
            raise ValueError(f"edit: no instruction for {missing}; give instructions: {{op: text}}")
        if not 0.0 < self.darker_factor < 1.0:
            raise ValueError(f"edit: darker_factor must be in (0, 1), got {self.darker_factor}")
        # A relabel instruction names the class it turns the image into; the exact edits name none.
        self.templates = {
            op: phrase_template(self.instructions[op], f"instructions.{op}", CLASS_FIELDS, CLASS_FIELDS)
            if op == RELABEL
            else phrase_template(self.instructions[op], f"instructions.{op}", ())
            for op in self.ops
        }

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        examples, description = self.examples(pipeline, context, warnings)
        inputs = [example.image.convert("RGB") for example in examples]
        # 1. Every op's instructions (relabel: into another class than the caption's), checked together.
        names, rng = self.class_names, self.rng(context)
        fields = {
            op: [
                names.fields(names.other(names.named(e.reference), rng)) if op == RELABEL else {}
                for e in examples
            ]
            for op in self.ops
        }
        texts = {op: [fill(self.templates[op], values, rng) for values in fields[op]] for op in self.ops}
        check_texts(
            pipeline, [text for op in self.ops for text in texts[op]], "instructions", context, warnings
        )
        # 2. Each op: the edited images and their scores; records and grid rows.
        judge, size = load_prompt_judge(self.judge), default_image_size(pipeline)
        metrics: dict[str, Any] = {}
        records: list[dict[str, Any]] = []
        rows, row_labels = [inputs[:GRID_COLUMNS]], ["input"]
        for op in self.ops:
            conversations = [[user(text, image)] for text, image in zip(texts[op], inputs)]
            replies = reply_segments(pipeline, conversations, context, "image", op)
            outputs = [first_image(segments, size) for segments in replies]
            if op == RELABEL:
                rights = scores_of(judge, outputs, [values["subject"] for values in fields[op]])
                metrics[op] = {"right": share(rights), "num_images": len(rights)}
                per_image = [
                    {"into": values["label"], "right": right} for values, right in zip(fields[op], rights)
                ]
                rows.append(outputs[:GRID_COLUMNS])
                row_labels.append("turned into")
            else:
                exact = [
                    PIL.Image.fromarray(edit_pixels(np.asarray(i), op, self.darker_factor)) for i in inputs
                ]
                reconstructions = self._reconstruct(pipeline, exact, context)
                metrics[op], per_image = pixel_edit_metrics(
                    exact, outputs, reconstructions, inputs, self.max_gap_db
                )
                rows += [exact[:GRID_COLUMNS], outputs[:GRID_COLUMNS], reconstructions[:GRID_COLUMNS]]
                row_labels += [f"{op}: exact", f"{op}: model", f"{op}: tokenizer"]
            paths = saved_paths(context, self.key, op, outputs)
            records += [
                {"index": example.index, "op": op, "instruction": text, "image": path} | scores
                for example, text, path, scores in zip(examples, texts[op], paths, per_image)
            ]
        files = write_outputs(context, self.key, records, labelled_grid(rows, row_labels))
        return replace(self._result(metrics, description, len(examples)), files=files, warnings=warnings)

    def _reconstruct(
        self, pipeline: Any, images: list[PIL.Image.Image], context: TaskContext
    ) -> list[PIL.Image.Image]:
        decoded: list[PIL.Image.Image] = []
        for _, batch in batches(images, context.batch_size, "edit reconstruction"):
            output = pipeline.reconstruct(
                list(batch),
                decoder=context.decoder,
                num_inference_steps=context.num_inference_steps,
                seed=context.seed,
            )
            decoded += output.images
        return decoded

    def _result(self, metrics: dict[str, Any], description: str, num_images: int) -> TaskResult:
        table, summary = [], []
        for op, values in metrics.items():
            count = str(values["num_images"])
            if op == RELABEL:
                table.append((f'"{self.instructions[op]}": judged right', percent(values["right"]), count))
                summary.append(f"{op} {percent(values['right'])}")
                continue
            met = "within" if values["within_target"] else "not within"
            table += [
                (
                    f'"{self.instructions[op]}": PSNR vs the exact result (tokenizer\'s reconstruction of it)',
                    f"{values['psnr']:.2f} dB ({values['reconstruction_psnr']:.2f} dB): {met} {self.max_gap_db:g} dB",
                    count,
                ),
                (
                    f"{op}: unedited input vs the exact result (a model that does nothing)",
                    f"{values['unedited_psnr']:.2f} dB",
                    count,
                ),
            ]
            summary.append(f"{op} {values['psnr']:.1f}/{values['reconstruction_psnr']:.1f} dB")
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{description}; each image edited by {', '.join(self.ops)}; judge: {self.judge}",
            metrics=metrics
            | {"judge": self.judge, "darker_factor": self.darker_factor, "max_gap_db": self.max_gap_db},
            table=table,
            notes=[
                f"Exact results: mirror left-right, every value times {self.darker_factor:g} (darker), 255 minus the "
                "value (invert), as unimm.data.skills.edit_pixels makes the training targets.",
                "The tokenizer's reconstruction of the exact result (with the run's decoder) is the best a model "
                f"writing image codes can reach; the target is a mean PSNR at most {self.max_gap_db:g} dB below it.",
            ],
            summary=f"{', '.join(summary)} ({num_images} images each; PSNR model/tokenizer)",
        )


# --- compositions --------------------------------------------------------------------------------


def _mark(right: bool) -> str:
    return "ok" if right else "x"


def halves(image: PIL.Image.Image, layout: str) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The left and right (``wide``) or top and bottom (``tall``) halves of a composition."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    width, height = image.size
    if layout == WIDE:
        return image.crop((0, 0, width // 2, height)), image.crop((width // 2, 0, width, height))
    return image.crop((0, 0, width, height // 2)), image.crop((0, height // 2, width, height))


@dataclass
class CompositionTask(SkillTask):
    """Two classes in one image, side by side (``wide``: twice the default width) or stacked (``tall``), from
    a prompt naming both in order; each half judged, right when both are."""

    name: ClassVar[str] = "composition"
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COMPOSITION_PROMPTS))
    num_per_layout: int = DEFAULT_NUM_PER_LAYOUT

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layouts or any(layout not in LAYOUTS for layout in self.layouts):
            raise ValueError(f"composition: layouts must be some of {list(LAYOUTS)}, got {self.layouts}")
        if self.num_per_layout < 1:
            raise ValueError(f"num_per_layout must be at least 1, got {self.num_per_layout}")
        first, second = ([f"{name}_{index}" for name in CLASS_FIELDS] for index in (1, 2))
        missing = [layout for layout in self.layouts if layout not in self.prompts]
        if missing:
            raise ValueError(f"composition: no prompt for {missing}; give prompts: {{layout: text}}")
        self.templates = {
            layout: phrase_template(self.prompts[layout], f"prompts.{layout}", PAIR_FIELDS, first, second)
            for layout in self.layouts
        }

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        width, height = default_image_size(pipeline)
        sizes = {WIDE: (height, 2 * width), TALL: (2 * height, width)}
        judge, rng = load_prompt_judge(self.judge), self.rng(context)
        metrics: dict[str, Any] = {}
        records: list[dict[str, Any]] = []
        tiles, captions = [], []
        for layout in self.layouts:
            try:  # the layout must fit the model's grid
                pipeline.image_grid(*sizes[layout])
            except ValueError as error:
                context.warn(warnings, f"composition: cannot ask this model for {layout} images ({error})")
                continue
            metrics[layout], layout_records, images = self._layout(
                pipeline, context, layout, sizes[layout], judge, rng, warnings
            )
            records += layout_records
            shown = GRID_IMAGES // len(self.layouts)
            tiles += [letterboxed(image) for image in images[:shown]]
            captions += [
                [
                    (r["prompt"], NEUTRAL),
                    verdict(r["right"], f"{_mark(r['first_right'])} / {_mark(r['second_right'])}"),
                ]
                for r in layout_records[:shown]
            ]
        total = sum(value["num_images"] for value in metrics.values())
        both = sum(value["both_right"] * value["num_images"] for value in metrics.values())
        metrics["both_right"] = both / total if total else math.nan
        files = write_outputs(context, self.key, records, annotated_grid(tiles, captions))
        return replace(self._result(metrics), files=files, warnings=warnings)

    def _layout(
        self,
        pipeline: Any,
        context: TaskContext,
        layout: str,
        size: tuple[int, int],
        judge: PromptJudge,
        rng: random.Random,
        warnings: list[str],
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[PIL.Image.Image]]:
        """One layout's metrics, records and images."""
        # 1. Ordered pairs of two classes and their prompts.
        names = self.class_names
        pairs = [(i % len(names), names.other(i % len(names), rng)) for i in range(self.num_per_layout)]
        prompts = [fill(self.templates[layout], names.pair_fields(*pair), rng) for pair in pairs]
        check_texts(pipeline, prompts, f"{layout} prompts", context, warnings)
        # 2. Generate at the layout's size; judge each half against its class.
        images = self._generate(pipeline, prompts, size, context, layout)
        parts = [part for image in images for part in halves(image, layout)]
        scores = scores_of(judge, parts, [names.fields(index)["subject"] for pair in pairs for index in pair])
        firsts, seconds = scores[0::2], scores[1::2]
        rights = [first and second for first, second in zip(firsts, seconds)]
        metrics = {
            "both_right": share(rights),
            "first_right": share(firsts),
            "second_right": share(seconds),
            "num_images": len(images),
            "height": size[0],
            "width": size[1],
        }
        records = records_of(
            index=list(range(len(prompts))),
            layout=[layout] * len(prompts),
            prompt=prompts,
            image=saved_paths(context, self.key, layout, images),
            first_right=firsts,
            second_right=seconds,
            right=rights,
        )
        return metrics, records, images

    def _generate(
        self, pipeline: Any, prompts: list[str], size: tuple[int, int], context: TaskContext, layout: str
    ) -> list[PIL.Image.Image]:
        """Images of ``size`` (height, width); prompt ``i`` seeded with ``context.seed + i``."""
        images: list[PIL.Image.Image] = []
        for start, batch in batches(prompts, context.batch_size, f"composition ({layout})"):
            output = pipeline.generate_images(
                list(batch),
                height=size[0],
                width=size[1],
                guidance_scale=context.guidance_scale,
                seed=[context.seed + start + offset for offset in range(len(batch))],
                decoder=context.decoder,
                num_inference_steps=context.num_inference_steps,
            )
            images.extend(output.images)
        return images

    def _result(self, metrics: dict[str, Any]) -> TaskResult:
        table = []
        for layout in self.layouts:
            if layout not in metrics:
                table.append(
                    (f'{layout}: "{self.prompts[layout]}"', "n/a (the model's grid is too small)", "0")
                )
                continue
            values, count = metrics[layout], str(metrics[layout]["num_images"])
            size = f"{values['width']}x{values['height']} px"
            table += [
                (
                    f'{layout} ({size}) "{self.prompts[layout]}": both halves judged right',
                    percent(values["both_right"]),
                    count,
                ),
                (
                    f"{layout}: first / second half judged right",
                    f"{percent(values['first_right'])} / {percent(values['second_right'])}",
                    count,
                ),
            ]
        total = sum(metrics[layout]["num_images"] for layout in self.layouts if layout in metrics)
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{total} compositions of two classes ({', '.join(self.layouts)}); judge: {self.judge}",
            metrics=metrics | {"judge": self.judge},
            table=table,
            notes=[
                "Each half (left/right for wide, top/bottom for tall) is judged against the class named first or second."
            ],
            summary=f"both halves right {percent(metrics['both_right'])} ({total} images)",
        )


__all__ = [
    "DEFAULT_COMPOSITION_PROMPTS",
    "DEFAULT_INSTRUCTIONS",
    "EDIT_TARGET_DB",
    "CompositionTask",
    "EditTask",
    "halves",
    "pixel_edit_metrics",
]
