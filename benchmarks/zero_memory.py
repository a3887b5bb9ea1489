"""Bytes of model state per parameter and rank under each ZeRO stage, measured on a CPU (the docs' DeepSpeed guide
derives its per-GPU memory estimates from these figures).

Trains a Llama with unimm's loop (stage ``llm_pretrain``, random tokens) for a few steps, then sums the bytes of
every tensor alive in the process (each storage once): weights, gradients, optimizer states and DeepSpeed's flat
partitions and buffers, just before and just after each optimizer step (the larger of the two is kept). The same
sum before the engine is built is subtracted, and the rest is divided by the model's parameter count. Activations
are freed by then, so the figure is the model state of a rank (peak memory adds the activations of one
micro-batch and transient buffers).

    nice python benchmarks/zero_memory.py --deepspeed_config recipes/deepspeed/zero2.json --bf16
    torchrun --nproc_per_node 2 benchmarks/zero_memory.py --deepspeed_config recipes/deepspeed/zero3.json --bf16

Each rank prints one line. Bucket sizes are capped at ``--bucket_size`` elements in a temporary copy of the JSON
(the JSON's 2e8-element buckets, or DeepSpeed's 5e8 defaults, would dwarf a model this small).
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import HfArgumentParser

from unimm.training import distributed
from unimm.training.arguments import parse_recipe
from unimm.training.loop import TrainingLoop

SEED = 0
# DeepSpeed's defaults for the keys a JSON leaves out are 5e8 elements (reduce) and more: buffers of that size
# would be most of what this small model's ranks hold.
BUCKET_KEYS = {
    2: ("allgather_bucket_size", "reduce_bucket_size"),
    3: ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"),
}


@dataclass
class MemoryArguments:
    deepspeed_config: str = "recipes/deepspeed/zero2.json"
    bf16: bool = False
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    vocab_size: int = 8192
    sequence_length: int = 32
    batch_size: int = 1
    steps: int = 2
    bucket_size: int = 1_000_000
    output_dir: str = "outputs/zero_memory"  # shared by the ranks (the loop checks they all see it)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process, each storage counted once."""
    gc.collect()
    storages: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class _MeasuredLoop(TrainingLoop):
    """Unimm's loop, recording the most live tensor bytes seen just before (gradients held) and just after
    (gradients freed) each optimizer step."""

    state_bytes = 0

    def _build_engine(self, model: torch.nn.Module):
        engine = super()._build_engine(model)
        step = engine.step

        def measured_step(*args, **kwargs):
            self.state_bytes = max(self.state_bytes, live_tensor_bytes())
            result = step(*args, **kwargs)
            self.state_bytes = max(self.state_bytes, live_tensor_bytes())
            return result

        engine.step = measured_step
        return engine


def small_buckets(config_path: str, bucket_size: int, folder: Path) -> str:
    config = json.loads(Path(config_path).read_text())
    zero = config.get("zero_optimization", {})
    for key in BUCKET_KEYS.get(zero.get("stage", 0), ()):
        zero[key] = min(zero.get(key, bucket_size), bucket_size)
    path = folder / Path(config_path).name
    path.write_text(json.dumps(config))
    return str(path)


def main() -> None:
    (args,) = HfArgumentParser(MemoryArguments).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.manual_seed(SEED)
    distributed.init_distributed()
    with tempfile.TemporaryDirectory() as scratch:
        recipe = parse_recipe(
            {
                "stage": "llm_pretrain",
                "output_dir": args.output_dir,
                "deepspeed_config": small_buckets(args.deepspeed_config, args.bucket_size, Path(scratch)),
                "model_config": {
                    "model_type": "llama",
                    "vocab_size": args.vocab_size,
                    "hidden_size": args.hidden_size,
                    "intermediate_size": 4 * args.hidden_size,
                    "num_hidden_layers": args.num_layers,
                    "num_attention_heads": args.num_heads,
                    "num_key_value_heads": args.num_heads,
                    "max_position_embeddings": args.sequence_length,
                },
                "random_tokens": args.steps * args.batch_size * 2,
                "max_length": args.sequence_length,
                "seed": SEED,
                "bf16": args.bf16,
                "max_steps": args.steps,
                "per_device_train_batch_size": args.batch_size,
                "lr_scheduler_type": "constant",
                "logging_steps": args.steps,
                "save_steps": 10 * args.steps,
                "export_at_end": False,
                "resume_from_checkpoint": "never",
            }
        )
        baseline = live_tensor_bytes()
        loop = _MeasuredLoop(recipe)
        loop.run()
        parameters = sum(
            getattr(parameter, "ds_numel", parameter.numel()) for parameter in loop.engine.module.parameters()
        )
    rank, world = distributed.rank(), distributed.world_size()
    state = loop.state_bytes - baseline
    print(
        f"rank {rank}/{world} {Path(args.deepspeed_config).name} {'bf16' if args.bf16 else 'fp32'}: "
        f"{parameters / 1e6:.1f}M parameters, model state {state / 2**20:.0f} MiB = "
        f"{state / parameters:.2f} bytes/parameter"
    )


if __name__ == "__main__":
    main()
