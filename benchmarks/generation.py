"""Generation speed of unimm's engine against transformers' own implementations, in one run.

Image generation: ``UniMMForCausalLM.generate_multimodal(mode="image")`` against
``JanusForConditionalGeneration.generate(generation_mode="image")`` on a matched configuration (same Llama
backbone size, image token count, guidance, sampling), both with freshly initialised weights (speed does
not depend on the values). Text: ``generate_multimodal(mode="text")`` against plain ``generate`` of the
underlying language model, greedy, same number of new tokens.

unimm runs twice: eager (the default) and with ``compile=True`` (each decode step - backbone, head, guidance,
constraint mask, sampling - as one ``torch.compile`` graph, inductor with dynamic shapes, one graph per kind of
step for every batch size and length). The compile is a one-off per model and process, timed in wall seconds
and printed on its own line; every measured run starts after it (a batch size first seen in a warm-up round
may add a graph there). Janus is measured through its default user-facing call, eager with a
``DynamicCache``: transformers can also give it a ``StaticCache`` and compile its forward
(``cache_implementation="static"``, ``compile_config``), which this benchmark does not do.

Runs are interleaved (reference, ours, ours compiled, ...) and the median of ``--repeats`` is reported.
Throughput is measured in CPU time of this process with one torch thread (the machine may be shared, and
CPU time is what other jobs disturb least); the wall-clock ratio is printed next to it. Image throughput
counts codebook tokens only: unimm also writes the size, end-of-row and end-of-image tokens, which are not
counted; they are forced, so they take no forward of their own (the size tokens join the prompt, each
end-of-row is fed with the code before it), and both sides run 255 decode forwards for a 16x16 grid.

What the compiled step does on a CPU (``unimm/llm/decode_kernels.py``): linears of up to 8 rows and attention
of one or two queries are written as reductions that inductor fuses into loops reading each weight and cache
once; linears of more rows run through oneDNN on weight copies packed once per call. The last two columns
measure the same work done by the library kernels alone: each linear layer through ``F.linear``, SDPA over a
per-layer cache of the image's mean length, and the head slice, one eager call each on unimm's own weights -
the ceiling of a decode loop built on ``F.linear`` and SDPA, such as Janus's.

Where a step's time goes, batch 1 (2 rows with guidance): the fused graph streams the ~20 MB of fp32 weights at
~19 GB/s where ``F.linear`` of 2 rows reaches 5-8 GB/s (the BLAS treats them as a general matrix product);
dynamo's cache lookup and the pre-graph bytecode add ~0.3 ms. Batch 16 (32 rows, ~13 ms): the matrix products
~4.5 ms (oneDNN on packed weights, ~78 GFLOP/s against ~40 for ``F.linear``), attention over ~40 MB of fp32
KV caches ~4.3 ms, the custom op's dispatch ~0.7 ms, sampling and the rest ~2 ms.

Figures, a quiet 2-core AMD EPYC (Zen 4, AVX-512), default configuration (hidden 256, MLP 1024, 4 layers,
8 heads, codebook 4096, 16x16, guidance 5), fp32, one thread, ``--repeats 3``; image tokens per CPU-second
of compiled unimm over Janus's, three runs (the third on the final code, which only narrowed which weights are
kept packed; Janus's own rate moves by 10-20% between runs):

| | batch 1 | batch 4 | batch 16 | text, batch 1 / 16 |
|---|---|---|---|---|
| run 1 | 3.65x (518 against 142 tok/s) | 2.09x | 1.56x (1216 against 780) | 3.36x / 1.74x |
| run 2 | 3.40x (476 against 140) | 2.01x | 1.75x (1335 against 762) | 3.41x / 1.66x |
| run 3 | 3.43x (563 against 164) | 2.02x | 1.70x (1448 against 854) | 3.58x / 1.71x |

Eager unimm: 1.13-1.34x. The path there, same machine: before the fused kernels 1.51x / 1.43x / 1.32x at batch
1 / 4 / 16; with fused few-row linears and attention 3.16x / 1.42x / 1.39x; then oneDNN for more rows, and the
attention's query realised as a buffer of its own (left inline, inductor recomputed the rotary embedding, cos
and sin, for every key position: 1.7 against 1.1 ms per layer at 32 rows). An earlier session on a shared Xeon
measured 2.21x / 2.02x / 1.60x before the fused kernels.

Tried and dropped: MKL packed weights (``_mkl_linear``: 47 against 78 GFLOP/s for oneDNN at 32 rows), inductor's
C++ GEMM template (``max_autotune``: no faster than the BLAS), keys stored transposed so that scores vectorise
over positions (slower), ``cpp_wrapper`` (slower here, 2.5x the compile time), column-major weight storage
(faster at batch 1, but it mutates the user's parameters). With ``--dtype bfloat16`` (both models in bf16,
``--repeats 1``, same machine): 2.68x at batch 1 and 3.22x at batch 16.

    python benchmarks/generation.py [--batch-sizes 1 4 16] [--repeats 3] [--grid 16] [--dtype bfloat16]

On a GPU (``--device cuda``) the clock is read after ``torch.cuda.synchronize``, rates are per wall second and
the CPU threads are left alone (``benchmarks/clocks.py``); batch sizes, repeats and dtype default to the CUDA
settings below (bf16; batches 1, 16 and 64), kept apart from the CPU-tuned ones. No GPU figures yet:

    python benchmarks/generation.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics

import torch
from clocks import Clock, add_device_argument  # benchmarks/clocks.py (this folder is on sys.path)
from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, LlamaConfig

from unimm.llm import ModalitySampling, UniMMConfig, UniMMForCausalLM

# Per device type: the settings the figures above were measured with on a CPU, and those for a GPU.
DEFAULTS = {
    "cpu": {"batch_sizes": [1, 4, 16], "text_batch_sizes": [1, 16], "repeats": 3, "dtype": "float32"},
    "cuda": {"batch_sizes": [1, 16, 64], "text_batch_sizes": [1, 64], "repeats": 5, "dtype": "bfloat16"},
}


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.text_vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_janus(args: argparse.Namespace) -> JanusForConditionalGeneration:
    hidden = args.hidden
    config = JanusConfig(
        text_config=llama_config(args).to_dict(),
        vision_config=dict(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
            projection_dim=hidden, num_image_tokens=args.grid * args.grid,
        ),
        vq_config=dict(
            embed_dim=8, num_embeddings=args.codebook, projection_dim=hidden, image_token_embed_dim=hidden,
            base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, latent_channels=16,
            num_patches=args.grid,
        ),
        image_token_id=args.text_vocab - 1,
    )  # fmt: skip
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=1, pad_token_id=0, eos_token_id=2, generation_kwargs={"boi_token_id": 3}
    )
    return model


def build_unimm(args: argparse.Namespace) -> UniMMForCausalLM:
    config = UniMMConfig(
        text_config=llama_config(args),
        codebook_size=args.codebook,
        max_grid_height=args.grid,
        max_grid_width=args.grid,
        default_grid_height=args.grid,
        default_grid_width=args.grid,
    )
    return UniMMForCausalLM(config).eval()


def interleaved_rates(clock: Clock, runners: dict, repeats: int, work: int) -> dict[str, tuple[float, float]]:
    """Run each runner in turn ``repeats + 1`` times (the first round warms up and is dropped); return
    ``work`` per median second of the main clock (CPU time on a CPU) and per median wall second for each."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for repeat in range(repeats + 1):
        for name, runner in runners.items():
            elapsed = clock.time(runner, repeat)
            if repeat:
                times[name].append(elapsed)
    return {
        name: (
            work / statistics.median(main for main, _ in values),
            work / statistics.median(wall for _, wall in values),
        )
        for name, values in times.items()
    }


def ratio(rate: tuple[float, float], reference: tuple[float, float], clock: Clock) -> str:
    """The main clock's ratio, with the wall clock's beside it on a CPU (on CUDA they are the same clock)."""
    main = f"{rate[0] / reference[0]:.2f}x"
    return main if clock.is_cuda else f"{main} ({rate[1] / reference[1]:.2f}x)"


def print_row(label: str, rates: dict[str, tuple[float, float]], reference: str, clock: Clock) -> None:
    """One table row: the reference's rate, then per unimm variant its rate and its ratio to the reference."""
    cells = [f"{rates[reference][0]:.1f}"]
    for name in ("unimm", "unimm compiled"):
        cells += [f"{rates[name][0]:.1f}", f"**{ratio(rates[name], rates[reference], clock)}**"]
    if "floor" in rates:
        cells += [f"{rates['floor'][0]:.1f}", ratio(rates["floor"], rates[reference], clock)]
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def compile_decode_step(clock: Clock, unimm) -> float:
    """Compile unimm's decode step once (two image calls: single-token steps and a code fed with its end of
    row; the second call's lengths make dynamo mark the sequence dimension dynamic, after which no shape
    recompiles); returns the wall seconds taken."""

    def compile_twice() -> None:
        for _ in range(2):
            unimm.generate_multimodal(
                [[1, 5, 6]],
                mode="image",
                image_sampling=ModalitySampling(do_sample=True),
                compile=True,
                seed=0,
            )

    return clock.time(compile_twice)[1]


def bench_images(args, clock: Clock, janus, unimm, batch: int) -> dict[str, tuple[float, float]]:
    prompt = torch.randint(4, args.text_vocab - 1, (batch, args.prompt_length), device=clock.device)
    prompt[:, 0] = 1
    prompt[:, -1] = 3  # Janus' prompt ends with its <begin_of_image>; unimm opens the image itself
    mask = torch.ones_like(prompt)
    prompts = prompt[:, :-1].tolist()
    unconditional = [[1]] * batch
    sampling = ModalitySampling(do_sample=True, temperature=1.0)

    def run_janus(seed: int) -> None:
        torch.manual_seed(seed)
        janus.generate(
            prompt, attention_mask=mask, generation_mode="image", do_sample=True, temperature=1.0,
            guidance_scale=args.guidance,
        )  # fmt: skip

    def unimm_runner(compile: bool):
        def run_unimm(seed: int) -> None:
            unimm.generate_multimodal(
                prompts, mode="image", guidance_scale=args.guidance, unconditional_input_ids=unconditional,
                image_sampling=sampling, seed=seed, compile=compile,
            )  # fmt: skip

        return run_unimm

    runners = {"janus": run_janus, "unimm": unimm_runner(False), "unimm compiled": unimm_runner(True)}
    return interleaved_rates(clock, runners, args.repeats, batch * args.grid**2)


def bench_floor(args, clock: Clock, unimm, batch: int) -> tuple[float, float]:
    """Image tokens per second (main clock, and wall) if a decode step cost only its library kernels: each
    linear layer of the backbone, SDPA over a KV cache of the image's mean length, and the image slice of the
    head, run back to back on unimm's own weights with the CFG rows (2 x batch), one eager call each and
    nothing else: the ceiling of a decode loop built on the library kernels (``F.linear``, SDPA). Fused
    reductions (compiled unimm at small batches) stream the weights faster and can exceed it."""
    decoder = unimm.get_decoder()
    rows, heads = 2 * batch, args.heads
    head_dim = args.hidden // heads
    tokens = args.grid * args.grid
    cache_length = args.prompt_length + 3 + (tokens + args.grid) // 2  # mean over the image's steps
    layers = decoder.layers
    # One cache per layer, as in decoding: at batch 16 the caches outgrow the CPU's caches.
    head = unimm.get_output_embeddings().weight[unimm.vocabulary.text_vocab_size :]
    like = {"dtype": head.dtype, "device": head.device}  # the model's (--dtype, --device)
    keys = [torch.randn(rows, heads, cache_length, head_dim, **like) for _ in layers]
    values = [torch.randn_like(layer_keys) for layer_keys in keys]
    hidden = torch.randn(rows, 1, args.hidden, **like)
    intermediate = torch.randn(rows, 1, decoder.config.intermediate_size, **like)
    query = torch.randn(rows, heads, 1, head_dim, **like)

    def step() -> None:
        for layer, layer_keys, layer_values in zip(layers, keys, values):
            attention, mlp = layer.self_attn, layer.mlp
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
                projection(hidden)
            torch.nn.functional.scaled_dot_product_attention(query, layer_keys, layer_values)
            mlp.gate_proj(hidden), mlp.up_proj(hidden), mlp.down_proj(intermediate)
        torch.nn.functional.linear(hidden, head)

    def run(seed: int) -> None:
        for _ in range(tokens - 1):  # unimm's forwards for one image: the first code comes from the prefill
            step()

    return interleaved_rates(clock, {"floor": run}, args.repeats, batch * tokens)["floor"]


def bench_text(args, clock: Clock, unimm, batch: int) -> dict[str, tuple[float, float]]:
    language_model = unimm.language_model
    prompt = torch.randint(4, args.text_vocab, (batch, args.prompt_length), device=clock.device)
    mask = torch.ones_like(prompt)

    # No end-of-sequence for either side: both write exactly `text_tokens` tokens, with no extra processor.
    plain = GenerationConfig(
        do_sample=False, max_new_tokens=args.text_tokens, pad_token_id=0, eos_token_id=None
    )

    def run_generate(seed: int) -> None:
        language_model.generate(prompt, attention_mask=mask, generation_config=plain)

    def unimm_runner(compile: bool):
        def run_unimm(seed: int) -> None:
            unimm.generate_multimodal(
                prompt, attention_mask=mask, mode="text", max_new_tokens=args.text_tokens, eos_token_id=[],
                compile=compile,
            )  # fmt: skip

        return run_unimm

    runners = {"generate": run_generate, "unimm": unimm_runner(False), "unimm compiled": unimm_runner(True)}
    return interleaved_rates(clock, runners, args.repeats, batch * args.text_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_device_argument(parser)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="*", help="default: 1 4 16 on a CPU, 1 16 64 on CUDA"
    )
    parser.add_argument(
        "--text-batch-sizes", type=int, nargs="*", help="default: 1 16 on a CPU, 1 64 on CUDA"
    )
    parser.add_argument("--repeats", type=int, help="default: 3 on a CPU, 5 on CUDA")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x hidden)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights and caches of both models (default: float32 on a CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--text-vocab", type=int, default=2048)
    parser.add_argument("--codebook", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=16, help="image side in codes (grid x grid tokens)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on a CPU (1 keeps a shared CPU steadier)"
    )
    args = parser.parse_args(argv)
    clock = Clock(torch.device(args.device))
    for name, value in DEFAULTS[clock.device.type].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    clock.pin_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    janus, unimm = build_janus(args).to(clock.device, dtype), build_unimm(args).to(clock.device, dtype)
    print(
        f"Llama backbone ({args.dtype}): hidden {args.hidden}, MLP {unimm.config.text_config.intermediate_size}, "
        f"{args.layers} layers, {args.heads} heads; {args.grid}x{args.grid} "
        f"image tokens, codebook {args.codebook}, guidance {args.guidance}, sampling at temperature 1; "
        f"{clock.describe()}; median of {args.repeats} interleaved runs"
    )
    with torch.no_grad():  # not inference_mode: its tensors break the compiled step (BackendCompilerFailed)
        print(
            f"unimm compile=True: {compile_decode_step(clock, unimm):.1f} s wall to compile (once per model and "
            "process, not in the rates below)"
        )
        unit, ratio_name = clock.unit, "speed-up" if clock.is_cuda else "speed-up CPU (wall)"
        print(
            f"\n| image generation | Janus (img tok/{unit}) | unimm eager (img tok/{unit}) | {ratio_name} "
            f"| unimm compiled (img tok/{unit}) | {ratio_name} | library kernels alone (img tok/{unit}) "
            f"| library kernels / Janus{'' if clock.is_cuda else ' CPU (wall)'} |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for batch in args.batch_sizes:
            rates = bench_images(args, clock, janus, unimm, batch)
            print_row(
                f"batch {batch}", rates | {"floor": bench_floor(args, clock, unimm, batch)}, "janus", clock
            )
        ratio_name = "ratio" if clock.is_cuda else "ratio CPU (wall)"
        print(
            f"\n| text ({args.text_tokens} greedy tokens) | LM generate (tok/{unit}) | unimm eager (tok/{unit}) "
            f"| {ratio_name} | unimm compiled (tok/{unit}) | {ratio_name} |"
        )
        print("|---|---|---|---|---|---|")
        for batch in args.text_batch_sizes:
            print_row(f"batch {batch}", bench_text(args, clock, unimm, batch), "generate", clock)


if __name__ == "__main__":
    main()
