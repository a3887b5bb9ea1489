"""The compiled decode step's linear layers at a few rows, kernel against kernel, in one run.

A stack of MLP blocks of SmolLM2-135M's shape (hidden 576, intermediate 1536, gate / up / down, bfloat16, no
bias; ``--layers`` of them, 30 as in the model), run at ``--rows`` rows (2: one image with guidance) under
``torch.compile`` with :class:`unimm.llm.decode_kernels.FusedDecodeMode`. Rows:

- ``bf16, bf16 products``: the reference, the rowwise reduction as it was before it multiplied in float32 (each
  product rounded to bfloat16 before the sum);
- ``bf16``: :func:`~unimm.llm.decode_kernels.rowwise_linear` as it is (products and sums in float32);
- ``int8``: torchao's int8 weight-only weights (``Int8WeightOnlyConfig``), reduced over their int8 values;
- ``int8-dynamic, _int_mm``: torchao's int8 weights with int8 activations through ``torch._int_mm`` at every
  row count (what the engine did before);
- ``int8-dynamic``: the same through the float32 reductions of the int8 values at a few rows (as it is now).

Each row is compiled once, warmed up, then timed as the median of ``--repeats`` batches of ``--calls`` calls
(wall clock; ``--threads`` torch threads, default 1). The table prints milliseconds per stack and the speed
relative to the reference.

    python benchmarks/decode_kernels.py [--layers 30] [--rows 2] [--threads 1] [--repeats 5] [--calls 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unimm.llm import decode_kernels
from unimm.llm.decode_kernels import FusedDecodeMode

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M


class BfloatProductsMode(FusedDecodeMode):
    """The reference: plain linears of a few rows as one reduction per row with bfloat16 products."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and decode_kernels.is_plain(args[1]):
            input, weight = args[0], args[1]
            rows = input.reshape(-1, input.shape[-1])  # (M, in)
            output = torch.stack([(row * weight).sum(-1) for row in rows.unbind(0)])  # (M, out)
            return output.reshape(*input.shape[:-1], weight.shape[0])
        return super().__torch_function__(func, types, args, kwargs)


class IntMatmulMode(FusedDecodeMode):
    """int8-dynamic weights through ``torch._int_mm`` at every row count."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and decode_kernels.is_int8_dynamic(args[1]):
            return decode_kernels.int8_dynamic_linear(args[0], args[1], None, max_rows=0)
        return super().__torch_function__(func, types, args, kwargs)


def mlp_stack(layers: int) -> nn.ModuleList:
    blocks = nn.ModuleList(
        nn.ModuleList(
            [
                nn.Linear(HIDDEN, INTERMEDIATE, bias=False),
                nn.Linear(HIDDEN, INTERMEDIATE, bias=False),
                nn.Linear(INTERMEDIATE, HIDDEN, bias=False),
            ]
        )
        for _ in range(layers)
    )
    return blocks.to(torch.bfloat16).eval()


def forward(blocks: nn.ModuleList, hidden_states: torch.Tensor) -> torch.Tensor:
    for gate, up, down in blocks:
        hidden_states = hidden_states + down(F.silu(gate(hidden_states)) * up(hidden_states))
    return hidden_states


def time_row(
    blocks: nn.ModuleList, mode: Callable[[], FusedDecodeMode], input: torch.Tensor, repeats: int, calls: int
) -> float:
    """Median seconds per call of the compiled stack."""

    def step() -> torch.Tensor:
        with mode():
            return forward(blocks, input)

    compiled = torch.compile(step)
    times = []
    with torch.no_grad():
        for _ in range(3):  # compile and warm up
            compiled()
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                compiled()
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bfloat = mlp_stack(args.layers)
    int8, int8_dynamic = copy.deepcopy(bfloat), copy.deepcopy(bfloat)
    quantize_(int8, Int8WeightOnlyConfig())
    quantize_(int8_dynamic, Int8DynamicActivationInt8WeightConfig())
    input = torch.randn(args.rows, HIDDEN, dtype=torch.bfloat16)
    rows = [
        ("bf16, bf16 products (reference)", bfloat, BfloatProductsMode),
        ("bf16", bfloat, FusedDecodeMode),
        ("int8", int8, FusedDecodeMode),
        ("int8-dynamic, _int_mm", int8_dynamic, IntMatmulMode),
        ("int8-dynamic", int8_dynamic, FusedDecodeMode),
    ]
    seconds = [time_row(blocks, mode, input, args.repeats, args.calls) for _, blocks, mode in rows]
    print(
        f"\n{args.layers} MLP blocks of SmolLM2-135M, {args.rows} rows, compiled, {args.threads} thread(s), "
        f"median of {args.repeats} x {args.calls} calls"
    )
    print("| kernel | ms per stack | speed vs reference |\n|---|---:|---:|")
    for (name, _, _), value in zip(rows, seconds):
        print(f"| {name} | {value * 1e3:.2f} | {seconds[0] / value:.2f}x |")


if __name__ == "__main__":
    main()
