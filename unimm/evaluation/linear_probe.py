"""Linear probe of a vision backbone on Fashion-MNIST: how much class information its features carry.

Features are the usual ViT probe input: the class token next to the mean of the patch tokens of the last
layer, i.e. (N, 2 * hidden). A multinomial logistic regression
(:func:`unimm.evaluation.metrics.linear_probe_accuracy`) is fit on a seeded train subset and scored on a
seeded test subset."""

from __future__ import annotations

import logging
import time

import torch
from PIL import Image
from transformers import BaseImageProcessor, PreTrainedModel

from unimm.data.demo_datasets import load_fashion_mnist
from unimm.evaluation.metrics import linear_probe_accuracy

logger = logging.getLogger(__name__)

FASHION_MNIST_NATIVE_SIZE = 28
DEFAULT_BATCH_SIZE = 64
LOG_EVERY_BATCHES = 10  # feature extraction of thousands of images takes minutes on a CPU


@torch.no_grad()
def backbone_features(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    images: list[Image.Image],
    image_size: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """(N, 2 * hidden) float32 features: class token and mean patch token of ``last_hidden_state``.

    Images are resized to ``image_size`` whole (no crop), then normalised by ``processor``."""
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    features = []
    for start in range(0, len(images), batch_size):
        batch = processor(images[start : start + batch_size], size=size, crop_size=crop, return_tensors="pt")
        pixel_values = batch["pixel_values"].to(model.device, model.dtype)
        hidden = model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, hidden)
        features.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1).float().cpu())  # (B, 2h)
        if len(features) % LOG_EVERY_BATCHES == 0:
            logger.info("features: %d / %d images", start + len(pixel_values), len(images))
    return torch.cat(features)


def _images_and_labels(split, count: int, seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    if count > len(split):
        raise ValueError(f"asked for {count} images, the split has {len(split)}")
    rows = split.shuffle(seed=seed).select(range(count))
    return [row["segments"][0]["image"] for row in rows], torch.tensor(rows["label"])


def fashion_mnist_linear_probe(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    num_train: int = 5000,
    num_test: int = 2000,
    image_size: int = 224,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> dict:
    """Linear-probe test accuracy of ``model``'s features on seeded Fashion-MNIST subsets."""
    dataset = load_fashion_mnist(image_size=FASHION_MNIST_NATIVE_SIZE, mode="RGB")
    start = time.perf_counter()
    train_images, train_labels = _images_and_labels(dataset["train"], num_train, seed)
    test_images, test_labels = _images_and_labels(dataset["test"], num_test, seed)
    train_features = backbone_features(model, processor, train_images, image_size, batch_size)
    test_features = backbone_features(model, processor, test_images, image_size, batch_size)
    feature_seconds = time.perf_counter() - start
    accuracy = linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
    logger.info("linear probe: accuracy %.4f (%d train, %d test)", accuracy, num_train, num_test)
    return {
        "accuracy": accuracy,
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "feature_dim": int(train_features.shape[1]),
        "feature_seconds": round(feature_seconds, 1),
        "seed": seed,
    }
