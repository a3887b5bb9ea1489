import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import unimm  # noqa: F401  (registers the Auto classes)
from unimm.data.schema import image_segment, image_tokens_segment, text_segment
from unimm.llm import UniMMProcessor
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer


@pytest.fixture
def vq_model():
    torch.manual_seed(0)
    return DualCodebookTokenizer(DualCodebookConfig.tiny()).eval()


@pytest.fixture
def processor(tiny, text_tokenizer, vq_model):
    image_processor = DualCodebookImageProcessor.from_tokenizer_config(vq_model.config)
    return UniMMProcessor.from_config(tiny.config(), text_tokenizer, image_processor, vq_model=vq_model)


def ids_of(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_sample_masks_everything_but_the_assistant_answer(processor):
    vocabulary = processor.vocabulary
    image = Image.new("RGB", (16, 16), "red")
    chat = {
        "segments": [
            image_segment(image, "user"),
            text_segment("what is this ?", "user"),
            text_segment("a red shirt", "assistant"),
        ]
    }
    output = processor(chat)
    input_ids, labels = output["input_ids"][0].tolist(), output["labels"][0].tolist()
    grid = processor.encode_images([image])[0]
    assert tuple(grid.shape) == (4, 4)
    image_ids = vocabulary.image_to_token_ids(grid).tolist()
    answer = ids_of(processor, "a red shirt <|end|>")
    expected = (
        ids_of(processor, "<|user|>") + image_ids + ids_of(processor, "what is this ? <|end|> <|assistant|>")
    )
    assert input_ids == expected + answer
    assert labels == [-100] * len(expected) + answer
    assert output["attention_mask"].tolist() == [[1] * len(input_ids)]


def test_plain_interleaved_sample_with_precomputed_ids_and_modality_masks(processor):
    vocabulary = processor.vocabulary
    sample = {
        "segments": [
            text_segment("a cat"),
            image_tokens_segment(list(range(6)), [2, 3]),
            text_segment("here"),
        ]
    }
    image_ids = vocabulary.image_to_token_ids(torch.arange(6).view(2, 3)).tolist()
    expected = [1, *ids_of(processor, "a cat"), *image_ids, *ids_of(processor, "here"), 2]
    output = processor(sample)
    assert output["input_ids"][0].tolist() == expected
    assert output["labels"][0].tolist() == [-100, *expected[1:]]
    image_only = processor(sample, loss_on_text=False)["labels"][0].tolist()
    assert [t for t in image_only if t != -100] == image_ids
    text_only = processor(sample, loss_on_images=False)["labels"][0].tolist()
    assert not any(vocabulary.is_image_token(torch.tensor(text_only)).tolist())


def test_batch_padding_sides_and_unconditional_rows(processor):
    messages = [
        [{"role": "user", "content": "draw a small cat"}],
        [{"role": "user", "content": [{"type": "text", "text": "draw a dog"}]}],
    ]
    output = processor(
        messages=messages, add_generation_prompt=True, padding_side="left", return_unconditional=True
    )
    header = ids_of(processor, "<|assistant|>")
    assert output["input_ids"][0].tolist()[-len(header) :] == header
    assert output["attention_mask"][1].tolist()[0] == 0  # shorter row padded on the left
    unconditional = ids_of(processor, "<|user|> <|end|> <|assistant|>")
    assert output["unconditional_input_ids"].tolist() == [unconditional, unconditional]
    assert (output["labels"] == -100).all()


def test_batch_decode_splits_text_and_images(processor):
    vocabulary = processor.vocabulary
    image = vocabulary.image_to_token_ids(torch.tensor([[3, 4]])).tolist()
    sequences = [ids_of(processor, "a cat") + image + ids_of(processor, "here") + [2, 0, 0]]
    texts, images = processor.batch_decode(sequences)
    assert texts == ["a cat<|image|>here"]
    assert [grid.tolist() for grid in images[0]] == [[[3, 4]]]


def test_save_and_load_round_trip(processor, tmp_path, tiny):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UniMMProcessor)
    assert isinstance(loaded.image_processor, DualCodebookImageProcessor)
    assert loaded.vq_model is None
    assert (loaded.text_vocab_size, loaded.codebook_size) == (tiny.text_vocab, tiny.codebook)
    sample = {"segments": [text_segment("hi", "user"), image_tokens_segment([1, 2], [1, 2], "assistant")]}
    for key, value in processor(sample).items():
        assert torch.equal(loaded(sample)[key], value)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p(), "exactly one of"),
        (lambda p: p({"segments": []}), "non-empty 'segments'"),
        (lambda p: p({"segments": [image_tokens_segment([1, 2, 3], [2, 2])]}), "image_grid"),
        (lambda p: p({"segments": [text_segment("hi")]}, loss_on="prompt"), "loss_on"),
        (lambda p: p(messages=[{"content": "hi"}]), "role"),
        (lambda p: p({"segments": [text_segment("hi")]}, padding_side="up"), "padding_side"),
        # The HF tokenizer raises TypeError on a lone surrogate; the server answered 500.
        (lambda p: p(messages=[{"role": "user", "content": "a \ud800 b"}]), "cannot be encoded as UTF-8"),
        (lambda p: p({"segments": [{**text_segment("x"), "text": 3}]}), "text must be a string"),
    ],
)
def test_bad_input(processor, call, match):
    with pytest.raises(ValueError, match=match):
        call(processor)


def test_pixel_images_need_the_visual_tokenizer(tiny, text_tokenizer, vq_model):
    image_processor = DualCodebookImageProcessor.from_tokenizer_config(vq_model.config)
    processor = UniMMProcessor.from_config(tiny.config(), text_tokenizer, image_processor)
    with pytest.raises(ValueError, match="vq_model"):
        processor({"segments": [image_segment(Image.new("RGB", (16, 16)))]})
