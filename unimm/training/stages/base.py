"""The contract between the shared training loop and one training stage.

The loop (``unimm.training.loop``) owns everything that is the same for every component: the
DeepSpeed engine, mixed precision, gradient accumulation and clipping, LR schedules, checkpoints and
resume, logging, evaluation cadence and export. A stage owns what differs: which model to build,
which data it reads, how a batch becomes a loss, and what a person would like to look at.

Each stage lives in its own module of this package (``tokenizer.py``, ``detokenizer.py``, ``llm.py``)
and declares the dataclass of its own recipe fields; a recipe YAML is parsed with ``HfArgumentParser``
into the loop's ``TrainingArguments`` plus that dataclass.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class TrainingStage(abc.ABC):
    """One component's training recipe code. Subclasses set ``name`` and ``arguments_class``."""

    name: ClassVar[str]
    # The dataclass holding this stage's recipe fields (model size, data, loss weights, ...).
    arguments_class: ClassVar[type]

    def __init__(self, stage_args: Any) -> None:
        self.args = stage_args

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Return the module to train (frozen parts already have ``requires_grad=False``)."""

    def validate(self, model: nn.Module, train_dataset: torch.utils.data.Dataset) -> None:
        """Raise a clear error if the model and the data do not fit together (checked before training)."""
        return None

    @abc.abstractmethod
    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        """Return ``(train, eval)`` map-style datasets; ``eval`` may be ``None``."""

    def sample_lengths(self, dataset: torch.utils.data.Dataset) -> Sequence[int]:
        """The length of every sample of ``dataset``, for ``group_by_length``; a stage whose samples all cost
        the same has none."""
        raise ValueError(f"group_by_length: stage {self.name!r} has no sample lengths to group by")

    def collate(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn a list of dataset items into a batch; the default stacks tensors field by field."""
        return torch.utils.data.default_collate(list(samples))

    @abc.abstractmethod
    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss to backpropagate and named metrics to log for this batch: floats, or 0-d
        tensors (read only when the loop logs, so the step need not wait for them); nan means "not measured
        in this batch"."""

    # What throughput is counted in (tqdm and metrics.jsonl show `<unit>_per_second`).
    throughput_unit: ClassVar[str] = "samples"

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many throughput units a batch holds; the default: its batch size."""
        return len(next(iter(batch.values())))

    def state_dict(self) -> dict[str, Any]:
        """Stage-owned training state outside the model (e.g. EMA weights), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume, and before export from a checkpoint)."""
        return None

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group may carry its own ``lr`` / ``weight_decay``.

        The default: every trainable parameter, no weight decay on biases, norms and embeddings."""
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name or "embed" in name else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, eval_loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Metrics on the eval set; the default averages ``compute_loss``'s metrics (floats or tensors), each
        over the batches that measured it (nan, or absent, where a batch has no such targets: no image
        token, no text-only row)."""
        totals: dict[str, float] = {}
        batches: dict[str, int] = {}
        for batch in eval_loader:
            loss, metrics = self.compute_loss(model, batch, step=-1)
            for key, value in {"loss": loss, **metrics}.items():
                if math.isfinite(value := float(value)):
                    totals[key] = totals.get(key, 0.0) + value
                    batches[key] = batches.get(key, 0) + 1
        return {key: value / batches[key] for key, value in totals.items()}

    @torch.no_grad()
    def write_samples(self, model: nn.Module, step: int, output_dir: Path) -> list[Path]:
        """Write PNG grids a person would rather look at (reconstructions, generations); optional."""
        return []

    @property
    def has_eval_tasks(self) -> bool:
        """Whether :meth:`run_eval_tasks` measures anything (the loop gathers the model for it only then)."""
        return False

    @torch.no_grad()
    def run_eval_tasks(self, model: nn.Module, step: int, output_dir: Path) -> dict[str, float]:
        """Evaluation tasks on the model being trained (rank 0, full parameters): their figures as flat
        ``name -> value`` metrics for ``metrics.jsonl`` (learning curves), their reports under ``output_dir``."""
        return {}

    @abc.abstractmethod
    def export(self, model: nn.Module, output_dir: Path) -> None:
        """Write the trained component in its Hub layout (``save_pretrained``, safetensors)."""
