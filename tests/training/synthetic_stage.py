"""A synthetic stage for the loop's tests: a tiny Llama learning arithmetic token sequences.

Importable as ``synthetic_stage:SyntheticStage`` by subprocess runs (``PYTHONPATH=tests/training``).
Besides training it records what the tests check: the sample indices each rank trained on, and the
logits of a fixed batch computed by the (possibly ZeRO-3 sharded) engine at evaluation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from unimm.training import distributed
from unimm.training.stages.base import TrainingStage


@dataclass
class SyntheticArguments:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    sequence_length: int = 16
    num_train_samples: int = 64
    num_eval_samples: int = 8
    attention_dropout: float = 0.1
    seconds_per_step: float = 0.0  # slows the run down so a test can kill it mid-way
    record_dir: str | None = None  # where ranks write their trained indices and eval logits


class ArithmeticSequences(torch.utils.data.Dataset):
    """Sequence i is ``(a + b * t) mod V`` for ``a, b`` drawn from ``i``: learnable, deterministic."""

    def __init__(self, size: int, length: int, vocab_size: int, offset: int) -> None:
        self.size, self.length, self.vocab_size, self.offset = size, length, vocab_size, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.offset + index)
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=generator).tolist()
        tokens = (start + (stride % 5 + 1) * torch.arange(self.length)) % self.vocab_size
        return {"input_ids": tokens, "index": torch.tensor(self.offset + index)}


class SyntheticStage(TrainingStage):
    name = "synthetic"
    arguments_class = SyntheticArguments

    def build_model(self) -> nn.Module:
        args = self.args
        config = LlamaConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4 * args.sequence_length,
            attention_dropout=args.attention_dropout,
        )
        return LlamaForCausalLM(config)

    def build_datasets(self) -> tuple[ArithmeticSequences, ArithmeticSequences]:
        args = self.args
        train = ArithmeticSequences(args.num_train_samples, args.sequence_length, args.vocab_size, 0)
        held_out = ArithmeticSequences(args.num_eval_samples, args.sequence_length, args.vocab_size, 10**6)
        if args.record_dir:  # so a test can signal this rank's process
            (Path(args.record_dir) / f"pid_rank{distributed.rank()}.txt").write_text(str(os.getpid()))
        return train, held_out

    def compute_loss(self, model, batch, step):
        if step >= 0 and self.args.record_dir:
            with open(Path(self.args.record_dir) / f"indices_rank{distributed.rank()}.txt", "a") as handle:
                handle.write(" ".join(map(str, batch["index"].tolist())) + "\n")
        if self.args.seconds_per_step:
            time.sleep(self.args.seconds_per_step)
        outputs = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return outputs.loss, {"accuracy": self._accuracy(outputs.logits, batch["input_ids"])}

    @staticmethod
    def _accuracy(logits: torch.Tensor, tokens: torch.Tensor) -> float:
        return float((logits[:, :-1].argmax(-1) == tokens[:, 1:]).float().mean())

    def evaluate(self, model, eval_loader):
        metrics = super().evaluate(model, eval_loader)
        if self.args.record_dir:
            batch = next(iter(eval_loader))
            logits = model(input_ids=batch["input_ids"]).logits.float()  # every rank joins a ZeRO-3 forward
            if distributed.is_main_process():
                torch.save(
                    {"input_ids": batch["input_ids"], "logits": logits},
                    Path(self.args.record_dir) / "logits.pt",
                )
        return metrics

    def write_samples(self, model, step, output_dir):
        """Next-token predictions on held-out sequences as a picture (rows: sequences)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        held_out = ArithmeticSequences(4, self.args.sequence_length, self.args.vocab_size, 10**6)
        tokens = torch.stack([held_out[index]["input_ids"] for index in range(len(held_out))])
        predicted = model(input_ids=tokens.to(next(model.parameters()).device)).logits.argmax(-1).cpu()
        picture = (predicted.numpy() * (255 // self.args.vocab_size)).astype(np.uint8)
        path = output_dir / "predictions.png"
        Image.fromarray(picture).resize((picture.shape[1] * 8, picture.shape[0] * 8)).save(path)
        (output_dir / "step.json").write_text(json.dumps({"step": step}))
        return [path]

    def export(self, model, output_dir):
        model.save_pretrained(output_dir)
