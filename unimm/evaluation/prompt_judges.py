"""Judges of prompt following: does a generated image show what its prompt asks for?

A judge scores each (image, prompt) pair with a number in [0, 1] (1: right). It is named by a spec:

- ``module:function`` or ``path/to/file.py:function``: a Python callable
  ``function(images: list[PIL.Image.Image], prompts: list[str]) -> list[float | bool]``;
- a folder of any ``transformers`` image-classification model (``AutoModelForImageClassification`` +
  ``AutoImageProcessor``): an image is right when the name of the label the classifier predicts appears in
  the prompt, as whole words, ignoring case and punctuation (``"tabby_cat"`` is read "tabby cat"; a label
  of comma-separated synonyms, as ImageNet's ``"tabby, tabby cat"``, counts when any synonym does);
- ``fashion_mnist``: the packaged Fashion-MNIST CNN (:mod:`unimm.evaluation.judge`); right when the class
  it predicts is the one the prompt names (a prompt naming no class, or two, is wrong).

The classifier judges also give features (their penultimate activations) for Fréchet distances.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .answers import normalize_answer

logger = logging.getLogger(__name__)

FASHION_MNIST_JUDGE = "fashion_mnist"
CLASSIFIER_BATCH_SIZE = 64
LABEL_SYNONYM_SEPARATOR = ","


class PromptJudge:
    """Scores (image, prompt) pairs in [0, 1]; ``rule`` says how, for the report."""

    name: str = ""
    rule: str = ""
    has_features: bool = False

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor | None:
        """Penultimate features (N, D), or ``None`` when the judge has none."""
        return None


class CallableJudge(PromptJudge):
    """A Python function ``(images, prompts) -> list[float | bool]``; its values are checked."""

    def __init__(self, function: Callable[..., Sequence[Any]], name: str) -> None:
        self.function, self.name = function, name
        self.rule = f"`{name}` scores each image and its prompt (1: right, 0: wrong)"

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> list[float]:
        values = list(self.function(list(images), list(prompts)))
        if len(values) != len(images):
            raise ValueError(f"judge {self.name} returned {len(values)} scores for {len(images)} images")
        return [_checked_score(value, self.name) for value in values]


def _checked_score(value: Any, name: str) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"judge {name} returned {value!r}: expected a bool or a number in [0, 1]") from None
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"judge {name} returned {number}: expected a bool or a number in [0, 1]")
    return number


class ClassifierJudge(PromptJudge):
    """A ``transformers`` image classifier: right when the predicted label's name appears in the prompt."""

    has_features = True

    def __init__(self, folder: str | os.PathLike) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.name = str(folder)
        self.model = AutoModelForImageClassification.from_pretrained(folder).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.labels = [self.model.config.id2label[index] for index in range(self.model.config.num_labels)]
        self.head = _classification_head(self.model)
        self.rule = (
            f"classifier `{Path(folder).name}` ({len(self.labels)} labels); right when the predicted label's "
            "name (or one of its comma-separated synonyms) appears in the prompt as whole words"
        )

    @torch.no_grad()
    def _outputs(self, images: Sequence[PIL.Image.Image]) -> tuple[list[int], torch.Tensor]:
        """Predicted label indices and the inputs of the classification head (N, D)."""
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        predictions = []
        try:
            for start in range(0, len(images), CLASSIFIER_BATCH_SIZE):
                batch = [image.convert("RGB") for image in images[start : start + CLASSIFIER_BATCH_SIZE]]
                inputs = self.processor(images=batch, return_tensors="pt").to(self.model.device)
                predictions += self.model(**inputs).logits.argmax(-1).tolist()
        finally:
            hook.remove()
        if not captured:
            return predictions, torch.zeros(0, self.head.in_features)
        return predictions, torch.cat([tensor.flatten(1).float().cpu() for tensor in captured])

    def predict(self, images: Sequence[PIL.Image.Image]) -> list[str]:
        """The predicted label name of each image."""
        predictions, _ = self._outputs(images)
        return [self.labels[index] for index in predictions]

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> list[float]:
        return [float(label_in_prompt(label, prompt)) for label, prompt in zip(self.predict(images), prompts)]

    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        return self._outputs(images)[1]


def _classification_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The last linear layer with one output per label: its input is the penultimate feature."""
    heads = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == model.config.num_labels
    ]
    if not heads:
        raise ValueError(f"no linear classification head with {model.config.num_labels} outputs found")
    return heads[-1]


def label_in_prompt(label: str, prompt: str) -> bool:
    """Whether a label's name (or any of its comma-separated synonyms) appears in ``prompt`` as whole
    words, ignoring case, punctuation and articles; underscores read as spaces."""
    words = f" {normalize_answer(prompt.replace('_', ' '))} "
    for synonym in label.replace("_", " ").split(LABEL_SYNONYM_SEPARATOR):
        name = normalize_answer(synonym)
        if name and f" {name} " in words:
            return True
    return False


class FashionMNISTPromptJudge(PromptJudge):
    """The packaged Fashion-MNIST CNN: right when it predicts the class the prompt names."""

    name = FASHION_MNIST_JUDGE
    has_features = True
    rule = (
        "the Fashion-MNIST CNN (`unimm/evaluation/judge.py`); right when the class it predicts is the one the "
        "prompt names (a prompt naming none or several is wrong)"
    )

    def __init__(self) -> None:
        from .judge import load_judge

        self.model = load_judge()

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> list[float]:
        from .judge import images_to_tensor, judge_outputs
        from .report import answer_to_class

        predictions, _ = judge_outputs(self.model, images_to_tensor(images))
        return [
            float(answer_to_class(prompt) == label) for prompt, label in zip(prompts, predictions.tolist())
        ]

    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        from .judge import images_to_tensor, judge_outputs

        return judge_outputs(self.model, images_to_tensor(images))[1]


def load_prompt_judge(spec: str, base_dir: str | os.PathLike | None = None) -> PromptJudge:
    """The judge a spec names (see the module docstring); relative paths resolve against ``base_dir``
    (default: the working directory)."""
    spec = spec.strip()
    if spec == FASHION_MNIST_JUDGE:
        return FashionMNISTPromptJudge()
    folder = _resolve(spec, base_dir)
    if folder.is_dir():
        return ClassifierJudge(folder)
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ValueError(
            f"judge {spec!r}: expected module:function, file.py:function, a classifier folder or "
            f"{FASHION_MNIST_JUDGE!r} (no folder at {folder})"
        )
    module = _import(module_name, base_dir, spec)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"judge {spec!r}: {module_name} has no function {function_name!r}")
    return CallableJudge(function, spec)


def _resolve(path: str, base_dir: str | os.PathLike | None) -> Path:
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() or base_dir is None else Path(base_dir) / resolved


def _import(module_name: str, base_dir: str | os.PathLike | None, spec: str) -> Any:
    if not module_name.endswith(".py"):
        try:
            return importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"judge {spec!r}: cannot import {module_name} ({error})") from None
    path = _resolve(module_name, base_dir)
    if not path.is_file():
        raise ValueError(f"judge {spec!r}: no file at {path}")
    module_spec = importlib.util.spec_from_file_location(f"unimm_judge_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


__all__ = [
    "CallableJudge",
    "ClassifierJudge",
    "FashionMNISTPromptJudge",
    "PromptJudge",
    "label_in_prompt",
    "load_prompt_judge",
]
