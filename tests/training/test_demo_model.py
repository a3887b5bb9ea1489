"""The demo model's data step and assembly (recipes/demo/demo_steps.py, outside the package) on a tiny
tokenizer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import datasets
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser

from unimm.data.schema import drop_text
from unimm.data.text_replay import save_text_replay
from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.lora import apply_lora
from unimm.llm.text_tokenizer import build_word_level_tokenizer
from unimm.pipelines import UniMMPipeline
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.stages.llm import LlmArguments, LlmSftStage

REPOSITORY = Path(__file__).resolve().parents[2]


def _load_script(path: Path) -> ModuleType:
    """A Python file of the recipes as a module (registered first: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


demo_steps = _load_script(REPOSITORY / "recipes" / "demo" / "demo_steps.py")
DemoLlmDataArguments, SequenceBuilder = demo_steps.DemoLlmDataArguments, demo_steps.SequenceBuilder
assemble, build_llm_data = demo_steps.assemble, demo_steps.build_llm_data
compare_text_skills, evaluate_and_card = demo_steps.compare_text_skills, demo_steps.evaluate_and_card
fashion_mnist_answer = demo_steps.fashion_mnist_answer
generation_sample, understanding_sample = demo_steps.generation_sample, demo_steps.understanding_sample
TINY_BACKBONE = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


def test_recipe_parses() -> None:
    (args,) = HfArgumentParser(DemoLlmDataArguments).parse_yaml_file(
        str(REPOSITORY / "recipes/demo/llm_data.yaml")
    )
    assert args.backbone["model_type"] == "llama" and args.tokenizer_path.endswith("tokenizer/export")
    (smollm2,) = HfArgumentParser(DemoLlmDataArguments).parse_yaml_file(
        str(REPOSITORY / "recipes/smollm2/llm_data.yaml")
    )
    assert smollm2.backbone is None and Path(smollm2.text_model_name_or_path).is_absolute()  # "~" expanded
    with pytest.raises(ValueError, match="exactly one of backbone"):
        DemoLlmDataArguments(tokenizer_path="t", output_dir="o")
    with pytest.raises(ValueError, match="condition_dropout"):
        DemoLlmDataArguments(
            tokenizer_path="t", output_dir="o", backbone=TINY_BACKBONE, condition_dropout=1.0
        )


def test_answers() -> None:
    assert [fashion_mnist_answer(label) for label in (0, 1, 9)] == [
        "a t-shirt.",
        "a pair of trousers.",
        "an ankle boot.",
    ]


def test_sequence_builder_matches_the_processor() -> None:
    """The fast path (processor once per text, image tokens spliced in) equals the processor itself."""
    config = DualCodebookConfig.tiny()
    tokenizer = build_word_level_tokenizer(["a photo of a sneaker", "What is this?", "a sneaker."])
    llm = UniMMForCausalLM.from_text_model(
        _tiny_text_model(len(tokenizer)),
        codebook_size=config.codebook_size, max_grid_height=4, max_grid_width=4, default_grid_height=4,
        default_grid_width=4,
    )  # fmt: skip
    processor = UniMMProcessor.from_config(
        llm.config, tokenizer, DualCodebookImageProcessor.from_tokenizer_config(config)
    )
    builder = SequenceBuilder(processor, (4, 4))
    generator = torch.Generator().manual_seed(0)
    samples = {
        ("generate", "a photo of a sneaker"): generation_sample("a photo of a sneaker"),
        ("generate",): drop_text(generation_sample("a photo of a sneaker")),
        ("answer", "What is this?"): understanding_sample("What is this?", "a sneaker."),
    }
    for key, sample in samples.items():
        for _ in range(2):  # the second call reuses the cached template
            codes = torch.randint(0, config.codebook_size, (4, 4), generator=generator)
            with_ids = {
                "segments": [
                    {**segment, "image_token_ids": codes.flatten().tolist(), "image_grid": [4, 4]}
                    if segment["type"] == "image"
                    else segment
                    for segment in sample["segments"]
                ]
            }
            assert builder(sample, key, codes) == processor.tokenize_sample(with_ids)


def _tiny_text_model(vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(TINY_BACKBONE)
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=vocab_size, **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.integration
def test_build_llm_data_and_assemble(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(DualCodebookConfig.tiny()).eval()
    vq_model.save_pretrained(tmp_path / "tokenizer")
    DualCodebookImageProcessor.from_tokenizer_config(vq_model.config).save_pretrained(tmp_path / "tokenizer")
    args = DemoLlmDataArguments(
        tokenizer_path=str(tmp_path / "tokenizer"), output_dir=str(tmp_path / "data"), backbone=TINY_BACKBONE,
        image_size=32, emoji_repeats=3, max_train_images=6, max_eval_images=4,
        max_grid=4, encode_batch_size=4,
    )  # fmt: skip
    build_llm_data(args)
    train = datasets.load_from_disk(str(tmp_path / "data/train"))
    evaluation = datasets.load_from_disk(str(tmp_path / "data/eval"))
    assert len(train) == 2 * (6 + 3 * 6) and len(evaluation) == 2 * (4 + 4)  # two directions per image
    llm = UniMMForCausalLM.from_pretrained(tmp_path / "data/init")
    processor = UniMMProcessor.from_pretrained(tmp_path / "data/init")
    for row in train:
        assert max(row["input_ids"]) < llm.config.vocab_size
        assert processor.tokenizer.unk_token_id not in row["input_ids"]
        texts, images = processor.batch_decode([row["input_ids"]], skip_special_tokens=False)
        assert len(images[0]) == 1 and tuple(images[0][0].shape) == (4, 4)
        assert texts[0].startswith("<|user|>") and texts[0].endswith("<|end|>")
    # The code rows start from the tokenizer's codebook, so look-alike codes start close.
    assert not torch.allclose(llm.get_input_embeddings().weight[-1], llm.get_input_embeddings().weight[-2])

    # The LLM stage draws its sample grid with this model, processor and tokenizer.
    stage = LlmSftStage(
        LlmArguments(
            model_name_or_path=str(tmp_path / "data/init"), train_dataset=str(tmp_path / "data/train"),
            sample_prompts=["a photo of a bag", "an emoji of red heart"], sample_tokenizer_path=str(tmp_path / "tokenizer"),
            sample_images_per_prompt=3,
        )
    )  # fmt: skip
    (grid_path,) = stage.write_samples(llm, step=5, output_dir=tmp_path / "samples")
    assert Image.open(grid_path).size == (3 * 16, 2 * 16) and llm.training is False
    assert grid_path.with_suffix(".txt").read_text().splitlines() == [
        "a photo of a bag",
        "an emoji of red heart",
    ]
    # A LoRA-wrapped model (the SmolLM2 recipe) draws its grid too.
    stage._sample_pipeline = None
    (lora_grid,) = stage.write_samples(apply_lora(llm, r=2), step=6, output_dir=tmp_path / "samples")
    assert Image.open(lora_grid).size == (3 * 16, 2 * 16)

    assemble(tmp_path / "demo", tmp_path / "tokenizer", tmp_path / "data/init", tmp_path / "data/init", None)
    pipeline = UniMMPipeline.from_pretrained(tmp_path / "demo", dtype=None)  # as stored
    assert pipeline.llm.dtype == torch.bfloat16 and pipeline.detokenizer is None
    end_of_turn = pipeline.processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_of_turn in pipeline.llm.generation_config.eos_token_id  # answers stop at the turn's end
    answer = pipeline.chat("What is this?", images=_any_image(vq_model.config.image_size), max_new_tokens=4)
    assert len(answer.texts) == 1
    images = pipeline.generate_images(["an emoji of grinning face"], decoder="pixel", seed=0).images
    assert images[0].size == (vq_model.config.image_size,) * 2
    assert "Fashion-MNIST" in (tmp_path / "demo/README.md").read_text()
    # The eval step writes the report and puts its figures into the model card.
    counts = dict(num_understanding=4, images_per_class=1, num_judge_real=20, num_reconstruction=2)
    evaluate_and_card(
        tmp_path / "demo", tmp_path / "eval", **counts, num_diffusion_reconstruction=0, num_emoji=2
    )
    card = (tmp_path / "demo/README.md").read_text()
    assert (tmp_path / "eval/report.json").is_file()
    assert "understanding accuracy (Fashion-MNIST test, 4 images)" in card and "reconstruction PSNR" in card


@pytest.mark.integration
def test_build_llm_data_from_a_pretrained_text_model(tmp_path: Path) -> None:
    """A pretrained chat LM (here a tiny one saved to a folder) keeps its weights and tokenizer; the eval
    step asks it and the trained model the text questions."""
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(DualCodebookConfig.tiny()).eval()
    vq_model.save_pretrained(tmp_path / "tokenizer")
    DualCodebookImageProcessor.from_tokenizer_config(vq_model.config).save_pretrained(tmp_path / "tokenizer")
    text_tokenizer = build_word_level_tokenizer(["What is the capital of France?", "Paris."])
    text_model = _tiny_text_model(len(text_tokenizer))
    text_model.save_pretrained(tmp_path / "text-model")
    text_tokenizer.save_pretrained(tmp_path / "text-model")
    args = DemoLlmDataArguments(
        tokenizer_path=str(tmp_path / "tokenizer"), output_dir=str(tmp_path / "data"),
        text_model_name_or_path=str(tmp_path / "text-model"), image_size=32, emoji_repeats=1,
        max_train_images=3, max_eval_images=2, max_grid=4, encode_batch_size=4,
    )  # fmt: skip
    build_llm_data(args)
    llm = UniMMForCausalLM.from_pretrained(tmp_path / "data/init")
    text_rows = text_model.get_input_embeddings().weight
    assert torch.equal(llm.get_input_embeddings().weight[: text_rows.shape[0]], text_rows)
    assert llm.vocabulary.text_vocab_size == text_rows.shape[0]
    train = datasets.load_from_disk(str(tmp_path / "data/train"))
    assert len(train) == 2 * (3 + 3) and max(max(row) for row in train["input_ids"]) < llm.config.vocab_size

    assemble(
        tmp_path / "unified", tmp_path / "tokenizer", tmp_path / "data/init", tmp_path / "data/init", None
    )
    result = compare_text_skills(
        UniMMPipeline.from_pretrained(tmp_path / "unified"), str(tmp_path / "text-model"), tmp_path / "eval"
    )
    assert (
        result["before"]["total"] == result["after"]["total"] == result["after_unconstrained"]["total"] == 20
    )
    saved = (tmp_path / "eval/text_questions.json").read_text()
    assert '"before"' in saved and len(result["after"]["results"]) == 20
    # "after" is what pipeline.chat answers: text mode, so never an image token
    chat = UniMMPipeline.from_pretrained(tmp_path / "unified").chat(
        [row["question"] for row in result["after"]["results"][:3]], max_new_tokens=32
    )
    assert chat.texts == [row["reply"] for row in result["after"]["results"][:3]]


@pytest.mark.integration
def test_build_llm_data_mixes_text_replay(tmp_path: Path) -> None:
    """A quarter of the train rows are text-only chats from the replay file, trained on the answer only; a
    held-out chat goes to the eval table."""
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(DualCodebookConfig.tiny()).eval()
    vq_model.save_pretrained(tmp_path / "tokenizer")
    DualCodebookImageProcessor.from_tokenizer_config(vq_model.config).save_pretrained(tmp_path / "tokenizer")
    chats = [{"question": f"What is thing {i}?", "answer": f"Thing {i} is a thing."} for i in range(4)]
    words = [text for chat in chats for text in chat.values()]
    text_tokenizer = build_word_level_tokenizer(words)
    _tiny_text_model(len(text_tokenizer)).save_pretrained(tmp_path / "text-model")
    text_tokenizer.save_pretrained(tmp_path / "text-model")
    save_text_replay(chats, tmp_path / "data/text_replay.jsonl")  # generated by the model when missing
    args = DemoLlmDataArguments(
        tokenizer_path=str(tmp_path / "tokenizer"), output_dir=str(tmp_path / "data"),
        text_model_name_or_path=str(tmp_path / "text-model"), image_size=32, emoji_repeats=1,
        max_train_images=3, max_eval_images=2, max_grid=4, encode_batch_size=4, text_replay_fraction=0.25,
    )  # fmt: skip
    build_llm_data(args)
    processor = UniMMProcessor.from_pretrained(tmp_path / "data/init")
    boi = processor.vocabulary.boi_token_id
    for split, multimodal, replayed in (("train", 12, 4), ("eval", 8, 1)):
        table = datasets.load_from_disk(str(tmp_path / "data" / split))
        text_only = [row for row in table if boi not in row["input_ids"]]
        assert len(table) == multimodal + replayed and len(text_only) == replayed
        for row in text_only:
            trained = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
            answer = processor.tokenizer.decode(trained, skip_special_tokens=True)
            assert answer in {chat["answer"].lower() for chat in chats}  # the word-level tokenizer lowercases
    with pytest.raises(ValueError, match="needs text_model_name_or_path"):
        DemoLlmDataArguments(
            tokenizer_path="t", output_dir="o", backbone=TINY_BACKBONE, text_replay_fraction=0.25
        )


def _any_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), "white")
