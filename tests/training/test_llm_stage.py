from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from unimm.data.packing import IGNORE_INDEX
from unimm.training.arguments import parse_recipe
from unimm.training.stages.llm import LlmArguments, LlmPretrainStage, LlmSftStage

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 48,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
PROMPT_LENGTH = 4


def _write_sequences(path, count: int, vocab_size: int = TINY_LLAMA["vocab_size"], length: int = 12) -> str:
    """Learnable token rows: a few arithmetic progressions; labels mask a 4-token prompt."""
    with open(path, "w") as handle:
        for index in range(count):
            tokens = [(index % 7 + (index % 3 + 1) * step) % vocab_size for step in range(length)]
            labels = [IGNORE_INDEX] * PROMPT_LENGTH + tokens[PROMPT_LENGTH:]
            handle.write(json.dumps({"input_ids": tokens, "labels": labels}) + "\n")
    return str(path)


def _stage(stage_class, **values):
    return stage_class(LlmArguments(model_config=TINY_LLAMA, **values))


def test_collate_pads_and_masks(tmp_path):
    stage = _stage(LlmSftStage, train_dataset=_write_sequences(tmp_path / "data.jsonl", 4))
    samples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    batch = stage.collate(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert stage.count_units(batch) == 4


def test_pretraining_learns_every_token_even_when_data_has_labels(tmp_path):
    stage = _stage(LlmPretrainStage, train_dataset=_write_sequences(tmp_path / "data.jsonl", 4))
    train_set, _ = stage.build_datasets()
    assert set(train_set[0]) == {"input_ids"}
    batch = stage.collate([train_set[0]])
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_packing_gives_block_causal_rows(tmp_path):
    stage = _stage(
        LlmSftStage, train_dataset=_write_sequences(tmp_path / "data.jsonl", 8), packing=True, max_length=30
    )
    train_set, _ = stage.build_datasets()
    assert len(train_set) == 4, "8 rows of 12 tokens, two per 30-token row"
    batch = stage.collate([train_set[0], train_set[1]])
    assert batch["input_ids"].shape == (2, 30)
    assert batch["position_ids"][0, :13].tolist() == [*range(12), 0]
    assert batch["attention_mask"].shape == (2, 1, 30, 30)
    assert stage.count_units(batch) == 60


def test_dataset_errors_name_the_field_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_dataset '.*missing.jsonl' does not exist"):
        _stage(LlmPretrainStage, train_dataset=str(tmp_path / "missing.jsonl")).build_datasets()
    no_labels = tmp_path / "no_labels.jsonl"
    no_labels.write_text(json.dumps({"input_ids": [1, 2]}) + "\n")
    with pytest.raises(
        ValueError, match=r"stage 'llm_sft' needs column\(s\) \['labels'\]; it has \['input_ids'\]"
    ):
        _stage(LlmSftStage, train_dataset=str(no_labels)).build_datasets()
    with pytest.raises(ValueError, match="exactly one of train_dataset and random_tokens"):
        LlmArguments(model_config=TINY_LLAMA)


def test_token_ids_beyond_the_vocabulary_are_a_stage_model_mismatch(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 99, 2]}) + "\n")
    stage = _stage(LlmPretrainStage, train_dataset=str(data))
    train_set, _ = stage.build_datasets()
    with pytest.raises(ValueError, match="token id 99 but the model's vocabulary has 48 rows"):
        stage.validate(stage.build_model(), train_set)
    with pytest.raises(TypeError, match="trains causal LMs; got Linear"):
        stage.validate(torch.nn.Linear(2, 2), train_set)


@pytest.mark.integration
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_llm_pretrain_learns(tmp_path, deepspeed_dir, packing):
    from unimm.training.loop import train

    data = _write_sequences(tmp_path / "train.jsonl", 64)
    recipe = parse_recipe(
        {
            "stage": "llm_pretrain",
            "output_dir": str(tmp_path / "run"),
            "model_config": TINY_LLAMA,
            "train_dataset": data,
            "eval_dataset": data,
            "deepspeed_config": str(deepspeed_dir / "zero2.json"),
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "lr_scheduler_type": "constant",
            "packing": packing,
            "max_length": 24,
        }
    )
    result = train(recipe)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5
    assert records[-1]["split"] == "eval" and records[-1]["loss"] < losses[0]
    assert all(record["tokens_per_second"] > 0 for record in records if record["split"] == "train")


@pytest.mark.integration
def test_zero3_builds_the_model_partitioned(tmp_path, deepspeed_dir, monkeypatch):
    """At ZeRO-3 the model is partitioned as transformers creates it (no rank ever holds it whole)."""
    from unimm.training.loop import train

    built_numels = []
    original = LlmPretrainStage.build_model

    def build_and_record(self):
        model = original(self)
        built_numels.append(sum(parameter.numel() for parameter in model.parameters()))
        return model

    monkeypatch.setattr(LlmPretrainStage, "build_model", build_and_record)
    data = _write_sequences(tmp_path / "train.jsonl", 32)
    recipe = parse_recipe(
        {
            "stage": "llm_pretrain", "output_dir": str(tmp_path / "run"), "model_config": TINY_LLAMA,
            "train_dataset": data, "deepspeed_config": str(deepspeed_dir / "zero3.json"), "max_steps": 6,
            "per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1,
            "lr_scheduler_type": "constant", "max_length": 24,
        }
    )  # fmt: skip
    result = train(recipe)
    # Training built it partitioned (empty local tensors); the export, outside the engine, built it whole.
    whole = AutoModelForCausalLM.from_pretrained(result.output_dir / "export").num_parameters()
    assert built_numels == [0, whole]
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["split"] == "train"]
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.integration
def test_llm_sft_lora_learns_and_exports_merged(tmp_path, deepspeed_dir):
    from unimm.training.loop import train

    data = _write_sequences(tmp_path / "train.jsonl", 64)
    recipe = parse_recipe(
        {
            "stage": "llm_sft",
            "output_dir": str(tmp_path / "run"),
            "model_config": TINY_LLAMA,
            "train_dataset": data,
            "deepspeed_config": str(deepspeed_dir / "zero0.json"),
            "lora_rank": 8,
            "lora_modules_to_save": ["embed_tokens", "lm_head"],
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "lr_scheduler_type": "constant",
        }
    )
    result = train(recipe)
    losses = [
        json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0] - 0.5
    exported = AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert not any("lora" in name for name, _ in exported.named_parameters()), "LoRA is merged"
    tokens = torch.tensor([[1, 3, 5, 7, 9, 11, 13, 15]])
    labels = tokens.clone()
    labels[:, :PROMPT_LENGTH] = IGNORE_INDEX
    with torch.no_grad():
        assert float(exported(input_ids=tokens, labels=labels).loss) < losses[0]


def test_missing_dataset_fails_before_any_training(tmp_path):
    from unimm.training.loop import train

    recipe = parse_recipe(
        {
            "stage": "llm_pretrain",
            "output_dir": str(tmp_path / "run"),
            "model_config": TINY_LLAMA,
            "train_dataset": str(tmp_path / "nowhere"),
        }
    )
    with pytest.raises(FileNotFoundError, match="train_dataset '.*nowhere' does not exist"):
        train(recipe)
    assert not (tmp_path / "run").exists()
