"""The recipes/smollm2 path on the real backbones (slow: `make test-slow`; needs `make assets`, `make data`).

A DINOv2-taught tokenizer (untrained: only the plumbing is checked) feeds the data step (`unimm prepare
recipes/smollm2/prepare.yaml` at a test's size) with SmolLM2 as the text model; one LoRA step then changes the
image rows and the adapters, never SmolLM2's own weights."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.lora import apply_lora
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.prepare import load_prepare_recipe, prepare

pytestmark = pytest.mark.slow
PREPARE_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2" / "prepare.yaml"
# The recipe's sources (their labels and prompts) without their own sizes and repeats, so that max_train_samples
# cuts each to four images seen once; no text replay (SmolLM2 would take minutes to write it).
SMALL_SOURCES = "sources=" + json.dumps(
    [
        {key: value for key, value in source.items() if key not in ("max_train_samples", "repeats")}
        for source in yaml.safe_load(PREPARE_RECIPE.read_text())["sources"]
    ]
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def smollm2_data(converted_smollm2: dict, converted_dinov2: dict, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2")
    config = DualCodebookConfig.named(
        "demo", teacher_name_or_path=converted_dinov2["output_dir"], teacher_config=None,
        teacher_image_mean=IMAGENET_MEAN, teacher_image_std=IMAGENET_STD, teacher_autocast_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(config).eval()
    assert vq_model.teacher.config.model_type == "dinov2" and vq_model.config.teacher_config is not None
    vq_model.save_pretrained(folder / "tokenizer")
    DualCodebookImageProcessor.from_tokenizer_config(vq_model.config).save_pretrained(folder / "tokenizer")
    overrides = [
        f"visual_tokenizer={folder / 'tokenizer'}", f"output_dir={folder / 'data'}",
        f"text_model_name_or_path={converted_smollm2['output_dir']}", SMALL_SOURCES, "max_train_samples=4",
        "max_eval_samples=2", "text_replay_fraction=0.0", "encode_batch_size=8",
    ]  # fmt: skip
    prepare(load_prepare_recipe(PREPARE_RECIPE, overrides))
    return folder / "data"


def test_sequences_use_the_chat_template_and_the_image_vocabulary(smollm2_data: Path) -> None:
    processor = UniMMProcessor.from_pretrained(smollm2_data / "init")
    train = datasets.load_from_disk(str(smollm2_data / "train"))
    assert len(train) == 2 * (4 + 4)
    texts, images = processor.batch_decode(train["input_ids"], skip_special_tokens=False)
    for text, grids in zip(texts, images):
        assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_end|>")
        assert len(grids) == 1 and tuple(grids[0].shape) == (8, 8)


def test_one_lora_step_leaves_the_pretrained_weights_alone(smollm2_data: Path) -> None:
    llm = UniMMForCausalLM.from_pretrained(smollm2_data / "init")
    text_vocab = llm.vocabulary.text_vocab_size
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight  # SmolLM2 ties them
    before = {name: value.clone() for name, value in llm.state_dict().items()}
    model = apply_lora(llm, r=4, alpha=8, dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = datasets.load_from_disk(str(smollm2_data / "train")).select(range(2))
    length = min(len(ids) for ids in rows["input_ids"])
    input_ids = torch.tensor([ids[:length] for ids in rows["input_ids"]])
    labels = torch.tensor([ids[:length] for ids in rows["labels"]])
    model(input_ids=input_ids, labels=labels, return_logits=False).loss.backward()
    optimizer.step()
    merged = model.merge_and_unload()
    after = merged.state_dict()
    embedding_name = next(name for name in before if name.endswith("embed_tokens.weight"))
    torch.testing.assert_close(after[embedding_name][:text_vocab], before[embedding_name][:text_vocab])
    assert not torch.equal(after[embedding_name][text_vocab:], before[embedding_name][text_vocab:])
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied
    shared = {embedding_name, next(name for name in before if name.endswith("lm_head.weight"))}
    changed = [name for name in before if name not in shared and not torch.equal(after[name], before[name])]
    unexpected = [name for name in changed if not name.endswith("proj.weight")]
    assert changed and not unexpected, unexpected  # only the linears LoRA merged into
