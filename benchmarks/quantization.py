"""Quantized language-model weights against float32 and bfloat16 on a checkpoint, in one run: image-token
decode speed, memory, and quality (understanding accuracy, judged generation correctness).

Each row is one way of loading the checkpoint's LLM; the visual tokenizer and the decoders stay in float32,
so every difference is the LLM's:

- ``fp32``, ``bf16``: ``UniMMForCausalLM.from_pretrained(..., dtype=...)``;
- ``int8``, ``int8-bf16``: int8 weight-only (``load_quantized_llm(..., "int8")`` of
  ``unimm/pipelines/quantization.py``, torchao through transformers' ``TorchAoConfig``) with float32 or bfloat16
  activations and unquantized weights (embeddings, head);
- ``int8-dynamic``, ``int8-dynamic-bf16``: the same int8 weights with each activation row quantized to int8 as
  it comes (``load_quantized_llm(..., "int8-dynamic")``, torchao's ``Int8DynamicActivationInt8WeightConfig``),
  int8 by int8 products; float32 or bfloat16 elsewhere.

Speed: ``llm.generate_multimodal(mode="image")`` over the first text-to-image prompts of the demo report (the
checkpoint's default grid, guidance 3, sampled codes, seed 0), the same call for every row, at each batch size.
Image tokens (codebook ids) per second of CPU time of this process (CPU time is what other jobs on a shared
machine disturb least; the whole run uses ``--threads`` torch threads, default 1), the wall-clock rate below the
table; rows are interleaved and the median of ``--repeats`` is reported, after one warm-up call. ``--compile`` times the engine's ``compile=True``
path too (a one-off compile per row and batch size, in the warm-up); a row whose compile fails says so.

Memory, per row: the bytes of the LLM's weights as stored (an int8 tensor counts its int8 data and its scales);
then, in a fresh process, what loading the LLM and decoding one batch of the largest batch size add at their
peaks to its resident memory (Linux ``VmHWM``, reset before each phase): while loading (transformers
materialises weights in the checkpoint's dtype before it casts or quantizes them), and while decoding - weights,
KV cache and activations, which is the model's footprint in use: a checkpoint already in the row's dtype is
memory-mapped, its weights resident once decoding reads them, and the memory freed after loading is handed back
first (glibc's ``malloc_trim``; without it an int8 load keeps the RSS of the full-precision weights it replaced,
free for the process to reuse). torchao is imported in every probe beforehand, so that its code is not counted
against int8.

Quality: with the pipeline's evaluation functions (``unimm.evaluation.report``), the first ``--understanding``
Fashion-MNIST test images asked "What is this?" (greedy answers), and ``--images-per-class`` images per class
generated from captions (pixel decoder, guidance 3, seed 0) and classified by the packaged judge. Generated
codes are sampled, so two rows differ by sampling noise too: at 90% correctness over 1,000 images, one standard
deviation of a difference is about 1.3 points. The defaults are the sizes of ``unimm eval``'s demo report.

``--shape smollm2-135m`` times speed and memory on a randomly initialised LLM of SmolLM2-135M's size (30 layers,
hidden 576, tied 49k-token embeddings) with the checkpoint's image vocabulary, in a temporary folder: the demo
LLM's 14 MB of float32 weights fit in a CPU's caches, so its decoding is not bound by memory and cannot show
what int8 weights save; quality is still the checkpoint's.

    python benchmarks/quantization.py [--checkpoint checkpoints/demo] [--rows fp32 bf16 int8 int8-bf16]
        [--batch-sizes 1 16] [--repeats 3] [--compile] [--shape smollm2-135m] [--understanding 1000]
        [--images-per-class 100] [--no-quality]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import LlamaConfig

from unimm import UniMMPipeline
from unimm.data.demo_datasets import load_fashion_mnist
from unimm.evaluation.judge import images_to_tensor, judge_outputs, load_judge
from unimm.evaluation.report import evaluate_understanding, generate_from_prompts, generation_prompts
from unimm.llm import ModalitySampling, UniMMConfig, UniMMForCausalLM
from unimm.pipelines.quantization import load_quantized_llm

# row name -> (LLM dtype, quantization)
ROWS = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.float32, "int8"),
    "int8-bf16": (torch.bfloat16, "int8"),
    "int8-dynamic": (torch.float32, "int8-dynamic"),
    "int8-dynamic-bf16": (torch.bfloat16, "int8-dynamic"),
}
GUIDANCE_SCALE = 3.0
SEED = 0
# Backbone shapes for ``--shape``: speed and memory on a randomly initialised LM of a real model's size (they do
# not depend on the weights' values), where a decode step streams more weight bytes than a CPU's caches hold.
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
        tie_word_embeddings=True, rope_theta=100000.0,
    ),
}  # fmt: skip


def load_llm(folder: Path, row: str) -> UniMMForCausalLM:
    dtype, quantization = ROWS[row]
    if quantization is None:
        return UniMMForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return load_quantized_llm(folder, quantization, dtype=dtype).eval()


def save_shaped_llm(checkpoint: Path, shape: str, folder: Path) -> Path:
    """A randomly initialised LLM of a named backbone shape (:data:`SHAPES`) with the checkpoint's image
    vocabulary and special tokens, saved to ``folder``: the checkpoint's prompts run on it unchanged."""
    reference = UniMMConfig.from_pretrained(checkpoint / "llm")
    special = {
        name: getattr(reference.text_config, name)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id")
    }
    grids = ("max_grid_height", "max_grid_width", "default_grid_height", "default_grid_width")
    config = UniMMConfig(
        text_config=LlamaConfig(**SHAPES[shape], **special).to_dict(),
        codebook_size=reference.codebook_size,
        **{name: getattr(reference, name) for name in grids},
    )
    torch.manual_seed(SEED)
    UniMMForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)  # as checkpoints are published
    return folder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers as stored: a tensor subclass (torchao's quantized tensors) counts
    its inner tensors (int8 data, scales)."""

    def nbytes(tensor: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            return sum(nbytes(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(nbytes(tensor) for tensor in tensors.values())


# ---------------------------------------------------------------------------------------------- speed
@dataclass
class DecodeCall:
    """One batched image-generation call of the engine, the same for every row."""

    prompt_ids: list[list[int]]
    unconditional_ids: list[list[int]]
    compile: bool = False

    def __call__(self, llm: UniMMForCausalLM) -> None:
        llm.generate_multimodal(
            self.prompt_ids,
            mode="image",
            guidance_scale=GUIDANCE_SCALE,
            unconditional_input_ids=self.unconditional_ids,
            image_sampling=ModalitySampling(do_sample=True),
            seed=SEED,
            compile=self.compile,
        )


def decode_call(pipeline: UniMMPipeline, batch: int, compile: bool) -> DecodeCall:
    prompts, _ = generation_prompts(batch)  # batch per class; the first `batch` prompts are used
    prompt_ids, unconditional_ids = pipeline.image_prompt_ids(prompts[:batch])
    return DecodeCall(prompt_ids, unconditional_ids, compile)


def interleaved_rates(
    runners: dict[str, Callable[[], None]], repeats: int, tokens: int
) -> dict[str, tuple[float, float] | str]:
    """Image tokens per (CPU second, wall second), median of ``repeats`` interleaved runs after a warm-up;
    a runner that raises is reported by its error."""
    results: dict[str, tuple[float, float] | str] = {}
    times: dict[str, list[tuple[float, float]]] = {}
    for name, run in runners.items():
        try:
            run()  # warm-up (the compile, for compiled runners)
            times[name] = []
        except Exception as error:  # reported in the table
            results[name] = f"{name} fails: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
    for _ in range(repeats):
        for name in times:
            cpu, wall = time.process_time(), time.perf_counter()
            runners[name]()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    for name, measured in times.items():
        cpu = statistics.median(t[0] for t in measured)
        wall = statistics.median(t[1] for t in measured)
        results[name] = (tokens / cpu, tokens / wall)
    return results


def measure_speed(args, pipeline: UniMMPipeline, llms: dict[str, UniMMForCausalLM]) -> dict:
    grid = pipeline.image_grid()
    modes = [False, True] if args.compile else [False]
    speed: dict[tuple[str, int, bool], tuple[float, float] | str] = {}
    for batch in args.batch_sizes:
        for compile in modes:
            call = decode_call(pipeline, batch, compile)
            runners = {row: functools.partial(call, llm) for row, llm in llms.items()}
            rates = interleaved_rates(runners, args.repeats, batch * grid[0] * grid[1])
            for row, rate in rates.items():
                speed[row, batch, compile] = rate
                print(f"  speed {row} batch {batch}{' compiled' if compile else ''}: {rate}", flush=True)
    return speed


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_probe(args) -> None:
    """In a fresh process: what loading one row's LLM and decoding one batch (prompts as JSON on stdin) add to
    the resident memory at its peak (bytes), while loading and while decoding. Linux: the high-water mark is
    reset to the current RSS before each phase."""
    import torchao  # noqa: F401 - its import is not the row's memory

    call = DecodeCall(**json.loads(sys.stdin.read()))
    gc.collect()
    base = _reset_peak()
    llm = load_llm(args.llm_folder, args.memory_probe)
    load_peak = _status_kib("VmHWM") - base
    _return_freed_memory()
    _reset_peak()
    call(llm)
    decode_peak = _status_kib("VmHWM") - base
    print(json.dumps({"load_peak": load_peak * 1024, "decode_peak": decode_peak * 1024}))


def _return_freed_memory() -> None:
    """Hand the memory freed while loading back to the system: glibc's allocator keeps it otherwise (for the
    process to reuse), and the RSS of an int8 load would still show the full-precision weights it replaced."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> int:
    """The current RSS (KiB), to which the high-water mark ``VmHWM`` is reset."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmHWM")


def measure_memory(args, row: str, call: DecodeCall) -> dict[str, int]:
    """:func:`memory_probe` of ``row`` in a fresh process (empty if it failed)."""
    command = [sys.executable, __file__, "--memory-probe", row, "--llm-folder", str(args.llm_folder)]
    command += ["--threads", str(args.threads)]
    prompts = json.dumps({"prompt_ids": call.prompt_ids, "unconditional_ids": call.unconditional_ids})
    done = subprocess.run(command, input=prompts, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"  memory probe of {row} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return {}


def measure_speed_and_memory(args) -> tuple[dict[str, dict], dict]:
    """Per row, the weights' bytes and the memory of a fresh process; the decode rates, rows interleaved."""
    pipeline = UniMMPipeline.from_pretrained(args.checkpoint)  # float32, for the prompts
    llms = {row: load_llm(args.llm_folder, row) for row in args.rows}
    largest = decode_call(pipeline, max(args.batch_sizes), compile=False)
    results = {
        row: {"weight_bytes": weight_bytes(llm), **measure_memory(args, row, largest)}
        for row, llm in llms.items()
    }
    return results, measure_speed(args, pipeline, llms)


# ---------------------------------------------------------------------------------------------- quality
def measure_quality(args, pipeline: UniMMPipeline) -> tuple[float, float]:
    """(understanding accuracy, generation correctness) of ``pipeline`` on the fixed held-out set."""
    test = load_fashion_mnist(32, mode="RGB")["test"].select(range(args.understanding))
    images = [segments[0]["image"] for segments in test["segments"]]
    labels = torch.tensor(test["label"])
    predictions, _ = evaluate_understanding(pipeline, images, args.batch_size, seed=SEED)
    understanding = (predictions == labels).float().mean().item()
    prompts, prompt_labels = generation_prompts(args.images_per_class)
    generated = generate_from_prompts(
        pipeline, prompts, "generation", args.batch_size, GUIDANCE_SCALE, decoder="pixel", seed=SEED
    )
    judged, _ = judge_outputs(load_judge(), images_to_tensor(generated))
    return understanding, (judged == prompt_labels).float().mean().item()


# ---------------------------------------------------------------------------------------------- report
def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(value: float, base: float | None) -> str:
    return "" if base is None else f" ({value / base:.2f}x)"


def render(args, results: dict[str, dict], speed: dict, reference: str = "fp32") -> str:
    """The markdown table: one row per way of loading the LLM, ratios (and accuracy points) against
    ``reference``."""
    modes = [False, True] if args.compile else [False]
    columns = [(batch, compile) for compile in modes for batch in args.batch_sizes]
    memory = {"load_peak": "peak MB loading", "decode_peak": "peak MB decoding"}
    header = ["LLM", "weights MB", *memory.values()]
    header += [f"image tok/CPU-s, batch {b}{' compiled' if c else ''}" for b, c in columns]
    header += ["understanding", "generation"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results.get(reference, {})
    for row, result in results.items():
        cells = [
            row,
            f"{result['weight_bytes'] / 1e6:.2f}{_ratio(result['weight_bytes'], base.get('weight_bytes'))}",
        ]
        for key in memory:
            value = result.get(key)
            cells.append("-" if value is None else f"{value / 1e6:.1f}{_ratio(value, base.get(key))}")
        for batch, compile in columns:
            value, base_value = speed.get((row, batch, compile)), speed.get((reference, batch, compile))
            if not isinstance(value, tuple):
                cells.append("fails" if value else "-")
                continue
            base_rate = base_value[0] if isinstance(base_value, tuple) else None
            cells.append(f"{_rate(value[0])}{_ratio(value[0], base_rate)}")
        for metric in ("understanding", "generation"):
            value = result.get(metric)
            if value is None:
                cells.append("-")
                continue
            points = (
                "" if row == reference or metric not in base else f" ({100 * (value - base[metric]):+.1f})"
            )
            cells.append(f"{100 * value:.1f}%{points}")
        lines.append("| " + " | ".join(cells) + " |")
    walls = [
        f"{row} b{batch}{' compiled' if compile else ''}: {_rate(value[1])}"
        for (row, batch, compile), value in speed.items()
        if isinstance(value, tuple)
    ]
    failures = sorted({value for value in speed.values() if isinstance(value, str)})
    return "\n".join([*lines, "", "image tokens per wall second: " + ", ".join(walls), *failures])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/demo"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--compile", action="store_true", help="also time the engine's compile=True path")
    parser.add_argument("--understanding", type=int, default=1000, help="Fashion-MNIST test images asked")
    parser.add_argument("--images-per-class", type=int, default=100, help="generated and judged, 10 classes")
    parser.add_argument("--batch-size", type=int, default=250, help="conversations or images per call")
    parser.add_argument("--no-quality", action="store_true", help="speed and memory only")
    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        help="time speed and memory on a random LLM of this size with the checkpoint's image vocabulary "
        "(quality stays the checkpoint's)",
    )
    parser.add_argument("--memory-probe", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--llm-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)

    with tempfile.TemporaryDirectory() as scratch:
        args.llm_folder = args.checkpoint / "llm"
        if args.shape:
            args.llm_folder = save_shaped_llm(args.checkpoint, args.shape, Path(scratch))
        results, speed = measure_speed_and_memory(args)
    if not args.no_quality:
        for row in args.rows:
            start = time.perf_counter()
            llm = load_llm(args.checkpoint / "llm", row)
            row_pipeline = UniMMPipeline.from_pretrained(args.checkpoint, llm=llm)
            results[row]["understanding"], results[row]["generation"] = measure_quality(args, row_pipeline)
            print(f"  quality {row}: {results[row]} ({time.perf_counter() - start:.0f} s)", flush=True)
    timed = f"a random LLM of {args.shape}'s shape" if args.shape else "the checkpoint's LLM"
    print(f"\n{args.checkpoint}; speed and memory: {timed}; torch {torch.__version__}, {args.threads} "
          f"thread(s), median of {args.repeats}; understanding over {args.understanding} images, generation "
          f"over {10 * args.images_per_class}; ratios and points against fp32\n")  # fmt: skip
    print(render(args, results, speed))


if __name__ == "__main__":
    main()
