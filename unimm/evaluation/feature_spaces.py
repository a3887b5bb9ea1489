"""Named feature spaces for Fréchet distances between image sets (:mod:`unimm.evaluation.frechet`).

A distance means something only within its feature space, so every report names it ("Fréchet distance in
the visual tokenizer's teacher features"); none of these is Inception, so none is an FID.

- ``teacher``: the visual tokenizer's vision teacher (its configured layer), averaged over the token grid;
  images are prepared by the checkpoint's own image processor, as the tokenizer sees them.
- ``judge``: the penultimate activations of the prompt-following judge (a classifier folder or
  ``fashion_mnist``).
- a folder: a ``transformers`` image-classification model (its ``config.json`` names a
  ``*ForImageClassification`` architecture): its penultimate activations; any other ``AutoModel`` with an
  ``AutoImageProcessor``: its pooled output, else its last hidden state averaged over positions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .prompt_judges import ClassifierJudge, PromptJudge

TEACHER, JUDGE = "teacher", "judge"
CLASSIFIER_SUFFIX = "ForImageClassification"
FEATURE_BATCH_SIZE = 64


class FeatureSpace:
    """Images to feature vectors (N, D). ``name`` (short) and ``description`` (with details) each
    complete "Fréchet distance in ..."."""

    name: str = ""
    description: str = ""

    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        raise NotImplementedError


class TeacherFeatures(FeatureSpace):
    """The visual tokenizer's teacher features, averaged over the token grid."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        tokenizer = pipeline.visual_tokenizer
        teacher_type = tokenizer.teacher.config.model_type
        layer = tokenizer.config.teacher_feature_layer
        self.name = "teacher features"
        self.description = (
            f"the visual tokenizer's teacher features ({teacher_type}, layer {layer}, "
            f"{tokenizer.teacher_hidden_size}-d, mean over the token grid)"
        )

    @torch.no_grad()
    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        tokenizer = self.pipeline.visual_tokenizer
        image_processor = self.pipeline.processor.image_processor
        factor = tokenizer.config.downsample_factor
        pixel_values = [image_processor(image, return_tensors="pt")["pixel_values"] for image in images]
        features: list[torch.Tensor | None] = [None] * len(images)
        # One teacher call per image size (the processor may keep each image's own aspect ratio).
        for shape in dict.fromkeys(tuple(values.shape) for values in pixel_values):
            indices = [index for index, values in enumerate(pixel_values) if tuple(values.shape) == shape]
            for start in range(0, len(indices), FEATURE_BATCH_SIZE):
                chunk = indices[start : start + FEATURE_BATCH_SIZE]
                batch = torch.cat([pixel_values[index] for index in chunk]).to(
                    tokenizer.device
                )  # (B, C, H, W)
                grid = (batch.shape[-2] // factor, batch.shape[-1] // factor)
                maps = tokenizer.teacher_features(batch, grid)[-1]  # (B, h, w, Dt)
                for index, vector in zip(chunk, maps.float().mean(dim=(1, 2)).cpu()):
                    features[index] = vector
        return torch.stack(features) if features else torch.zeros(0, tokenizer.teacher_hidden_size)


class JudgeFeatures(FeatureSpace):
    """A classifier judge's penultimate activations."""

    def __init__(self, judge: PromptJudge) -> None:
        if not judge.has_features:
            raise ValueError(
                f"judge {judge.name} has no features: use a classifier folder or fashion_mnist as the "
                "judge, or --features teacher or a model folder"
            )
        self.judge = judge
        self.name = f"{Path(judge.name).name} judge features"
        self.description = f"the penultimate features of the judge {judge.name}"

    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        return self.judge.features(images)


class AutoModelFeatures(FeatureSpace):
    """Any ``transformers`` vision model with an image processor: pooled output, else mean last state."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(folder).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.name = f"{Path(folder).name} features"
        self.description = (
            f"the pooled features of the model {Path(folder).name} ({self.model.config.model_type})"
        )

    @torch.no_grad()
    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        vectors = []
        for start in range(0, len(images), FEATURE_BATCH_SIZE):
            batch = [image.convert("RGB") for image in images[start : start + FEATURE_BATCH_SIZE]]
            outputs = self.model(**self.processor(images=batch, return_tensors="pt").to(self.model.device))
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                hidden = outputs.last_hidden_state
                # (B, L, D) tokens or (B, C, H, W) feature maps: average over positions.
                pooled = hidden.mean(dim=1) if hidden.ndim == 3 else hidden.mean(dim=(-2, -1))
            vectors.append(pooled.flatten(1).float().cpu())
        return torch.cat(vectors)


def load_feature_space(
    spec: str, pipeline: Any, judge: PromptJudge | None = None, base_dir: str | os.PathLike | None = None
) -> FeatureSpace:
    """The feature space ``spec`` names (see the module docstring); ``judge`` serves ``judge``."""
    if spec == TEACHER:
        return TeacherFeatures(pipeline)
    if spec == JUDGE:
        if judge is None:
            raise ValueError(
                "features 'judge' need a judge: give --judge (a classifier folder or fashion_mnist)"
            )
        return JudgeFeatures(judge)
    folder = Path(spec).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = Path(base_dir) / folder
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"features {spec!r}: expected {TEACHER!r}, {JUDGE!r} or a transformers model folder "
            f"(no config.json in {folder})"
        )
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if any(name.endswith(CLASSIFIER_SUFFIX) for name in architectures):
        return JudgeFeatures(ClassifierJudge(folder))
    return AutoModelFeatures(folder)


__all__ = [
    "AutoModelFeatures",
    "FeatureSpace",
    "JudgeFeatures",
    "TeacherFeatures",
    "load_feature_space",
]
