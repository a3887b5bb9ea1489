"""`unimm serve` under load: 16 concurrent image requests against the same 16 sent one after another, on the
compiled engine (what `unimm serve` runs by default) and on the eager one (`unimm serve --no-compile`).

    python benchmarks/serve.py                                  # untrained, demo model's shapes
    python benchmarks/serve.py --checkpoint checkpoints/demo    # a checkpoint folder
    python benchmarks/serve.py --decoder pixel --engine compiled --engine eager

Starts the server in-process (uvicorn on 127.0.0.1, a free port) and sends ``POST /v1/images/generations``
requests (one image each, no seed, so the server may batch them) over real HTTP from client threads:
first --requests of them one after another (each waits for the previous answer: every request is a batch of
one), then --requests at once (the server collects them into engine batches of up to --max-batch-size).
Prints requests/s and p50/p95 latency of both, and their ratios, for each image decoder (the diffusion
detokenizer at --steps steps, and the tokenizer's fast pixel decoder) and each engine; then the compiled
server's requests/s over the eager one's at the same load. Each server warms up as `unimm serve` does (the
compiled one compiles its steps for every batch size first), then takes one untimed request.
Without --checkpoint the weights are random (``build_random_pipeline("demo")``): the images are noise, the
work per image is the demo model's (8x8 grid, 76 tokens per image, guidance on).

On a CPU shared with other jobs, run with OMP_NUM_THREADS=1: torch's thread pool otherwise waits on busy
cores at every op, which slows small (one-request) batches far more than large ones.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

import numpy as np
import torch

from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import build_random_pipeline
from unimm.serving import BackgroundServer, ServingConfig, create_app

DECODERS = ("diffusion", "pixel")
ENGINES = ("compiled", "eager")
PROMPTS = ["a photo of a sneaker", "a photo of a bag", "an emoji of a cat face", "an emoji of a red heart"]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", default=None, help="pipeline folder (default: random demo-size model)"
    )
    parser.add_argument("--requests", type=int, default=16, help="requests per mode (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="diffusion decoder steps (default: 20)")
    parser.add_argument(
        "--decoder", action="append", choices=DECODERS, help="measure only this decoder (repeatable)"
    )
    parser.add_argument(
        "--engine", action="append", choices=ENGINES, help="measure only this engine (repeatable)"
    )
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="LLM guidance (default: 3.0)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="server batch rows (default: 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="batch window (default: 10)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output-json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def load(args: argparse.Namespace) -> tuple[UniMMPipeline, str]:
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        pipeline = UniMMPipeline.from_pretrained(args.checkpoint, dtype=dtype, device=args.device)
        source = args.checkpoint
    else:
        pipeline = build_random_pipeline("demo").to(args.device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
        source = "random weights, demo-model shapes"
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, source


def generate(url: str, index: int, guidance_scale: float) -> float:
    """One image request; its latency in seconds."""
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "n": 1, "guidance_scale": guidance_scale}
    request = urllib.request.Request(
        f"{url}/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200 and len(json.loads(response.read())["data"]) == 1
    return time.perf_counter() - start


def sequential(url: str, count: int, guidance_scale: float) -> tuple[float, list[float]]:
    start = time.perf_counter()
    latencies = [generate(url, index, guidance_scale) for index in range(count)]
    return time.perf_counter() - start, latencies


def concurrent(url: str, count: int, guidance_scale: float) -> tuple[float, list[float]]:
    latencies = [0.0] * count
    barrier = threading.Barrier(count + 1)

    def client(index: int) -> None:
        barrier.wait()
        latencies[index] = generate(url, index, guidance_scale)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()  # all clients send at once
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies


def summary(seconds: float, latencies: list[float]) -> dict[str, float]:
    return {
        "requests_per_second": len(latencies) / seconds,
        "p50_seconds": float(np.percentile(latencies, 50)),
        "p95_seconds": float(np.percentile(latencies, 95)),
    }


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        return json.loads(response.read())


def measure(pipeline: UniMMPipeline, decoder: str, engine: str, args: argparse.Namespace) -> dict:
    """Both modes against a fresh server decoding with ``decoder`` on the ``engine`` decode step."""
    pipeline.enable_compile(engine == "compiled")
    config = ServingConfig(
        model_name="benchmark",
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue_size=max(64, args.requests),
        decoder=decoder,
        num_inference_steps=args.steps,
    )
    with BackgroundServer(create_app(pipeline, config)) as server:
        generate(server.url, 0, args.guidance_scale)  # warm-up
        one_by_one = summary(*sequential(server.url, args.requests, args.guidance_scale))
        batches_before = health(server.url)["batches"]
        together = summary(*concurrent(server.url, args.requests, args.guidance_scale))
        batches = health(server.url)["batches"] - batches_before
    ratio = together["requests_per_second"] / one_by_one["requests_per_second"]
    return {
        "decoder": decoder,
        "engine": engine,
        "sequential": one_by_one,
        "concurrent": together,
        "engine_batches": batches,
        "throughput_ratio": ratio,
    }


def main() -> None:
    args = parse_arguments()
    pipeline, source = load(args)
    engines = args.engine or ENGINES
    results = [
        measure(pipeline, decoder, engine, args) for decoder in args.decoder or DECODERS for engine in engines
    ]

    grid = pipeline.image_grid()
    print(
        f"{args.requests} image requests, one image each ({grid[0]}x{grid[1]} codes, LLM guidance "
        f"{args.guidance_scale}, diffusion decoder {args.steps} steps); {source}; {args.device} "
        f"{args.dtype}, {torch.get_num_threads()} threads; server batches of up to {args.max_batch_size} "
        f"rows, {args.batch_wait_ms:g} ms window"
    )
    print("| decoder | engine | requests | requests/s | p50 latency (s) | p95 latency (s) | engine batches |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        sequential_row, concurrent_row = result["sequential"], result["concurrent"]
        cells = f"| {result['decoder']} | {result['engine']} |"
        for name, row, batches in (
            ("one after another", sequential_row, args.requests),
            (f"{args.requests} concurrent", concurrent_row, result["engine_batches"]),
        ):
            print(
                f"{cells} {name} | {row['requests_per_second']:.2f} | "
                f"{row['p50_seconds']:.3f} | {row['p95_seconds']:.3f} | {batches} |"
            )
        print(
            f"{cells} concurrent / one after another | **{result['throughput_ratio']:.1f}x** | "
            f"{concurrent_row['p50_seconds'] / sequential_row['p50_seconds']:.1f}x | "
            f"{concurrent_row['p95_seconds'] / sequential_row['p95_seconds']:.1f}x | |"
        )
    by_engine = {(result["decoder"], result["engine"]): result for result in results}
    for decoder in args.decoder or DECODERS:
        if all((decoder, engine) in by_engine for engine in ENGINES):
            compiled, eager = (by_engine[decoder, engine] for engine in ENGINES)
            for mode, name in (
                ("sequential", "one after another"),
                ("concurrent", f"{args.requests} concurrent"),
            ):
                speedup = compiled[mode]["requests_per_second"] / eager[mode]["requests_per_second"]
                print(f"| {decoder} | compiled / eager | {name} | **{speedup:.2f}x** | | | |")
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump({"source": source, "requests": args.requests, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
