"""Training on one GPU in bf16: packed rows give the loss of the same samples padded (SDPA, and flash
attention's varlen path when installed), and a packed run under ZeRO-0/2/3 learns and resumes from its
checkpoint to where the uninterrupted run ends, within a tolerance (CUDA's atomic adds are not bitwise
reproducible, so the CPU tier's bitwise resume test cannot hold here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unimm.data.packing import IGNORE_INDEX, pack_examples
from unimm.llm import ModalitySampling
from unimm.training.arguments import parse_recipe
from unimm.training.loader import move_to_device
from unimm.training.stages.llm import LlmArguments, LlmSftStage

pytestmark = pytest.mark.gpu

REPOSITORY = Path(__file__).resolve().parents[2]
FLASH_ATTENTION = "flash_attention_2"
ATTENTION = ["sdpa", pytest.param(FLASH_ATTENTION, marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed"
))]  # fmt: skip
PACKED_LENGTH = 200  # two of the demo's text-to-image sequences (~95 tokens) per row
TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip
STEPS, SAVE_EVERY = 8, 4
RESUMED_LOSS_RTOL = 1e-2
RESUMED_WEIGHTS_SHARE = 0.05  # resumed-vs-uninterrupted distance, as a share of the distance steps 5-8 moved


@pytest.fixture(scope="module")
def demo_sequences(demo_cpu, image_prompts, class_prompts) -> list[dict[str, list[int]]]:
    """Text-to-image samples in the demo model's own distribution: a prompt and the image it writes greedily
    (labels on the image), where attending across samples changes the loss."""
    conditional, unconditional = image_prompts(demo_cpu, class_prompts[:6])
    output = demo_cpu.llm.generate_multimodal(
        conditional, mode="image", guidance_scale=3.0, unconditional_input_ids=unconditional,
        image_sampling=ModalitySampling(do_sample=False),
    )  # fmt: skip
    vocabulary = demo_cpu.llm.vocabulary
    samples = []
    for prompt, grids in zip(conditional, output.image_token_ids):
        image = vocabulary.image_to_token_ids(grids[0]).tolist()
        samples.append({"input_ids": [*prompt, *image], "labels": [IGNORE_INDEX] * len(prompt) + image})
    return samples


def stage_loss(stage, model, samples, cuda) -> torch.Tensor:
    with torch.no_grad():
        loss, _ = stage.compute_loss(model, move_to_device(stage.collate(samples), cuda), step=0)
    return loss.float()


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_packed_rows_give_the_loss_of_the_same_samples_padded(
    demo_checkpoint, demo_sequences, cuda, attn_implementation
):
    def stage(**values) -> LlmSftStage:
        return LlmSftStage(
            LlmArguments(
                model_name_or_path=f"{demo_checkpoint}/llm", train_dataset="unused", max_length=PACKED_LENGTH,
                attn_implementation=attn_implementation, **values,
            )
        )  # fmt: skip

    packed, padded = stage(packing=True), stage()
    model = (
        packed.build_model()
    )  # gives the packed collator flash attention's varlen arguments when it uses it
    rows = list(pack_examples(demo_sequences, PACKED_LENGTH))
    assert len(rows) < len(demo_sequences)
    model.to(cuda, torch.float32).train()  # no dropout: training mode is deterministic, and what runs
    model.set_attn_implementation("sdpa")  # the reference: float32, padded, SDPA
    reference = stage_loss(padded, model, demo_sequences, cuda)
    if attn_implementation == "sdpa":  # float32: the same sums but for the order
        torch.testing.assert_close(stage_loss(packed, model, rows, cuda), reference, rtol=1e-4, atol=1e-4)
    model.to(torch.bfloat16)
    model.set_attn_implementation(attn_implementation)
    for loss in (stage_loss(packed, model, rows, cuda), stage_loss(padded, model, demo_sequences, cuda)):
        torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2)


def write_sequences(path: Path, count: int = 96) -> str:
    """Learnable rows of 6 to 16 tokens (arithmetic progressions), so that packing puts several in a row."""
    vocab_size = TINY_LLAMA["vocab_size"]
    with open(path, "w") as handle:
        for index in range(count):
            start, step, length = index % 11, index % 3 + 1, 6 + index % 11
            handle.write(
                json.dumps({"input_ids": [(start + step * i) % vocab_size for i in range(length)]}) + "\n"
            )
    return str(path)


def run(output_dir: Path, data: str, zero_stage: int, max_steps: int, attn_implementation: str = "sdpa"):
    from unimm.training.loop import train

    recipe = parse_recipe(
        {
            "stage": "llm_pretrain", "output_dir": str(output_dir), "model_config": TINY_LLAMA,
            "attn_implementation": attn_implementation, "train_dataset": data, "packing": True, "max_length": 32,
            "deepspeed_config": str(REPOSITORY / "recipes" / "deepspeed" / f"zero{zero_stage}.json"),
            "bf16": True, "seed": 0, "max_steps": max_steps, "save_steps": SAVE_EVERY,
            "per_device_train_batch_size": 4, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
            "logging_steps": 1,
        }
    )  # fmt: skip
    return train(recipe)


def train_losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if record["split"] == "train"}


def flat_weights(export_dir: Path) -> torch.Tensor:
    weights = load_file(export_dir / "model.safetensors")
    return torch.cat([weights[name].float().flatten() for name in sorted(weights)])


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_packed_bf16_training_learns_and_resumes_to_the_uninterrupted_run(tmp_path, cuda, zero_stage):
    data = write_sequences(tmp_path / "train.jsonl")
    torch.cuda.reset_peak_memory_stats(cuda)
    whole = run(tmp_path / "whole", data, zero_stage, STEPS)
    assert torch.cuda.max_memory_allocated(cuda) > 0, "it trained on the GPU"
    interrupted = run(tmp_path / "resumed", data, zero_stage, SAVE_EVERY)
    halfway = flat_weights(interrupted.export_dir)
    resumed = run(tmp_path / "resumed", data, zero_stage, STEPS)  # the same folder: resumes from step 4
    assert resumed.global_step == whole.global_step == STEPS

    expected, losses = train_losses(whole.output_dir), train_losses(resumed.output_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1], "the packed bf16 run learns"
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=RESUMED_LOSS_RTOL), step
    final, resumed_final = flat_weights(whole.export_dir), flat_weights(resumed.export_dir)
    moved = float((final - halfway).norm())
    assert moved > 0
    assert float((resumed_final - final).norm()) <= RESUMED_WEIGHTS_SHARE * moved


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_packed_training_with_flash_attention_follows_the_sdpa_run(tmp_path, cuda):
    data = write_sequences(tmp_path / "train.jsonl")
    sdpa = train_losses(run(tmp_path / "sdpa", data, 2, STEPS).output_dir)
    flash = train_losses(run(tmp_path / "flash", data, 2, STEPS, FLASH_ATTENTION).output_dir)
    assert flash[STEPS] < flash[1]
    for step in (1, STEPS):
        assert flash[step] == pytest.approx(sdpa[step], rel=5e-2), step
