"""The Fashion-MNIST judge: a small CNN trained on real Fashion-MNIST that classifies generated images.

Generation correctness is the share of images generated from a class's caption that the judge puts in that
class; the judge's own accuracy on the real test split is the ceiling of that number. Its penultimate
activations (128-d) are the fixed feature space of the report's Fréchet distances ("Fréchet distance in
judge features"; never call it FID: there are no Inception weights here).

The weights ship with the package (``evaluation/data/fashion_mnist_judge.safetensors``, ~0.6 MB) and are
reproduced by ``python scripts/train_judge.py`` (seeded, 8 epochs: about 2.5 minutes on one CPU thread;
91.6% on the 10,000 test images).

Inputs are grey 32x32 images in [0, 1], shape (N, 1, 32, 32): Fashion-MNIST padded from 28 px, as the demo
model sees it. RGB images are converted to L first, so generated RGB and real grey images are judged alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

JUDGE_FILE = "fashion_mnist_judge.safetensors"
JUDGE_IMAGE_SIZE = 32
FEATURE_DIM = 128
NUM_CLASSES = 10
DEFAULT_BATCH_SIZE = 500


class FashionMNISTJudge(nn.Module):
    """Three conv blocks (16, 32, 64 channels, each halving the size) and a 128-d hidden layer: ~155k
    parameters, ~3 MFLOPs per image, so judging thousands of images takes seconds on a CPU."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()

        def block(in_channels: int, out_channels: int) -> list[nn.Module]:
            return [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]

        self.conv = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64))  # 32 -> 4 px
        self.hidden = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128) of grey images (N, 1, 32, 32) in [0, 1]."""
        hidden = self.conv((pixel_values - 0.5) / 0.5)
        return F.relu(self.hidden(hidden.flatten(1)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.dropout(self.features(pixel_values)))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> FashionMNISTJudge:
        """The judge in eval mode, from ``path`` or, by default, the weights shipped with the package."""
        if path is None:
            with resources.as_file(resources.files("unimm.evaluation") / "data" / JUDGE_FILE) as file:
                state_dict = load_file(file)
        else:
            state_dict = load_file(path)
        model = cls()
        model.load_state_dict(state_dict)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        save_file({name: tensor.contiguous() for name, tensor in self.state_dict().items()}, str(path))


def images_to_tensor(images: Sequence[PIL.Image.Image], image_size: int = JUDGE_IMAGE_SIZE) -> torch.Tensor:
    """PIL images (any mode, any size) to grey (N, 1, size, size) floats in [0, 1]; other sizes are resized
    bilinearly (the tiny test pipelines draw 16 px images)."""
    arrays = []
    for image in images:
        grey = image.convert("L")
        if grey.size != (image_size, image_size):
            grey = grey.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
        arrays.append(np.asarray(grey, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 1, image_size, image_size)
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1).float() / 255.0


@torch.no_grad()
def judge_outputs(
    judge: FashionMNISTJudge, pixel_values: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and penultimate features (N, 128) of grey images (N, 1, 32, 32)."""
    judge.eval()
    predictions, features = [], []
    for start in range(0, len(pixel_values), batch_size):
        batch_features = judge.features(pixel_values[start : start + batch_size])
        features.append(batch_features)
        predictions.append(judge.head(batch_features).argmax(-1))
    if not features:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, judge.hidden.out_features)
    return torch.cat(predictions), torch.cat(features)


def judge_accuracy(
    judge: FashionMNISTJudge,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Share of images (N, 1, 32, 32) the judge puts in their class ``labels`` (N,)."""
    predictions, _ = judge_outputs(judge, pixel_values, batch_size)
    return float((predictions == torch.as_tensor(labels)).float().mean())


def _random_shift(pixel_values: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with black (the background): generated
    images are not always centred like the dataset's."""
    if max_shift == 0:
        return pixel_values
    padded = F.pad(pixel_values, (max_shift,) * 4)
    size = pixel_values.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(pixel_values), 2), generator=generator)
    shifted = torch.empty_like(pixel_values)
    for dy, dx in torch.unique(offsets, dim=0).tolist():  # one slice per distinct offset, not per image
        rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
        shifted[rows] = padded[rows, :, dy : dy + size, dx : dx + size]
    return shifted


def train_judge(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 8,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    seed: int = 0,
) -> FashionMNISTJudge:
    """Train a judge on grey images (N, 1, 32, 32) in [0, 1] with labels (N,): AdamW with a one-cycle
    schedule, random shifts of up to ``max_shift`` px. The same seed gives the same weights (on one machine
    and thread count: float reductions in conv kernels may differ across CPUs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # dropout draws from the global generator: seed it without leaking
        torch.manual_seed(seed)
        model = FashionMNISTJudge()
        steps_per_epoch = math.ceil(len(pixel_values) / batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        labels = torch.as_tensor(labels, dtype=torch.long)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(pixel_values), generator=generator)
            progress = tqdm(range(steps_per_epoch), desc=f"judge epoch {epoch + 1}/{epochs}", leave=False)
            running_loss = 0.0
            for step in progress:
                indices = order[step * batch_size : (step + 1) * batch_size]
                inputs = _random_shift(pixel_values[indices], max_shift, generator)
                loss = F.cross_entropy(model(inputs), labels[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running_loss += loss.item()
                if step % 50 == 0:
                    progress.set_postfix(loss=f"{loss.item():.3f}")
            logger.info(
                "judge epoch %d/%d: mean loss %.4f", epoch + 1, epochs, running_loss / steps_per_epoch
            )
    return model.eval()


_DEFAULT_JUDGE: FashionMNISTJudge | None = None


def load_judge() -> FashionMNISTJudge:
    """The packaged judge, loaded once per process."""
    global _DEFAULT_JUDGE
    if _DEFAULT_JUDGE is None:
        _DEFAULT_JUDGE = FashionMNISTJudge.from_pretrained()
    return _DEFAULT_JUDGE


def fashion_mnist_tensors(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` (its first ``limit`` images) as the judge takes it: grey (N, 1, 32, 32)
    floats in [0, 1] and labels (N,). Read from the RGB dataset the demo model trains on (cached once for
    both); grey to RGB to L is exact, so these are the original pixels."""
    from unimm.data.demo_datasets import load_fashion_mnist

    dataset = load_fashion_mnist(JUDGE_IMAGE_SIZE, mode="RGB")[split]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    images = [segments[0]["image"] for segments in dataset["segments"]]
    return images_to_tensor(images), torch.tensor(dataset["label"], dtype=torch.long)


__all__ = [
    "FEATURE_DIM",
    "JUDGE_IMAGE_SIZE",
    "FashionMNISTJudge",
    "fashion_mnist_tensors",
    "images_to_tensor",
    "judge_accuracy",
    "judge_outputs",
    "load_judge",
    "train_judge",
]
