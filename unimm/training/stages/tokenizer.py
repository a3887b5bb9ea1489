"""Training stage ``tokenizer``: the dual-codebook visual tokenizer on an image dataset.

The ``dataset`` field takes any dataset spec (``unimm.data.spec``: a demo name, a path, a mapping), or
``synthetic`` (random shapes, for tests and smoke runs).

The loss (``unimm.tokenizer.losses.DualCodebookLoss``, with the PatchGAN discriminator) is built from this
stage's fields and trained with the tokenizer inside one ``TokenizerTrainingModel``; the export holds the
tokenizer alone.

Also home of :func:`pretrain_teacher_classifier` (last section), which gives the small built-in ViT teacher
real semantics on a labelled dataset, saved as a normal transformers folder that a tokenizer recipe loads as
``teacher_name_or_path``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageClassification

from unimm.data.schema import open_image
from unimm.data.spec import load_image_splits, parse_dataset_spec, resolve_spec_paths
from unimm.evaluation import metrics
from unimm.tokenizer import (
    DualCodebookConfig,
    DualCodebookImageProcessor,
    DualCodebookLoss,
    DualCodebookLossOutput,
    DualCodebookTokenizer,
    DualCodebookTokenizerOutput,
)
from unimm.tokenizer.configuration_dual_codebook import TRAINING_ONLY_KEYS
from unimm.tokenizer.losses import RECONSTRUCTION_LOSSES
from unimm.training import distributed

from .base import TrainingStage

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
LABEL_COLUMN = "label"

# The stage's loss fields, which `DualCodebookLoss` takes by the same names (the keys old configs still carry).
LOSS_FIELDS = TRAINING_ONLY_KEYS
# Loss settings of a named tokenizer size where they differ from `DualCodebookLoss`'s defaults: a tiny
# discriminator for tests, the PatchGAN after 20k steps for 256 px photographs.
NAMED_LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"discriminator_channels": 8},
    "base": {
        "adversarial_weight": 0.1,
        "adversarial_start_step": 20000,
        "discriminator_channels": 64,
        "discriminator_layers": 3,
    },
}


@dataclass
class TokenizerStageArguments:
    """Recipe fields of the ``tokenizer`` stage (model size, data, loss switches)."""

    # A dataset spec (a demo name, a path, or a mapping: see recipes/README.md), or `synthetic`.
    dataset: str | dict[str, Any]
    tokenizer_config: str = "demo"  # a named config of DualCodebookConfig.named(): tiny | demo | base
    image_size: int = 32  # images of any size are resized to it
    teacher_name_or_path: str | None = None  # e.g. a folder written by pretrain_teacher_classifier
    # > 0: if `teacher_name_or_path` is a local folder that does not exist yet, first train the built-in
    # ViT as a classifier on the training set's `label` column for this many epochs and save it there.
    pretrain_teacher_epochs: float = 0.0
    # The teacher's own input normalisation (e.g. ImageNet statistics for DINOv2); default: the tokenizer's.
    teacher_image_mean: list[float] | None = None
    teacher_image_std: list[float] | None = None
    teacher_autocast_dtype: str | None = None  # "bfloat16": the frozen teacher under autocast (faster on CPU)
    codebook_size: int | None = None
    hidden_channels: int | None = None
    # The loss (DualCodebookLoss's arguments). None: the named size's value in NAMED_LOSS_DEFAULTS, else
    # DualCodebookLoss's default (shown).
    reconstruction_loss: str | None = None  # "l1" | "l2"
    reconstruction_weight: float | None = None  # 1.0
    perceptual_weight: float | None = None  # 0.1; 0 skips the teacher's forward on reconstructions
    codebook_weight: float | None = None  # 1.0
    commitment_weight: float | None = None  # 0.25, beta of VQ-VAE
    semantic_weight: float | None = None  # 1.0
    adversarial_weight: float | None = None  # 0.0; > 0 adds the PatchGAN discriminator
    adversarial_start_step: int | None = None  # 0
    discriminator_channels: int | None = None  # 32
    discriminator_layers: int | None = None  # 2
    max_train_samples: int | None = None
    max_eval_samples: int | None = 1000
    num_synthetic_samples: int = 64  # size of each split of the synthetic dataset (tests, smoke runs)
    cache_dir: str | None = None  # the `datasets` cache (demo datasets: ~/.cache/unimm/datasets)
    num_sample_images: int = 16  # images in the reconstruction grid

    def __post_init__(self) -> None:
        if self.reconstruction_loss not in (None, *RECONSTRUCTION_LOSSES):
            raise ValueError(
                f"reconstruction_loss={self.reconstruction_loss!r}: expected one of {RECONSTRUCTION_LOSSES}"
            )
        if self.teacher_name_or_path and self.teacher_name_or_path.startswith("~"):
            self.teacher_name_or_path = os.path.expanduser(self.teacher_name_or_path)
        if self.dataset != SYNTHETIC:
            parse_dataset_spec(self.dataset, random_access=True)  # a malformed spec fails with the recipe
            # Paths resolve against the working directory and are kept absolute in the saved recipe, so
            # export and resume work from any directory.
            self.dataset = resolve_spec_paths(self.dataset, base_dir=None)


class TokenizerImageDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values": (C, H, W), "labels": int}`` from a sample-schema dataset (its first image).

    Images of any mode and size: EXIF orientation and high bit depths are handled as the loaders check
    them (``open_image``), then the processor converts to RGB (alpha over white) and resizes."""

    def __init__(self, dataset: Any, processor: DualCodebookImageProcessor) -> None:
        self.dataset = dataset
        self.processor = processor
        self.has_labels = LABEL_COLUMN in dataset.column_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        images = [segment["image"] for segment in row["segments"] if segment["image"] is not None]
        if not images:
            raise ValueError(f"dataset row {index} has no image segment")
        pixel_values = self.processor(open_image(images[0]), return_tensors="pt").pixel_values[0]
        label = int(row[LABEL_COLUMN]) if self.has_labels and row[LABEL_COLUMN] is not None else -1
        return {"pixel_values": pixel_values, "labels": torch.tensor(label)}


class SyntheticShapesDataset(torch.utils.data.Dataset):
    """Deterministic random rectangles on a plain background, label = colour index: data for tests."""

    def __init__(self, num_samples: int, image_size: int, num_channels: int = 3, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (num_samples,), generator=generator)
        palette = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
        images = torch.full((num_samples, num_channels, image_size, image_size), -1.0)
        corners = torch.randint(0, image_size // 2, (num_samples, 2), generator=generator)
        sizes = torch.randint(image_size // 4, image_size // 2 + 1, (num_samples, 2), generator=generator)
        for i in range(num_samples):
            (top, left), (height, width) = corners[i].tolist(), sizes[i].tolist()
            colour = palette[self.labels[i], :num_channels].view(-1, 1, 1)
            images[i, :, top : top + height, left : left + width] = colour
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def load_image_datasets(
    args: TokenizerStageArguments, processor: DualCodebookImageProcessor, num_channels: int = 3
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """``(train, eval)`` image datasets for the stage's ``dataset`` spec (see ``load_image_splits`` for
    the eval split held out when the spec names none)."""
    if args.dataset == SYNTHETIC:
        return (
            SyntheticShapesDataset(args.num_synthetic_samples, args.image_size, num_channels, seed=0),
            SyntheticShapesDataset(args.num_synthetic_samples, args.image_size, num_channels, seed=1),
        )
    train, held_out = load_image_splits(
        args.dataset,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    return (
        TokenizerImageDataset(train, processor),
        None if held_out is None else TokenizerImageDataset(held_out, processor),
    )


class TokenizerTrainingModel(nn.Module):
    """What the engine trains: the tokenizer and its loss (which owns the PatchGAN discriminator), so one
    DeepSpeed engine optimises and checkpoints both; the stage's ``export`` saves only the tokenizer."""

    def __init__(self, tokenizer: DualCodebookTokenizer, loss: DualCodebookLoss) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.loss = loss

    def forward(
        self, pixel_values: torch.Tensor, step: int | None = None
    ) -> tuple[DualCodebookTokenizerOutput, DualCodebookLossOutput]:
        outputs = self.tokenizer(
            pixel_values, output_teacher_hidden_states=self.loss.needs_teacher_hidden_states
        )
        grid = tuple(outputs.image_token_ids.shape[1:])  # (h, w)
        # The frozen teacher is the perceptual network: reconstructions are compared in its feature space.
        perceptual_network = partial(self.tokenizer.teacher_features, grid=grid, all_layers=True)
        return outputs, self.loss(pixel_values, outputs, step=step, perceptual_network=perceptual_network)


def unwrap_tokenizer(model: nn.Module) -> DualCodebookTokenizer:
    """The tokenizer inside a DeepSpeed engine and/or a ``TokenizerTrainingModel`` (or ``model`` itself)."""
    model = getattr(model, "module", model)
    return model.tokenizer if isinstance(model, TokenizerTrainingModel) else model


class TokenizerStage(TrainingStage):
    """Trains [`DualCodebookTokenizer`]; evaluates PSNR/SSIM and whole-eval-set codebook usage."""

    name = "tokenizer"
    arguments_class = TokenizerStageArguments

    def __init__(self, stage_args: TokenizerStageArguments) -> None:
        super().__init__(stage_args)
        self.config = self._build_config()
        self.processor = DualCodebookImageProcessor.from_tokenizer_config(self.config)
        self.train_dataset: torch.utils.data.Dataset | None = None
        self.eval_dataset: torch.utils.data.Dataset | None = None
        self._teacher_ready = False  # decided (and pre-trained if needed) in build_datasets

    def _build_config(self) -> DualCodebookConfig:
        args = self.args
        overrides: dict[str, Any] = {"image_size": args.image_size}
        for field in (
            "codebook_size",
            "hidden_channels",
            "teacher_image_mean",
            "teacher_image_std",
            "teacher_autocast_dtype",
        ):
            if getattr(args, field) is not None:
                overrides[field] = getattr(args, field)
        self.builtin_teacher_config = DualCodebookConfig.named(
            args.tokenizer_config, **overrides
        ).teacher_config
        if args.teacher_name_or_path is not None:
            overrides.update(teacher_name_or_path=args.teacher_name_or_path, teacher_config=None)
        return DualCodebookConfig.named(args.tokenizer_config, **overrides)

    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        self.train_dataset, self.eval_dataset = load_image_datasets(
            self.args, self.processor, self.config.num_channels
        )
        # Rank 0 decides for all: a rank starting late could otherwise find the teacher rank 0 has just
        # finished, skip the barrier below and leave rank 0 waiting there for ever.
        if distributed.broadcast_object(self._will_pretrain_teacher()):
            # Here rather than in build_model, which the loop runs under ZeRO-3's partitioned init: the
            # classifier trains whole, in its own plain loop (see `pretrain_teacher_classifier`).
            require_labels(self.train_dataset, self.args.pretrain_teacher_epochs)
            self._pretrain_teacher(Path(self.args.teacher_name_or_path))
        self._teacher_ready = True
        return self.train_dataset, self.eval_dataset

    def build_model(self) -> TokenizerTrainingModel:
        teacher_path = self.args.teacher_name_or_path
        if not self._teacher_ready and self._will_pretrain_teacher():
            self.build_datasets()  # which pre-trains it: the loop calls it first, an export does not
        try:
            tokenizer = DualCodebookTokenizer(self.config)
        except OSError as error:
            raise OSError(
                f"tokenizer stage: cannot load the teacher {teacher_path!r} ({error}); create it with "
                "`pretrain_teacher_epochs: 1` in the recipe or `python benchmarks/tokenizer_quality.py "
                "pretrain-teacher`, or give a Hub id"
            ) from error
        return TokenizerTrainingModel(tokenizer, self.build_loss())

    def build_loss(self) -> DualCodebookLoss:
        """The recipe's loss: its fields over the named size's defaults over ``DualCodebookLoss``'s."""
        kwargs = dict(NAMED_LOSS_DEFAULTS.get(self.args.tokenizer_config, {}))
        kwargs.update(
            {
                field: getattr(self.args, field)
                for field in LOSS_FIELDS
                if getattr(self.args, field) is not None
            }
        )
        return DualCodebookLoss(
            num_channels=self.config.num_channels,
            discriminator_norm_groups=self.config.norm_num_groups,
            **kwargs,
        )

    def _will_pretrain_teacher(self) -> bool:
        teacher_path = self.args.teacher_name_or_path
        # config.json comes with the classifier's final save: a folder an interrupted run left is redone.
        return (
            bool(teacher_path)
            and self.args.pretrain_teacher_epochs > 0
            and not (Path(teacher_path) / "config.json").exists()
        )

    def _pretrain_teacher(self, output_dir: Path) -> None:
        if self.builtin_teacher_config is None:
            raise ValueError("pretrain_teacher_epochs needs a named config with a built-in teacher_config")
        train_dataset = labelled_subset(self.train_dataset)
        # Without an eval split the classifier's accuracy is measured on its training rows.
        eval_dataset = labelled_subset(self.eval_dataset) if self.eval_dataset is not None else train_dataset
        if distributed.is_main_process():
            pretrain_teacher_classifier(
                self.builtin_teacher_config,
                train_dataset,
                eval_dataset,
                num_labels=num_labels(train_dataset),
                output_dir=output_dir,
                epochs=self.args.pretrain_teacher_epochs,
                log_path=output_dir / "log.jsonl",
            )
        distributed.wait_for_main_process()  # the other ranks load what rank 0 saved

    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs, losses = model(pixel_values=batch["pixel_values"], step=step if step >= 0 else None)
        # Tensors, read by the loop only when it logs: no host sync per micro-step.
        logged = {name: value.detach() for name, value in losses.items() if name != "loss"}
        logged["codebook_usage"] = outputs.codebook_usage.detach()
        logged["perplexity"] = outputs.perplexity.detach()
        data_range = self._data_range()
        logged["psnr"] = metrics.psnr(
            outputs.reconstruction.detach(), batch["pixel_values"], data_range
        ).mean()
        return losses.loss, logged

    def _data_range(self) -> float:
        return float(1.0 / min(self.config.image_std))

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The default groups, with the codebooks also free of weight decay (it would shrink the entries)."""
        groups = super().parameter_groups(model)
        codebooks = {id(p) for name, p in model.named_parameters() if name.endswith("codebook")}
        decay = [p for p in groups[0]["params"] if id(p) not in codebooks]
        no_decay = groups[1]["params"] + [p for p in groups[0]["params"] if id(p) in codebooks]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, eval_loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Eval-set PSNR/SSIM of ``decode(encode(x))`` and codebook usage/perplexity over all eval ids."""
        model = unwrap_tokenizer(model)
        was_training = model.training
        model.eval()
        psnrs, ssims, counts = [], [], torch.zeros(model.config.codebook_size, dtype=torch.long)
        for batch in eval_loader:
            pixel_values = batch["pixel_values"].to(model.device, model.dtype)
            ids = model.encode(pixel_values)
            reconstruction = model.decode(ids)
            target, prediction = self._to_unit_range(pixel_values), self._to_unit_range(reconstruction)
            psnrs.append(metrics.psnr(prediction, target))
            if min(target.shape[-2:]) >= 11:
                ssims.append(metrics.ssim(prediction, target))
            counts += metrics.codebook_counts(ids.cpu(), model.config.codebook_size)
        model.train(was_training)
        results = {
            "psnr": float(torch.cat(psnrs).mean()),
            "codebook_usage": metrics.codebook_usage(counts),
            "perplexity": metrics.codebook_perplexity(counts),
        }
        if ssims:
            results["ssim"] = float(torch.cat(ssims).mean())
        return results

    def _to_unit_range(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.config.image_mean, device=pixel_values.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.image_std, device=pixel_values.device).view(1, -1, 1, 1)
        return (pixel_values.float() * std + mean).clamp(0, 1)

    @torch.no_grad()
    def write_samples(self, model: nn.Module, step: int, output_dir: Path) -> list[Path]:
        """A PNG grid: originals in odd rows, their reconstructions below them."""
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            return []
        model = unwrap_tokenizer(model)
        count = min(self.args.num_sample_images, len(self.eval_dataset))
        pixel_values = torch.stack([self.eval_dataset[i]["pixel_values"] for i in range(count)])
        path = Path(output_dir) / f"reconstructions-{step:07d}.png"
        save_reconstruction_grid(model, self.processor, pixel_values.to(model.device, model.dtype), path)
        return [path]

    def export(self, model: nn.Module, output_dir: Path) -> None:
        """The tokenizer alone in its Hub layout (the loss and its discriminator stay in the checkpoints)."""
        unwrap_tokenizer(model).save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)


@torch.no_grad()
def save_reconstruction_grid(
    model: DualCodebookTokenizer,
    processor: DualCodebookImageProcessor,
    pixel_values: torch.Tensor,
    path: Path,
    columns: int = 8,
) -> Path:
    """Save originals and ``decode(encode(x))`` as a PNG grid, each row of originals above its reconstructions."""
    was_training = model.training
    model.eval()
    reconstruction = model.decode(model.encode(pixel_values))
    model.train(was_training)
    originals = processor.postprocess(pixel_values, output_type="np")  # (B, H, W, C)
    reconstructed = processor.postprocess(reconstruction, output_type="np")
    rows = []
    for start in range(0, len(originals), columns):
        for images in (originals[start : start + columns], reconstructed[start : start + columns]):
            padded = list(images) + [np.zeros_like(images[0])] * (columns - len(images))
            rows.append(np.concatenate(padded, axis=1))  # (H, columns * W, C)
    grid = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def collect_codes(
    model: DualCodebookTokenizer, dataset: torch.utils.data.Dataset, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Encode a whole dataset: ids (N, h, w), labels (N,), pixels in [0, 1] and reconstructions in [0, 1]."""
    model.eval()
    ids, labels, pixels, reconstructions = [], [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    mean = torch.tensor(model.config.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, -1, 1, 1)
    with torch.no_grad():
        for batch in tqdm(loader, desc="encode"):
            pixel_values = batch["pixel_values"].to(model.device, model.dtype)
            batch_ids = model.encode(pixel_values)
            ids.append(batch_ids.cpu())
            labels.append(batch["labels"])
            pixels.append((batch["pixel_values"] * std + mean).clamp(0, 1))
            reconstructions.append((model.decode(batch_ids).float().cpu() * std + mean).clamp(0, 1))
    return {
        "image_token_ids": torch.cat(ids),
        "labels": torch.cat(labels),
        "pixels": torch.cat(pixels),
        "reconstructions": torch.cat(reconstructions),
    }


# ----- teacher pre-training ------------------------------------------------------------------------------
# The built-in ViT teacher trained as a classifier on the tokenizer's labelled images (a random frozen teacher
# carries no semantics). A plain loop of its own rather than `unimm.training.loop.train`: it runs inside the
# tokenizer run's setup on rank 0 while the other ranks wait, where a second DeepSpeed engine (a collective)
# cannot start. Giving the teacher the shared loop means making it a stage and a step of its own before the
# tokenizer in a multi-step build.


def labelled_subset(dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
    """The rows of ``dataset`` with a class label (>= 0: the demo mixture marks its unlabelled rows -1)."""
    if isinstance(dataset, SyntheticShapesDataset):
        return dataset
    rows = dataset.dataset.filter(
        lambda label: label is not None and label >= 0, input_columns=LABEL_COLUMN, keep_in_memory=True
    )
    return TokenizerImageDataset(rows, dataset.processor)


def require_labels(dataset: torch.utils.data.Dataset, epochs: float) -> None:
    """Teacher pre-training is classification: fail before any training when there is nothing to classify."""
    if isinstance(dataset, SyntheticShapesDataset) or dataset.has_labels:
        return
    raise ValueError(
        f"pretrain_teacher_epochs={epochs} trains the teacher as a classifier and needs a "
        f"{LABEL_COLUMN!r} column of class ids, but the dataset has the columns "
        f"{dataset.dataset.column_names}: give an existing teacher_name_or_path, or set "
        "pretrain_teacher_epochs: 0"
    )


def num_labels(dataset: torch.utils.data.Dataset) -> int:
    """The number of classes of a labelled dataset: its ``ClassLabel``'s, else the largest label + 1."""
    if isinstance(dataset, SyntheticShapesDataset):
        return int(dataset.labels.max()) + 1
    feature = dataset.dataset.features[LABEL_COLUMN]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return max(dataset.dataset[LABEL_COLUMN]) + 1


def pretrain_teacher_classifier(
    teacher_config: dict[str, Any],
    train_dataset: torch.utils.data.Dataset,
    eval_dataset: torch.utils.data.Dataset,
    num_labels: int,
    output_dir: str | Path,
    epochs: float = 1.0,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    log_path: str | Path | None = None,
) -> float:
    """Train the built-in (or any) vision backbone as an image classifier on labelled items
    ``{"pixel_values", "labels"}``, save it with ``save_pretrained`` and return its eval accuracy.

    The saved folder loads with ``AutoModel.from_pretrained`` as a semantic teacher (the head is dropped)."""
    kwargs = dict(teacher_config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), num_labels=num_labels, **kwargs)
    model = AutoModelForImageClassification.from_config(config)
    if len(train_dataset) == 0:
        raise ValueError("pretrain_teacher_classifier: the training dataset is empty")
    batch_size = min(batch_size, len(train_dataset))
    loader = torch.utils.data.DataLoader(train_dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    total_steps = max(1, int(epochs * len(loader)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, learning_rate, total_steps=total_steps, pct_start=0.1
    )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    model.train()
    step = 0
    with tqdm(total=total_steps, desc="teacher classifier") as progress:
        while step < total_steps:
            for batch in loader:
                loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
                if log_file and step % 20 == 0:
                    log_file.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                    log_file.flush()
                if step >= total_steps:
                    break
    accuracy = classifier_accuracy(model, eval_dataset, batch_size)
    if log_file:
        log_file.write(json.dumps({"step": step, "eval_accuracy": accuracy}) + "\n")
        log_file.close()
    model.save_pretrained(output_dir)
    logger.info("teacher classifier: eval accuracy %.4f, saved to %s", accuracy, output_dir)
    return accuracy


@torch.no_grad()
def classifier_accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 256) -> float:
    model.eval()
    correct = total = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        logits = model(pixel_values=batch["pixel_values"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / max(total, 1)


__all__ = [
    "SyntheticShapesDataset",
    "TokenizerImageDataset",
    "TokenizerStage",
    "TokenizerStageArguments",
    "TokenizerTrainingModel",
    "classifier_accuracy",
    "collect_codes",
    "pretrain_teacher_classifier",
    "save_reconstruction_grid",
]
