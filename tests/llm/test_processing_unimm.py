import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import unimm  # noqa: F401  (registers the Auto classes)
from unimm.data.schema import image_segment, image_tokens_segment, text_segment
from unimm.llm import UniMMProcessor
from unimm.llm.processing_unimm import encode_by_size
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


@pytest.fixture
def encode_calls(vq_model, monkeypatch):
    """The pixel batch shape of every call of the visual tokenizer's ``encode``."""
    calls = []
    original = vq_model.encode

    def counting(pixel_values):
        calls.append(tuple(pixel_values.shape))
        return original(pixel_values)

    monkeypatch.setattr(vq_model, "encode", counting)
    return calls


def chats_with_images_of_two_sizes() -> list[dict]:
    """Four conversations, five images (16x16 and 16 wide x 8 high, kept at their size), one given as ids."""
    sizes = {"square": (16, 16), "wide": (16, 8)}
    chats = []
    for index, kinds in enumerate([["square"], ["wide", "square"], ["wide"], ["square"]]):
        images = [
            image_segment(Image.new("RGB", sizes[kind], (60 * index, 20, 90)), "user") for kind in kinds
        ]
        segments = [*images, text_segment("what is this ?", "user"), text_segment("a red shirt", "assistant")]
        chats.append({"segments": segments})
    chats[3]["segments"].insert(0, image_tokens_segment(list(range(4)), [2, 2], "user"))
    return chats


def test_a_batch_encodes_its_images_in_one_call_per_size_as_one_by_one(
    tiny, text_tokenizer, vq_model, encode_calls
):
    image_processor = DualCodebookImageProcessor.from_tokenizer_config(vq_model.config, size=None)
    processor = UniMMProcessor.from_config(tiny.config(), text_tokenizer, image_processor, vq_model=vq_model)
    chats = chats_with_images_of_two_sizes()
    batch = processor(chats, return_unconditional=True)
    assert encode_calls == [(3, 3, 16, 16), (2, 3, 8, 16)]  # the unconditional rows reuse the grids
    for row, chat in enumerate(chats):
        alone = processor(chat, return_unconditional=True)  # one image per call: today's one-by-one encoding
        for name, mask in [("input_ids", "attention_mask"), ("labels", "attention_mask"),
                           ("unconditional_input_ids", "unconditional_attention_mask")]:  # fmt: skip
            kept = batch[mask][row].bool()
            assert batch[name][row][kept].tolist() == alone[name][0].tolist()
    assert len(encode_calls) == 2 + 5


def test_image_grids_fill_the_placeholders_without_the_visual_tokenizer(tiny, text_tokenizer, vq_model):
    image_processor = DualCodebookImageProcessor.from_tokenizer_config(vq_model.config, size=None)
    with_model = UniMMProcessor.from_config(tiny.config(), text_tokenizer, image_processor, vq_model=vq_model)
    without_model = UniMMProcessor.from_config(tiny.config(), text_tokenizer, image_processor)
    chats = chats_with_images_of_two_sizes()
    pixel_values = without_model.batch_pixel_values(chats)
    assert [tuple(pixels.shape) for pixels in pixel_values] == [(3, 16, 16), (3, 8, 16), (3, 16, 16),
                                                                (3, 8, 16), (3, 16, 16)]  # fmt: skip
    grids = encode_by_size(vq_model, pixel_values)
    filled = without_model(chats, image_grids=grids, return_unconditional=True)
    expected = with_model(chats, return_unconditional=True)
    assert expected.keys() == filled.keys()
    assert all(torch.equal(filled[name], expected[name]) for name in expected)
    assert all(segment.get("image_token_ids") is None for segment in chats[0]["segments"])  # inputs untouched
    with pytest.raises(ValueError, match="`image_grids` holds 4 grids but the batch has 5 pixel images"):
        without_model(chats, image_grids=grids[:4])
