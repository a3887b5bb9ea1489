"""Packed rows through the LLM stage: no T×T mask, the same loss as padded rows, flash attention's varlen
arguments, metrics left on the device, and packed batches on their way to the device."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unimm.data.packing import FLASH_VARLEN_KEYS, IGNORE_INDEX, pack_examples
from unimm.training.loader import build_loader, move_to_device
from unimm.training.stages import llm as llm_stage
from unimm.training.stages.llm import LlmArguments, LlmSftStage, uses_flash_attention

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 48,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MAX_LENGTH = 20


def _stage(**values) -> LlmSftStage:
    return LlmSftStage(LlmArguments(model_config=TINY_LLAMA, train_dataset="unused", **values))


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        input_ids = torch.randint(1, TINY_LLAMA["vocab_size"], (length,), generator=generator).tolist()
        examples.append({"input_ids": input_ids, "labels": [IGNORE_INDEX] * 2 + input_ids[2:]})
    return examples


def test_packed_collate_builds_no_mask_and_turns_the_cache_off():
    stage = _stage(packing=True, max_length=MAX_LENGTH)
    rows = list(pack_examples(_examples([7, 6, 9, 5, 8]), MAX_LENGTH))
    batch = stage.collate(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert all(batch[key].shape == (len(rows), MAX_LENGTH) for key in ("input_ids", "labels", "position_ids"))
    assert batch["use_cache"] is False
    assert stage.count_units(batch) == len(rows) * MAX_LENGTH


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_rows_give_the_loss_of_the_same_samples_padded(attn_implementation):
    packed = _stage(packing=True, max_length=MAX_LENGTH, attn_implementation=attn_implementation)
    padded = _stage(attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = packed.build_model().train()  # dropout is 0: training mode is deterministic, and what runs
    padded.build_model()  # sets the padded collator's pad token
    examples = _examples([7, 6, 9, 5, 8, 3])
    rows = list(pack_examples(examples, MAX_LENGTH))
    assert len(rows) < len(examples)
    with torch.no_grad():
        packed_loss, _ = packed.compute_loss(model, packed.collate(rows), step=0)
        padded_loss, _ = padded.compute_loss(model, padded.collate(examples), step=0)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


class _FlashNamedModels:
    """``AutoModelForCausalLM`` as the stage calls it, with the built model's config saying flash attention
    (not installed here: the config is what the stage reads)."""

    @staticmethod
    def from_config(config, **kwargs):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.config._attn_implementation = "flash_attention_2"
        return model


def test_a_flash_attention_model_gets_packed_rows_with_varlen_arguments(monkeypatch):
    monkeypatch.setattr(llm_stage, "AutoModelForCausalLM", _FlashNamedModels)
    stage = _stage(packing=True, max_length=MAX_LENGTH)
    stage.build_model()
    batch = stage.collate(list(pack_examples(_examples([7, 6, 9]), MAX_LENGTH)))
    assert set(FLASH_VARLEN_KEYS) <= set(batch)
    assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()  # over the flattened batch
    assert uses_flash_attention(LlamaConfig(attn_implementation="flash_attention_3"))
    assert not uses_flash_attention(LlamaConfig(attn_implementation="sdpa"))


def _checked_varlen_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, after checking the varlen arguments describe the rows this forward got (B·T tokens)."""
    assert kwargs["cu_seq_lens_q"][-1] == query.shape[0] * query.shape[2]  # query: (B, H, T, D)
    assert kwargs["max_length_q"] <= query.shape[2]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _tiny_unified():
    """A tiny Llama extended with a 16-code image vocabulary."""
    from unimm.llm import UniMMForCausalLM

    torch.manual_seed(0)
    config = {key: value for key, value in TINY_LLAMA.items() if key != "model_type"}
    text_model = LlamaForCausalLM(LlamaConfig(**config, pad_token_id=0, tie_word_embeddings=True))
    model = UniMMForCausalLM.from_text_model(
        text_model, codebook_size=16, max_grid_height=2, max_grid_width=2, default_grid_height=2,
        default_grid_width=2,
    )  # fmt: skip
    return model.eval()


def _mixed_packed_rows(vocabulary) -> list[dict[str, list[int]]]:
    """A packed row of two text-only samples, then a row of a sample holding a 2x2 image and a text one."""
    image = vocabulary.image_to_token_ids(torch.tensor([[0, 5], [9, 15]])).tolist()  # 10 tokens
    text = [{"input_ids": [3, 4, 5, 6, 7, 8]}, {"input_ids": [3, 9, 10, 11]}]
    with_image = [{"input_ids": [3, *image, 14]}, {"input_ids": [3, 12, 13]}]
    for example in text + with_image:
        example["labels"] = [IGNORE_INDEX] * 2 + example["input_ids"][2:]
    (text_row,), (image_row,) = pack_examples(text, MAX_LENGTH), pack_examples(with_image, MAX_LENGTH)
    return [text_row, image_row]


def test_text_anchor_splits_packed_rows_with_their_own_varlen_arguments(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "checked_varlen", _checked_varlen_attention)
    plain = _stage(packing=True, max_length=MAX_LENGTH, lora_rank=4)
    anchored = _stage(packing=True, max_length=MAX_LENGTH, lora_rank=4, text_kl_weight=1.0)
    model = plain._with_lora(_tiny_unified())  # LoRA starts as the identity: the anchor adds nothing
    model.get_base_model().set_attn_implementation("checked_varlen")
    for stage in (plain, anchored):
        stage.set_pad_token_id(0, flash_attention=True)
    rows = _mixed_packed_rows(model.get_base_model().vocabulary)
    with torch.no_grad():
        expected, _ = plain.compute_loss(model, plain.collate(rows), step=0)  # one forward, both rows
        loss, metrics = anchored.compute_loss(model, anchored.collate(rows), step=0)  # one forward per row
    torch.testing.assert_close(loss, expected)
    assert float(metrics["text_kl"]) == pytest.approx(0.0, abs=1e-6)


def test_metrics_stay_on_the_device_until_logged_and_eval_skips_unmeasured_ones():
    stage = _stage(packing=True, max_length=MAX_LENGTH)
    model = _tiny_unified()
    text_rows, image_rows = _mixed_packed_rows(model.vocabulary)
    text_batch, image_batch = stage.collate([text_rows]), stage.collate([image_rows])
    with torch.no_grad():
        _, metrics = stage.compute_loss(model, text_batch, step=0)
        _, image_metrics = stage.compute_loss(model, image_batch, step=0)
        evaluated = stage.evaluate(model, [text_batch, image_batch])
    # Tensors, not floats: reading a value is a host sync, left to the loop's logging step.
    assert all(isinstance(value, torch.Tensor) for value in metrics.values())
    assert torch.isnan(metrics["image_loss"]), "nan: this batch has no image target"
    assert evaluated["image_loss"] == pytest.approx(float(image_metrics["image_loss"]))
    assert all(isinstance(value, float) for value in evaluated.values())


@pytest.mark.integration
def test_packed_sft_trains_and_evaluates_through_the_loop(tmp_path, deepspeed_dir):
    from unimm.training.arguments import parse_recipe
    from unimm.training.loop import train

    data = tmp_path / "train.jsonl"
    progressions = [list(range(start, start + 3 * length, 3)) for start in range(8) for length in (5, 7, 9)]
    data.write_text("".join(json.dumps({"input_ids": ids, "labels": ids}) + "\n" for ids in progressions))
    recipe = parse_recipe(
        {
            "stage": "llm_sft", "output_dir": str(tmp_path / "run"), "model_config": TINY_LLAMA,
            "attn_implementation": "eager", "train_dataset": str(data), "eval_dataset": str(data),
            "deepspeed_config": str(deepspeed_dir / "zero0.json"), "packing": True, "max_length": MAX_LENGTH,
            "max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
            "lr_scheduler_type": "constant",
        }
    )  # fmt: skip
    result = train(recipe)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["split"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert records[-1]["split"] == "eval"


# --- packed batches on their way to the device -------------------------------------------------------------


def _packed_loader(device: str | None):
    stage = _stage(packing=True, max_length=MAX_LENGTH)
    rows = list(pack_examples(_examples([7, 6, 9, 5, 8, 3, 4, 9]), MAX_LENGTH))
    return build_loader(rows, 2, stage.collate, rank=0, world_size=1, seed=0, shuffle=True, device=device)


def test_batches_for_an_accelerator_are_pinned_and_cpu_batches_are_not():
    assert _packed_loader("cuda").pin_memory  # no CUDA needed to build it, only to iterate
    assert not _packed_loader("cpu").pin_memory
    assert not _packed_loader(None).pin_memory


def test_copies_to_an_accelerator_do_not_block_and_copies_to_the_cpu_do(monkeypatch):
    batch = next(iter(_packed_loader("cpu")))
    calls = []
    original = torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    on_cpu = move_to_device(batch, torch.device("cpu"))
    assert calls == [False] * 3 and on_cpu["use_cache"] is False
    calls.clear()
    on_meta = move_to_device(batch, torch.device("meta"))  # a device other than the host, on any machine
    assert calls == [True] * 3 and on_meta["input_ids"].device.type == "meta"
