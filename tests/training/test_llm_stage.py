from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from unimm.data.packing import IGNORE_INDEX
from unimm.training.arguments import TrainingArguments, parse_recipe
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
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert stage.count_units(batch) == 60


def test_sample_lengths_are_the_served_lengths_and_need_unpacked_rows(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [1] * n, "labels": [1] * n}) + "\n" for n in (3, 9, 5)))
    stage = _stage(LlmSftStage, train_dataset=str(data), max_length=6)
    train_set, _ = stage.build_datasets()
    assert stage.sample_lengths(train_set) == [3, 6, 5]  # truncated to max_length, as served
    train_set.table = train_set.table.select([2, 0])
    assert stage.sample_lengths(train_set) == [5, 3]  # a selected table's own order
    packed = _stage(LlmSftStage, train_dataset=str(data), max_length=20, packing=True)
    with pytest.raises(ValueError, match="packing or group_by_length, not both"):
        packed.sample_lengths(packed.build_datasets()[0])


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
def test_torch_compile_trains_the_same_losses_as_eager(tmp_path, deepspeed_dir):
    """``torch_compile: true`` compiles the model through DeepSpeed's engine, or with
    ``torch_compile_regions: true`` each decoder layer (one graph the layers share); the step computes the same."""
    from torch._dynamo.utils import counters

    from unimm.training.loop import train

    data = _write_sequences(tmp_path / "train.jsonl", 32)
    modes = {
        "eager": {"torch_compile": False},
        "model": {"torch_compile": True},
        "regions": {"torch_compile": True, "torch_compile_regions": True},
    }
    losses, graphs = {}, {}
    for mode, settings in modes.items():
        counters.clear()
        recipe = parse_recipe(
            {
                "stage": "llm_sft",
                "output_dir": str(tmp_path / f"run-{mode}"),
                "model_config": TINY_LLAMA,
                "train_dataset": data,
                "deepspeed_config": str(deepspeed_dir / "zero0.json"),
                "packing": True,
                "max_length": 24,
                "max_steps": 4,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-2,
                "logging_steps": 1,
                "lr_scheduler_type": "constant",
                "export_at_end": False,
                **settings,
            }
        )
        result = train(recipe)
        lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
        losses[mode] = [json.loads(line)["loss"] for line in lines]
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and graphs["model"] > 0 and graphs["regions"] > 0
    for mode in ("model", "regions"):
        assert losses[mode] == pytest.approx(losses["eager"], rel=1e-4)
    assert losses["regions"][-1] < losses["regions"][0]


def test_torch_compile_regions_needs_torch_compile():
    with pytest.raises(ValueError, match="torch_compile_regions.*needs torch_compile: true"):
        TrainingArguments(stage="llm_sft", torch_compile_regions=True)


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


def _tiny_unified_lora(stage):
    """A tiny Llama extended with a 16-code image vocabulary, wrapped with the stage's LoRA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unimm.llm import UniMMForCausalLM

    config = {key: value for key, value in TINY_LLAMA.items() if key != "model_type"}
    text_model = LlamaForCausalLM(LlamaConfig(**config, pad_token_id=0, tie_word_embeddings=True))
    model = UniMMForCausalLM.from_text_model(
        text_model, codebook_size=16, max_grid_height=2, max_grid_width=2, default_grid_height=2,
        default_grid_width=2,
    )  # fmt: skip
    return stage._with_lora(model)


def _mixed_batch(vocabulary):
    """Two text-only chats and two chats holding a 2x2 image, right-padded, loss on their last tokens."""
    image = vocabulary.image_to_token_ids(torch.tensor([[0, 5], [9, 15]])).tolist()
    rows = [[3, 4, 5, 6, 7, 8], [3, 9, 10, 11], [3, 4, *image, 12, 13], [3, *image, 14]]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # the prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_text_kl_anchor_splits_the_batch_without_changing_the_loss_and_is_zero_at_init():
    plain = _stage(LlmSftStage, train_dataset="unused", lora_rank=4)
    anchored = _stage(LlmSftStage, train_dataset="unused", lora_rank=4, text_kl_weight=1.0)
    model = _tiny_unified_lora(plain).eval()  # LoRA starts as the identity: tuned == base
    batch = _mixed_batch(model.get_base_model().vocabulary)
    with torch.no_grad():
        expected, expected_metrics = plain.compute_loss(model, batch, step=0)
        loss, metrics = anchored.compute_loss(model, batch, step=0)
    torch.testing.assert_close(loss, expected)
    assert metrics["text_kl"] == pytest.approx(0.0, abs=1e-6)
    for name in ("text_loss", "image_loss"):
        assert metrics[name] == pytest.approx(float(expected_metrics[name]), rel=1e-5)


def test_text_kl_anchor_is_the_kl_to_the_model_without_adapters_on_text_rows_only():
    from peft.tuners.lora import LoraLayer

    plain = _stage(LlmSftStage, train_dataset="unused", lora_rank=4)
    anchored = _stage(LlmSftStage, train_dataset="unused", lora_rank=4, text_kl_weight=0.5)
    model = _tiny_unified_lora(plain).eval()
    for module in model.modules():  # move the adapters away from the identity
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    vocabulary = model.get_base_model().vocabulary
    batch = _mixed_batch(vocabulary)
    with torch.no_grad():
        plain_loss, _ = plain.compute_loss(model, batch, step=0)
        loss, metrics = anchored.compute_loss(model, batch, step=0)
        text = {key: value[:2] for key, value in batch.items()}  # the two rows with no image token
        targets = text["labels"][:, 1:] != IGNORE_INDEX
        tuned = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
        with model.disable_adapter():
            base = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
    text_vocab = vocabulary.text_vocab_size
    log_tuned = tuned[:, :-1][targets][:, :text_vocab].log_softmax(-1)
    log_base = base[:, :-1][targets][:, :text_vocab].log_softmax(-1)
    kl = (log_base.exp() * (log_base - log_tuned)).sum(-1).mean()
    assert float(kl) > 1e-3
    assert metrics["text_kl"] == pytest.approx(float(kl), rel=1e-4)
    torch.testing.assert_close(loss, plain_loss + 0.5 * kl)


def _system_prompt_batch(stage, vocabulary):
    """Four chats starting with the same 9-token "system prompt", collated by the stage."""
    image = vocabulary.image_to_token_ids(torch.tensor([[0, 5], [9, 15]])).tolist()
    system = [3, 20, 21, 22, 23, 24, 25, 26, 27]
    rows = [
        [*system, 4, 5, 6, 7, 8],
        [*system, 9, 10, 11],
        [*system, 4, *image, 12],
        [*system, 30, *image, 14],
    ]
    samples = [{"input_ids": row, "labels": [IGNORE_INDEX] * 11 + row[11:]} for row in rows]
    return stage.collate(samples)


@pytest.mark.parametrize("text_kl_weight", [0.0, 0.5])
def test_shared_prefix_runs_the_system_prompt_once_for_the_same_loss_and_gradients(text_kl_weight):
    from peft.tuners.lora import LoraLayer

    values = dict(train_dataset="unused", lora_rank=4, text_kl_weight=text_kl_weight)
    plain, shared = _stage(LlmSftStage, **values), _stage(LlmSftStage, **values, shared_prefix=True)
    model = _tiny_unified_lora(plain).eval()
    for module in model.modules():  # adapters away from the identity: the prefix's activations depend on them
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    vocabulary = model.get_base_model().vocabulary
    assert _system_prompt_batch(shared, vocabulary)["shared_prefix_length"] == 9
    assert "shared_prefix_length" not in _system_prompt_batch(plain, vocabulary)
    results = []
    for stage in (plain, shared):
        model.zero_grad()
        loss, metrics = stage.compute_loss(model, _system_prompt_batch(stage, vocabulary), step=0)
        loss.backward()
        trainable = {
            name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad
        }
        results.append((loss, metrics, trainable))
    (plain_loss, plain_metrics, plain_grads), (shared_loss, shared_metrics, shared_grads) = results
    torch.testing.assert_close(shared_loss, plain_loss)
    for name, value in plain_metrics.items():
        torch.testing.assert_close(shared_metrics[name], value, msg=name)
    for name, gradient in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], gradient, msg=name)


def test_shared_prefix_is_left_out_below_its_minimum_and_needs_padded_rows():
    stage = _stage(LlmSftStage, train_dataset="unused", shared_prefix=True)
    batch = stage.collate(
        [
            {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]},
            {"input_ids": [3, 4, 7], "labels": [-100, -100, 7]},
        ]
    )
    assert batch["shared_prefix_length"] == 0  # 1 token: not worth a second decoder call
    with pytest.raises(ValueError, match="needs padded rows"):
        _stage(LlmSftStage, train_dataset="unused", shared_prefix=True, packing=True)


def test_text_kl_anchor_needs_lora():
    with pytest.raises(ValueError, match="text_kl_weight needs lora_rank"):
        _stage(LlmSftStage, train_dataset="unused", text_kl_weight=1.0)
    with pytest.raises(ValueError, match="text_kl_weight must be >= 0"):
        _stage(LlmSftStage, train_dataset="unused", lora_rank=4, text_kl_weight=-1.0)


def test_text_kl_anchor_trains_through_the_deepspeed_engine(tmp_path, deepspeed_dir):
    from unimm.training.loop import train

    data = _write_sequences(tmp_path / "train.jsonl", 32)
    recipe = parse_recipe(
        {
            "stage": "llm_sft",
            "output_dir": str(tmp_path / "run"),
            "model_config": TINY_LLAMA,
            "train_dataset": data,
            "eval_dataset": data,
            "deepspeed_config": str(deepspeed_dir / "zero0.json"),
            "lora_rank": 8,
            "text_kl_weight": 1.0,
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "eval_steps": 6,
            "lr_scheduler_type": "constant",
        }
    )
    result = train(recipe)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_kl = [record["text_kl"] for record in records if record["split"] == "train"]
    (evaluation,) = [record for record in records if record["split"] == "eval"]
    assert train_kl[0] == pytest.approx(0.0, abs=1e-6)  # the adapters start as the identity
    assert 0.0 < train_kl[-1] < 10.0  # the tuned model moved away from its base, and the KL says how far
    assert evaluation["text_kl"] > 0.0


def test_export_carries_the_processor_of_the_initial_folder(tmp_path):
    from unimm.llm import UniMMProcessor
    from unimm.pipelines.testing import build_random_pipeline

    pipeline = build_random_pipeline("tiny", seed=0)
    pipeline.llm.save_pretrained(tmp_path / "init")
    pipeline.processor.save_pretrained(tmp_path / "init")  # as `prepare` writes the LLM's initial folder
    stage = LlmSftStage(LlmArguments(model_name_or_path=str(tmp_path / "init"), random_tokens=4))
    stage.export(stage.build_model(), tmp_path / "export")
    processor = UniMMProcessor.from_pretrained(tmp_path / "export")
    assert processor.tokenizer.get_vocab() == pipeline.processor.tokenizer.get_vocab()
    assert processor.codebook_size == pipeline.processor.codebook_size


@pytest.mark.integration
def test_eval_tasks_run_every_eval_steps_and_log_learning_curves(tmp_path, deepspeed_dir):
    """A recipe's `eval_tasks` (a `unimm eval` task file) measure the model as it trains: numbers in
    metrics.jsonl (split `tasks`), each run's report in output_dir/eval_tasks/step-N."""
    import PIL.Image
    import yaml

    from unimm.pipelines.testing import build_random_pipeline
    from unimm.training.loop import train

    pipeline = build_random_pipeline("tiny", seed=0)
    pipeline.llm.save_pretrained(tmp_path / "init")
    pipeline.processor.save_pretrained(tmp_path / "init")
    pipeline.visual_tokenizer.save_pretrained(tmp_path / "tokenizer")
    images = tmp_path / "squares"
    images.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    with (images / "metadata.jsonl").open("w") as handle:
        for index, (name, colour) in enumerate(colours.items()):
            PIL.Image.new("RGB", (16, 16), colour).save(images / f"{index}.png")
            handle.write(json.dumps({"file_name": f"{index}.png", "text": f"a {name} square"}) + "\n")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        yaml.safe_dump(
            [
                {"task": "understanding", "dataset": str(images), "limit": 3, "max_new_tokens": 4},
                {"task": "reconstruction", "dataset": str(images), "limit": 3},
            ]
        )
    )
    recipe = parse_recipe(
        {
            "stage": "llm_pretrain",
            "output_dir": str(tmp_path / "run"),
            "model_name_or_path": str(tmp_path / "init"),
            "random_tokens": 16,
            "max_length": 16,
            "deepspeed_config": str(deepspeed_dir / "zero0.json"),
            "eval_tasks": str(tasks),
            "sample_tokenizer_path": str(tmp_path / "tokenizer"),
            "max_steps": 3,
            "eval_steps": 2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "export_at_end": False,
        }
    )
    result = train(recipe)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    curves = [record for record in records if record["split"] == "tasks"]
    assert [record["step"] for record in curves] == [2, 3]  # every eval_steps, and at the end
    for record in curves:
        assert record["understanding/num_examples"] == 3.0
        assert 0.0 <= record["understanding/exact_match"] <= 1.0
        assert record["reconstruction/pixel/psnr"] > 0.0
    for step in (2, 3):
        assert (result.output_dir / "eval_tasks" / f"step-{step:08d}" / "report.md").is_file()


def test_eval_tasks_are_checked_when_the_recipe_is_read(tmp_path):
    with pytest.raises(ValueError, match="eval_tasks need sample_tokenizer_path"):
        _stage(LlmSftStage, train_dataset="unused", eval_tasks=str(tmp_path / "tasks.yaml"))
    with pytest.raises(FileNotFoundError, match="eval_tasks .* does not exist"):
        _stage(LlmSftStage, train_dataset="unused", eval_tasks="missing.yaml", sample_tokenizer_path="tok")
    (tmp_path / "tasks.yaml").write_text("- task: understandin\n")
    with pytest.raises(ValueError, match="unknown task 'understandin'"):
        _stage(
            LlmSftStage,
            train_dataset="unused",
            eval_tasks=str(tmp_path / "tasks.yaml"),
            sample_tokenizer_path="t",
        )
