"""Training throughput: unimm's loop (stage ``llm_pretrain``) vs transformers' ``Trainer``.

Same model (a Llama built from one config and one seed), same data (identical random token rows), the
same DeepSpeed JSON (its "auto" values filled by each side from the same batch size, precision and
clipping), in one process, runs interleaved (ours, Trainer, ours, ...). Both are timed the same way:
the median wall-clock time between the ends of optimizer steps, after warm-up steps. MFU is model FLOPs per second
(PaLM's 6N + 12·L·d·T per token) over the machine's matmul peak, measured in this run.

    nice python benchmarks/training.py                       # ZeRO-2, fp32
    nice python benchmarks/training.py --model smollm2-lora  # the SmolLM2 recipe's LoRA on its own chat rows
    nice python benchmarks/training.py --bf16 --deepspeed_config recipes/deepspeed/zero3.json
    python benchmarks/training.py --device cuda --bf16         # one GPU: a larger model, wall clock only

The model and batch default to per-device sizes (``DEFAULTS``: the CPU's small ones, a GPU's larger ones), and
so does the matmul whose rate is the peak. On CUDA the clock is read after ``torch.cuda.synchronize`` and
only wall-clock figures are printed (``benchmarks/clocks.py``). The loop trains on DeepSpeed's accelerator:
``--device cpu`` on a GPU machine needs ``DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=`` (checked at start).

``--model smollm2-lora`` measures what the SmolLM2 recipe trains: SmolLM2-135M-Instruct with the image vocabulary
(``make assets``), the LoRA, precision, DeepSpeed config, length and batch of ``recipes/smollm2/llm.yaml``, on
chat rows made by ``unimm prepare recipes/smollm2/prepare.yaml`` (a small set is prepared first, with a visual
tokenizer of the recipe's shape trained for one step: the rows have the recipe's layout and lengths). The unit is
useful tokens, positions with a target, per second: the Trainer gets the same model and rows, padded by
``DataCollatorForSeq2Seq``, and computes its loss the transformers way (logits at every position); our loop
runs with the recipe's settings (``shared_prefix``, ``group_by_length``, ``packing``, ``torch_compile``) and, as
ablations, with each of them switched. Rows grouped by length are sorted ``--length_group_batches`` batches at a time in the timed runs
(the recipe's own runs sort 50 at a time, which pads less): ``--steps`` and ``--warmup_steps`` are multiples of it,
so the timed steps hold whole groups, a random sample of rows as a shuffled order's batches are.

    python benchmarks/training.py --model smollm2-lora --warmup_steps 8 --steps 8 --length_group_batches 8
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
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
)
from transformers import TrainingArguments as HfTrainingArguments

from unimm.llm.modeling_unimm import IGNORE_INDEX
from unimm.training import distributed
from unimm.training.arguments import load_recipe, parse_recipe, read_recipe_file
from unimm.training.loop import TrainingLoop, train
from unimm.training.prepare import load_prepare_recipe, prepare
from unimm.training.stages.llm import load_token_table, random_token_table

MATMUL_REPEATS = 20
SEED = 0
UNIMM, TRAINER = "unimm loop", "transformers Trainer"
TINY_LLAMA, SMOLLM2_LORA = "tiny-llama", "smollm2-lora"
SMOLLM2_RECIPES = Path("recipes/smollm2")
# The small prepared set of --model smollm2-lora: the recipe's sources (their prompts and answers), images per
# source capped (enough rows for every step of every run).
SMOLLM2_IMAGES = {"fashion_mnist": 600, "emoji": 200}
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
    model: str = (
        TINY_LLAMA  # tiny-llama (random token rows) or smollm2-lora (the SmolLM2 recipe, its own rows)
    )
    prepared: str | None = None  # smollm2-lora: a `unimm prepare` output to train on (default: a small one)
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
    torch_compile: bool = False  # tiny-llama: our loop with torch_compile: true too (the Trainer stays eager)
    deepspeed_config: str = "recipes/deepspeed/zero2.json"
    threads: int = 1  # one thread per process on a CPU: steadier timings on a shared machine
    # smollm2-lora with group_by_length: batches per sorted group in the timed runs. Sorted groups are random
    # samples only as wholes (each starts with its longest rows), so --warmup_steps and --steps must be
    # multiples of it: the timed steps then cover whole groups, the rows a random batch order would give.
    length_group_batches: int = 2

    def __post_init__(self) -> None:
        if self.model not in (TINY_LLAMA, SMOLLM2_LORA):
            raise ValueError(f"--model must be {TINY_LLAMA} or {SMOLLM2_LORA}, got {self.model!r}")
        if self.warmup_steps < 1:
            raise ValueError("--warmup_steps must be >= 1 (the first step's end starts the clock)")
        if self.model == SMOLLM2_LORA and (
            self.steps % self.length_group_batches or self.warmup_steps % self.length_group_batches
        ):
            raise ValueError(
                f"--steps ({self.steps}) and --warmup_steps ({self.warmup_steps}) must be multiples of "
                f"--length_group_batches ({self.length_group_batches}): the timed steps must be whole sorted groups"
            )
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


def run_unimm(args: BenchmarkArguments, clock: Clock, output_dir: Path, compiled: bool) -> Throughput:
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
            "torch_compile": compiled,
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


def trainer_arguments(
    output_dir: Path,
    clock: Clock,
    batch_size: int,
    steps: int,
    learning_rate: float,
    bf16: bool,
    deepspeed_config: str,
    **extra,
) -> HfTrainingArguments:
    """The Trainer's settings for a timed run: constant rate, no saving, no progress bar, one log at the end."""
    return HfTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        bf16=bf16,
        deepspeed=json.loads(Path(deepspeed_config).read_text()),
        use_cpu=not clock.is_cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        seed=SEED,
        **extra,
    )


def run_trainer(args: BenchmarkArguments, clock: Clock, output_dir: Path) -> Throughput:
    total_steps = args.warmup_steps + args.steps
    table = random_token_table(total_steps * args.batch_size, args.sequence_length, args.vocab_size, SEED)
    table = table.map(lambda row: {"labels": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])})
    values = dict(model_config(args))
    set_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    training_args = trainer_arguments(
        output_dir, clock, args.batch_size, total_steps, 1e-4, args.bf16, args.deepspeed_config
    )
    timer = _StepTimes(args.threads, clock)
    Trainer(model=model, args=training_args, train_dataset=table, callbacks=[timer]).train()
    return throughput(timer.step_ends, args)


# ------------------------------------------------------------------------------ --model smollm2-lora
def prepare_small_set(scratch: Path) -> Path:
    """The SmolLM2 recipe's data at a small size: a visual tokenizer of the recipe's shape (one training step:
    the codes are meaningless, their count per image is the recipe's) and `unimm prepare` of its chat rows
    (no text replay: its rows are SmolLM2's own answers, half an hour to generate)."""
    tokenizer = train(
        load_recipe(
            SMOLLM2_RECIPES / "tokenizer.yaml",
            [
                f"output_dir={scratch / 'tokenizer'}",
                "max_steps=1",
                "per_device_train_batch_size=8",
                "warmup_steps=0",
                "max_eval_samples=8",
                "per_device_eval_batch_size=8",
                "eval_steps=0",
                "sample_steps=0",
                "num_sample_images=0",
            ],
        )
    )
    arguments = load_prepare_recipe(
        SMOLLM2_RECIPES / "prepare.yaml",
        [
            f"visual_tokenizer={tokenizer.export_dir}",
            f"output_dir={scratch / 'prepared'}",
            "text_replay_fraction=0",
            f"sources={json.dumps(smollm2_sources())}",
            "max_eval_samples=8",
        ],
    )
    prepare(arguments)
    return scratch / "prepared"


def smollm2_sources() -> list[dict]:
    """``prepare.yaml``'s sources, each with its image count capped at ``SMOLLM2_IMAGES``."""
    sources = read_recipe_file(SMOLLM2_RECIPES / "prepare.yaml")["sources"]
    return [{**source, "max_train_samples": SMOLLM2_IMAGES[source["dataset"]]} for source in sources]


def smollm2_recipe(args: BenchmarkArguments, prepared: Path, output_dir: Path, **settings) -> dict:
    """The LLM recipe's mapping, on ``prepared``, for ``warmup_steps + steps`` steps, nothing written."""
    values = read_recipe_file(SMOLLM2_RECIPES / "llm.yaml")
    values.update(
        {
            "output_dir": str(output_dir),
            "model_name_or_path": str(prepared / "init"),
            "train_dataset": str(prepared / "train"),
            "eval_dataset": None,
            "text_kl_weight": 0.0,  # the Trainer has no anchor: both sides train the plain next-token loss
            "max_steps": args.warmup_steps + args.steps,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "logging_steps": args.warmup_steps + args.steps,
            "save_steps": args.warmup_steps + args.steps,
            "sample_steps": 0,
            "eval_tasks": None,
            "export_at_end": False,
            "resume_from_checkpoint": "never",
            "seed": SEED,
            **settings,
        }
    )
    if values.get("group_by_length"):
        values["length_group_batches"] = args.length_group_batches
    return values


def useful_throughput(
    step_ends: list[tuple[float, float]], targets: list[int], warmup_steps: int
) -> Throughput:
    """Positions with a target per second, over the steps after warm-up (each step's count from its batch)."""
    useful = sum(targets[warmup_steps : len(step_ends)])
    start, end = step_ends[warmup_steps - 1], step_ends[-1]
    return Throughput(wall=useful / (end[1] - start[1]), cpu=useful / (end[0] - start[0]))


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # labels are shifted inside the model


class _CountingLoop(_TimedLoop):
    """Also counts each micro-batch's targets, on the host batch."""

    def _micro_step(self, batch) -> None:
        self.targets.append(count_targets(batch["labels"]))
        super()._micro_step(batch)


def run_unimm_smollm2(args: BenchmarkArguments, clock: Clock, prepared: Path, output_dir: Path, **settings):
    clock.pin_threads(args.threads)
    loop = _CountingLoop(
        parse_recipe(smollm2_recipe(args, prepared, output_dir, **settings), base_dir=SMOLLM2_RECIPES)
    )
    loop.step_ends, loop.targets, loop.clock = [], [], clock
    loop.run()
    return useful_throughput(loop.step_ends, loop.targets, args.warmup_steps)


class _CountingCollator:
    """transformers' padding collator for rows with labels, counting each batch's targets in order."""

    def __init__(self, tokenizer) -> None:
        self.collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        self.targets: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.targets.append(count_targets(batch["labels"]))
        return batch


def run_trainer_smollm2(
    args: BenchmarkArguments, clock: Clock, prepared: Path, output_dir: Path
) -> Throughput:
    recipe = parse_recipe(smollm2_recipe(args, prepared, output_dir), base_dir=SMOLLM2_RECIPES)
    stage_args = recipe.stage_args
    set_seed(SEED)
    model = recipe.build_stage().build_model()  # the same model and LoRA as our loop's
    table = load_token_table(stage_args.train_dataset, "train_dataset").select_columns(
        ["input_ids", "labels"]
    )
    collator = _CountingCollator(AutoTokenizer.from_pretrained(prepared / "init"))
    training = recipe.training
    training_args = trainer_arguments(
        output_dir,
        clock,
        training.per_device_train_batch_size,
        training.max_steps,
        training.learning_rate,
        training.bf16,
        training.deepspeed_config,
        remove_unused_columns=False,  # the rows hold only what the model takes
    )
    timer = _StepTimes(args.threads, clock)
    Trainer(
        model=model, args=training_args, train_dataset=table, data_collator=collator, callbacks=[timer]
    ).train()
    return useful_throughput(timer.step_ends, collator.targets, args.warmup_steps)


def benchmark_smollm2(args: BenchmarkArguments, clock: Clock) -> None:
    recipe = read_recipe_file(SMOLLM2_RECIPES / "llm.yaml")
    packing, compiled = recipe.get("packing", False), recipe.get("torch_compile", False)
    grouped, shared = recipe.get("group_by_length", False), recipe.get("shared_prefix", False)
    regions = compiled and recipe.get("torch_compile_regions", False)
    compile_name = {False: "eager", True: "compiled"}
    recipe_compile = "compiled by layer" if regions else compile_name[compiled]
    rows = "packed rows" if packing else "rows grouped by length" if grouped else "padded rows"
    rows += ", shared prefix" if shared else ""
    # Our loop as the recipe runs it, then one lever at a time (packing replaces grouping by length and the
    # shared prefix).
    variants = {f"{UNIMM} (the recipe: {rows}, {recipe_compile})": {}}
    if not packing:  # grouping by length and the shared prefix need unpacked rows
        variants[f"{UNIMM} (shared_prefix {not shared}, {recipe_compile})"] = {"shared_prefix": not shared}
        variants[f"{UNIMM} (group_by_length {not grouped}, {recipe_compile})"] = {
            "group_by_length": not grouped
        }
    variants[f"{UNIMM} (packing {not packing}, {recipe_compile})"] = {
        "packing": not packing,
        "group_by_length": False,
        "shared_prefix": False,
    }
    variants[f"{UNIMM} ({rows}, {compile_name[not compiled]})"] = {
        "torch_compile": not compiled,
        "torch_compile_regions": False,
    }
    results: dict[str, list[Throughput]] = {name: [] for name in [*variants, TRAINER]}
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(args.prepared) if args.prepared else prepare_small_set(Path(scratch))
        for repeat in range(args.repeats):
            run = Path(scratch) / f"run{repeat}"
            for index, (name, settings) in enumerate(variants.items()):
                results[name].append(
                    run_unimm_smollm2(args, clock, prepared, run / f"unimm{index}", **settings)
                )
            results[TRAINER].append(run_trainer_smollm2(args, clock, prepared, run / "trainer"))
    precision = "bf16" if recipe.get("bf16") else "fp32"
    print(
        f"model: SmolLM2-135M-Instruct + image vocabulary, LoRA r{recipe['lora_rank']} on "
        f"{recipe['lora_target_modules']} + image rows, {recipe['deepspeed_config']}, {precision}, batch "
        f"{recipe['per_device_train_batch_size']} rows (max_length {recipe['max_length']}) of the recipe's chats; "
        f"{args.threads} thread(s); {args.steps} steps after {args.warmup_steps} warm-up; {args.repeats} "
        "interleaved repeats; useful tokens = positions with a target"
    )
    print_table(results, clock, unit="useful tokens/s")


def print_table(results: dict[str, list[Throughput]], clock: Clock, unit: str, mfu=None) -> None:
    """One row per runner: medians over the repeats, every repeat's wall figure, ratios to the Trainer."""
    reference = {name: statistics.median(getattr(item, name) for item in results[TRAINER]) for name in CLOCKS}
    columns = [f"{unit} wall (median)", "wall, all repeats"] + (["MFU wall"] if mfu else [])
    if not clock.is_cuda:
        columns += [f"{unit} per CPU-s (median)"] + (["MFU CPU"] if mfu else [])
    columns += ["vs Trainer (wall)"] + ([] if clock.is_cuda else ["vs Trainer (CPU)"])
    print("| runner | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, items in results.items():
        median = {name: statistics.median(getattr(item, name) for item in items) for name in CLOCKS}
        cells = [f"{median['wall']:.0f}", ", ".join(f"{item.wall:.0f}" for item in items)]
        cells += [f"{100 * mfu('wall', median['wall']):.1f}%"] if mfu else []
        if not clock.is_cuda:
            cells += [f"{median['cpu']:.0f}"] + ([f"{100 * mfu('cpu', median['cpu']):.1f}%"] if mfu else [])
        cells += [f"{median['wall'] / reference['wall']:.2f}x"]
        cells += [] if clock.is_cuda else [f"{median['cpu'] / reference['cpu']:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


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
    if args.model == SMOLLM2_LORA:
        benchmark_smollm2(args, clock)
        return
    flops = flops_per_token(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peaks = [matmul_peak(clock, dtype)]
    # With --torch_compile, our loop compiled and eager (the Trainer keeps its default: eager).
    variants = {f"{UNIMM} (compiled)": True, UNIMM: False} if args.torch_compile else {UNIMM: False}
    results: dict[str, list[Throughput]] = {name: [] for name in [*variants, TRAINER]}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for index, (name, compiled) in enumerate(variants.items()):
                results[name].append(
                    run_unimm(args, clock, Path(scratch) / f"unimm{repeat}-{index}", compiled)
                )
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
    print_table(results, clock, unit="tokens/s", mfu=lambda name, rate: rate * flops / peak[name])


if __name__ == "__main__":
    main()
