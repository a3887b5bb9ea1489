"""Training throughput: unimm's loop (stage ``llm_pretrain``) vs transformers' ``Trainer``.

Same model (a Llama built from one config and one seed), same data (identical random token rows), the
same DeepSpeed JSON (its "auto" values filled by each side from the same batch size, precision and
clipping), in one process, runs interleaved (ours, Trainer, ours, ...). Both are timed the same way:
the median wall-clock time between the ends of optimizer steps, after warm-up steps. MFU is model FLOPs per second
(PaLM's 6N + 12·L·d·T per token) over the machine's matmul peak, measured in this run.

    nice python benchmarks/training.py                       # ZeRO-2, fp32
    nice python benchmarks/training.py --bf16 --deepspeed_config recipes/deepspeed/zero3.json
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainerCallback
from transformers import TrainingArguments as HfTrainingArguments

from unimm.training import distributed
from unimm.training.arguments import parse_recipe
from unimm.training.loop import TrainingLoop
from unimm.training.stages.llm import random_token_table

MATMUL_SIZE = 1024
MATMUL_REPEATS = 20
SEED = 0
UNIMM, TRAINER = "unimm loop", "transformers Trainer"
CLOCKS = ("wall", "cpu")


@dataclass
class BenchmarkArguments:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 4096
    sequence_length: int = 128
    batch_size: int = 8
    steps: int = 6
    warmup_steps: int = 2
    repeats: int = 5
    bf16: bool = False
    deepspeed_config: str = "recipes/deepspeed/zero2.json"
    threads: int = 1  # one thread per process: steadier timings on a shared CPU


def model_config(args: BenchmarkArguments) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_heads,
        "max_position_embeddings": args.sequence_length,
    }


def flops_per_token(args: BenchmarkArguments) -> float:
    """PaLM's estimate: 6 x (parameters used in matmuls) + 12 x layers x width x sequence length."""
    values = dict(model_config(args))
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_config(config)
    matmul_parameters = sum(
        module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear)
    )
    return 6 * matmul_parameters + 12 * args.num_layers * args.hidden_size * args.sequence_length


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def matmul_peak(dtype: torch.dtype) -> dict[str, float]:
    """Best FLOP/s of a square matmul on this machine, now, per wall-clock and per CPU second."""
    left = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    right = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    best = [float("inf"), float("inf")]
    for _ in range(MATMUL_REPEATS):
        start = clocks()
        torch.mm(left, right)
        end = clocks()
        best = [min(best[clock], end[clock] - start[clock]) for clock in range(2)]
    return {clock: 2 * MATMUL_SIZE**3 / seconds for clock, seconds in zip(CLOCKS, best)}


@dataclass
class Throughput:
    wall: float  # tokens per second of wall-clock time
    cpu: float  # tokens per second of this process's CPU time (all threads): robust to other load


def throughput(step_ends: list[tuple[float, float]], args: BenchmarkArguments) -> Throughput:
    """Tokens of one step over the median step time after warm-up, by wall clock and by CPU time."""
    measured = step_ends[args.warmup_steps :]
    tokens = args.batch_size * args.sequence_length
    medians = [
        statistics.median(end[clock] - start[clock] for start, end in zip(measured, measured[1:]))
        for clock in range(2)
    ]
    return Throughput(wall=tokens / medians[0], cpu=tokens / medians[1])


class _TimedLoop(TrainingLoop):
    """Our loop, recording when each optimizer step ends."""

    def _on_step_end(self) -> None:
        self.step_ends.append(clocks())
        super()._on_step_end()


def run_unimm(args: BenchmarkArguments, output_dir: Path) -> Throughput:
    total_steps = args.warmup_steps + args.steps
    recipe = parse_recipe(
        {
            "stage": "llm_pretrain",
            "output_dir": str(output_dir),
            "deepspeed_config": args.deepspeed_config,
            "model_config": model_config(args),
            "random_tokens": total_steps * args.batch_size,
            "data_seed": SEED,
            "max_length": args.sequence_length,
            "seed": SEED,
            "bf16": args.bf16,
            "max_steps": total_steps,
            "per_device_train_batch_size": args.batch_size,
            "lr_scheduler_type": "constant",
            "logging_steps": total_steps,
            "save_steps": total_steps,
            "export_at_end": False,
            "resume_from_checkpoint": "never",
        }
    )
    torch.set_num_threads(args.threads)  # a previous Trainer run may have changed it
    loop = _TimedLoop(recipe)
    loop.step_ends = []
    loop.run()
    return throughput(loop.step_ends, args)


class _StepTimes(TrainerCallback):
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.step_ends: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # accelerate's state sets torch's thread count (to 2 here); compare at the same count.
        torch.set_num_threads(self.threads)

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(clocks())


def run_trainer(args: BenchmarkArguments, output_dir: Path) -> Throughput:
    total_steps = args.warmup_steps + args.steps
    table = random_token_table(total_steps * args.batch_size, args.sequence_length, args.vocab_size, SEED)
    table = table.map(lambda row: {"labels": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])})
    values = dict(model_config(args))
    set_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    training_args = HfTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=total_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        bf16=args.bf16,
        deepspeed=json.loads(Path(args.deepspeed_config).read_text()),
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_steps=total_steps,
        disable_tqdm=True,
        seed=SEED,
    )
    timer = _StepTimes(args.threads)
    Trainer(model=model, args=training_args, train_dataset=table, callbacks=[timer]).train()
    return throughput(timer.step_ends, args)


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    distributed.init_distributed()
    flops = flops_per_token(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peaks = [matmul_peak(dtype)]
    results: dict[str, list[Throughput]] = {UNIMM: [], TRAINER: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            results[UNIMM].append(run_unimm(args, Path(scratch) / f"unimm{repeat}"))
            results[TRAINER].append(run_trainer(args, Path(scratch) / f"trainer{repeat}"))
    peaks.append(matmul_peak(dtype))
    report(args, results, {clock: max(peak[clock] for peak in peaks) for clock in CLOCKS}, flops)


def report(
    args: BenchmarkArguments, results: dict[str, list[Throughput]], peak: dict[str, float], flops: float
) -> None:
    precision = "bf16" if args.bf16 else "fp32"
    print(
        f"model: Llama d={args.hidden_size} L={args.num_layers} vocab={args.vocab_size}, "
        f"batch {args.batch_size} x {args.sequence_length} tokens, {args.deepspeed_config}, {precision}, "
        f"{args.threads} thread(s); median step of {args.steps} after {args.warmup_steps} warm-up; "
        f"{args.repeats} interleaved repeats"
    )
    print(
        f"measured {precision} matmul peak ({args.threads} thread(s)): {peak['wall'] / 1e9:.1f} GFLOP/s wall, "
        f"{peak['cpu'] / 1e9:.1f} GFLOP per CPU-s; "
        f"model: {flops / 1e6:.1f} MFLOP/token (6N + 12·L·d·T)"
    )
    reference = {
        clock: statistics.median(getattr(item, clock) for item in results[TRAINER]) for clock in CLOCKS
    }
    header = "| runner | tokens/s wall (median) | wall, all repeats | MFU wall | tokens per CPU-s (median) | "
    print(header + "MFU CPU | vs Trainer (wall) | vs Trainer (CPU) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, items in results.items():
        median = {clock: statistics.median(getattr(item, clock) for item in items) for clock in CLOCKS}
        repeats = ", ".join(f"{item.wall:.0f}" for item in items)
        print(
            f"| {name} | {median['wall']:.0f} | {repeats} | {100 * median['wall'] * flops / peak['wall']:.1f}% "
            f"| {median['cpu']:.0f} | {100 * median['cpu'] * flops / peak['cpu']:.1f}% "
            f"| {median['wall'] / reference['wall']:.2f}x | {median['cpu'] / reference['cpu']:.2f}x |"
        )


if __name__ == "__main__":
    main()
