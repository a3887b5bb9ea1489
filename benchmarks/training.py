"""Training throughput: unimm's loop (stage ``llm_pretrain``) vs transformers' ``Trainer``.

Same model (a Llama built from one config and one seed), same data (identical random token rows), the
same DeepSpeed JSON (its "auto" values filled by each side from the same batch size, precision and
clipping), in one process, runs interleaved (ours, Trainer, ours, ...). Both are timed the same way:
the median wall-clock time between the ends of optimizer steps, after warm-up steps. MFU is model FLOPs per second
(PaLM's 6N + 12·L·d·T per token) over the machine's matmul peak, measured in this run.

    nice python benchmarks/training.py                       # ZeRO-2, fp32
    nice python benchmarks/training.py --bf16 --deepspeed_config recipes/deepspeed/zero3.json
    python benchmarks/training.py --device cuda --bf16         # one GPU: a larger model, wall clock only

The model and batch default to per-device sizes (``DEFAULTS``: the CPU's small ones, a GPU's larger ones), and
so does the matmul whose rate is the peak. On CUDA the clock is read after ``torch.cuda.synchronize`` and
only wall-clock figures are printed (``benchmarks/clocks.py``). The loop trains on DeepSpeed's accelerator:
``--device cpu`` on a GPU machine needs ``DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=`` (checked at start).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from clocks import Clock
from deepspeed.accelerator import get_accelerator
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainerCallback
from transformers import TrainingArguments as HfTrainingArguments

from unimm.training import distributed
from unimm.training.arguments import parse_recipe
from unimm.training.loop import TrainingLoop
from unimm.training.stages.llm import random_token_table

MATMUL_REPEATS = 20
SEED = 0
UNIMM, TRAINER = "unimm loop", "transformers Trainer"
CLOCKS = ("wall", "cpu")
# Per device type: the model, the batch and the side of the square matmul that measures the peak (the CPU's
# were the figures' settings; a GPU needs larger ones to be more than launch overhead).
DEFAULTS = {
    "cpu": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "sequence_length": 128, "batch_size": 8},
    "cuda": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "sequence_length": 1024, "batch_size": 8},
}
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}


@dataclass
class BenchmarkArguments:
    device: str = "cpu"  # cpu or cuda; it must be DeepSpeed's accelerator
    hidden_size: int | None = None  # None: DEFAULTS of the device
    num_layers: int | None = None
    num_heads: int | None = None
    vocab_size: int = 4096
    sequence_length: int | None = None
    batch_size: int | None = None
    steps: int = 6
    warmup_steps: int = 2
    repeats: int = 5
    bf16: bool = False
    deepspeed_config: str = "recipes/deepspeed/zero2.json"
    threads: int = 1  # one thread per process on a CPU: steadier timings on a shared machine

    def __post_init__(self) -> None:
        for name, value in DEFAULTS[torch.device(self.device).type].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


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


def matmul_peak(clock: Clock, dtype: torch.dtype) -> dict[str, float]:
    """Best FLOP/s of a square matmul on this device, now, per wall-clock and per main-clock second (CPU time on
    a CPU; the wall clock on CUDA)."""
    size = MATMUL_SIZE[clock.device.type]
    left = torch.randn(size, size, dtype=dtype, device=clock.device)
    right = torch.randn(size, size, dtype=dtype, device=clock.device)
    timings = [clock.time(torch.mm, left, right) for _ in range(MATMUL_REPEATS)]
    return {
        "wall": 2 * size**3 / min(wall for _, wall in timings),
        "cpu": 2 * size**3 / min(main for main, _ in timings),
    }


@dataclass
class Throughput:
    wall: float  # tokens per second of wall-clock time
    cpu: float  # tokens per second of the main clock: this process's CPU time on a CPU (robust to other load)


def throughput(step_ends: list[tuple[float, float]], args: BenchmarkArguments) -> Throughput:
    """Tokens of one step over the median step time after warm-up, by wall clock and by the main clock."""
    measured = step_ends[args.warmup_steps :]
    tokens = args.batch_size * args.sequence_length
    main, wall = (
        statistics.median(end[clock] - start[clock] for start, end in zip(measured, measured[1:]))
        for clock in range(2)
    )
    return Throughput(wall=tokens / wall, cpu=tokens / main)


class _TimedLoop(TrainingLoop):
    """Our loop, recording when each optimizer step ends (``clock.read()``)."""

    clock: Clock

    def _on_step_end(self) -> None:
        self.step_ends.append(self.clock.read())
        super()._on_step_end()


def run_unimm(args: BenchmarkArguments, clock: Clock, output_dir: Path) -> Throughput:
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
    clock.pin_threads(args.threads)  # a previous Trainer run may have changed it
    loop = _TimedLoop(recipe)
    loop.step_ends, loop.clock = [], clock
    loop.run()
    return throughput(loop.step_ends, args)


class _StepTimes(TrainerCallback):
    def __init__(self, threads: int, clock: Clock) -> None:
        self.threads, self.clock = threads, clock
        self.step_ends: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # accelerate's state sets torch's thread count (to 2 here); compare at the same count.
        self.clock.pin_threads(self.threads)

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(self.clock.read())


def run_trainer(args: BenchmarkArguments, clock: Clock, output_dir: Path) -> Throughput:
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
        use_cpu=not clock.is_cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=total_steps,
        disable_tqdm=True,
        seed=SEED,
    )
    timer = _StepTimes(args.threads, clock)
    Trainer(model=model, args=training_args, train_dataset=table, callbacks=[timer]).train()
    return throughput(timer.step_ends, args)


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    clock = Clock(torch.device(args.device))
    clock.pin_threads(args.threads)
    accelerator = get_accelerator().device_name()
    if accelerator != clock.device.type:
        raise SystemExit(
            f"--device {args.device}, but DeepSpeed's accelerator is {accelerator}: for a CPU run on a GPU machine "
            "set DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="
        )
    distributed.init_distributed()
    flops = flops_per_token(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peaks = [matmul_peak(clock, dtype)]
    results: dict[str, list[Throughput]] = {UNIMM: [], TRAINER: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            results[UNIMM].append(run_unimm(args, clock, Path(scratch) / f"unimm{repeat}"))
            results[TRAINER].append(run_trainer(args, clock, Path(scratch) / f"trainer{repeat}"))
    peaks.append(matmul_peak(clock, dtype))
    report(args, clock, results, {name: max(peak[name] for peak in peaks) for name in CLOCKS}, flops)


def report(
    args: BenchmarkArguments,
    clock: Clock,
    results: dict[str, list[Throughput]],
    peak: dict[str, float],
    flops: float,
) -> None:
    precision = "bf16" if args.bf16 else "fp32"
    where = clock.describe() if clock.is_cuda else f"{args.threads} thread(s)"
    print(
        f"model: Llama d={args.hidden_size} L={args.num_layers} vocab={args.vocab_size}, "
        f"batch {args.batch_size} x {args.sequence_length} tokens, {args.deepspeed_config}, {precision}, "
        f"{where}; median step of {args.steps} after {args.warmup_steps} warm-up; "
        f"{args.repeats} interleaved repeats"
    )
    per_cpu_second = "" if clock.is_cuda else f", {peak['cpu'] / 1e9:.1f} GFLOP per CPU-s"
    print(
        f"measured {precision} matmul peak ({where}): {peak['wall'] / 1e9:.1f} GFLOP/s wall{per_cpu_second}; "
        f"model: {flops / 1e6:.1f} MFLOP/token (6N + 12·L·d·T)"
    )
    if clock.is_cuda:  # one clock: the CPU-time columns would repeat the wall-clock ones
        report_wall_clock(results, peak, flops)
        return
    reference = {name: statistics.median(getattr(item, name) for item in results[TRAINER]) for name in CLOCKS}
    header = "| runner | tokens/s wall (median) | wall, all repeats | MFU wall | tokens per CPU-s (median) | "
    print(header + "MFU CPU | vs Trainer (wall) | vs Trainer (CPU) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, items in results.items():
        median = {name: statistics.median(getattr(item, name) for item in items) for name in CLOCKS}
        repeats = ", ".join(f"{item.wall:.0f}" for item in items)
        print(
            f"| {name} | {median['wall']:.0f} | {repeats} | {100 * median['wall'] * flops / peak['wall']:.1f}% "
            f"| {median['cpu']:.0f} | {100 * median['cpu'] * flops / peak['cpu']:.1f}% "
            f"| {median['wall'] / reference['wall']:.2f}x | {median['cpu'] / reference['cpu']:.2f}x |"
        )


def report_wall_clock(results: dict[str, list[Throughput]], peak: dict[str, float], flops: float) -> None:
    reference = statistics.median(item.wall for item in results[TRAINER])
    print("| runner | tokens/s wall (median) | wall, all repeats | MFU wall | vs Trainer (wall) |")
    print("|---|---:|---|---:|---:|")
    for name, items in results.items():
        median = statistics.median(item.wall for item in items)
        repeats = ", ".join(f"{item.wall:.0f}" for item in items)
        mfu = 100 * median * flops / peak["wall"]
        print(f"| {name} | {median:.0f} | {repeats} | {mfu:.1f}% | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
