"""`unimm demo`: scenes run turn by turn, one batched pipeline call per turn, answers joining the conversation;
the picture wraps its labels instead of cutting them."""

from __future__ import annotations

import PIL.Image
import pytest

from unimm.commands import demo, labelled_picture
from unimm.commands.demo import (
    CONVERSATION,
    EMOJI,
    FASHION_MNIST,
    IMAGE,
    INTERLEAVED,
    TALL,
    WIDE,
    DemoImage,
    Exchange,
    Request,
    Settings,
    Turn,
    drawings,
    run_scene,
)
from unimm.commands.labelled_picture import Card, Images, Section, Text, font, render_sections, wrap


class PlainImages:
    """Stands in for the demo datasets: a flat image per shown item."""

    def image(self, shown: DemoImage) -> PIL.Image.Image:
        return PIL.Image.new("RGB", (16, 16), (200, 40, 40) if shown.source == EMOJI else (90, 90, 90))

    @staticmethod
    def note(shown: DemoImage) -> str:
        return f"shown: {shown.name}"


@pytest.fixture
def calls(tiny_pipeline, monkeypatch) -> list[tuple[str, int]]:
    """(method, batch size) of every pipeline call the demo makes."""
    made: list[tuple[str, int]] = []
    for name in ("chat", "generate", "generate_images"):
        method = getattr(tiny_pipeline, name)

        def spy(messages, *args, _name=name, _method=method, **kwargs):
            made.append((_name, len(messages)))
            return _method(messages, *args, **kwargs)

        monkeypatch.setattr(tiny_pipeline, name, spy)
    return made


def test_a_conversation_runs_one_batched_call_per_turn_and_keeps_its_history(tiny_pipeline, calls):
    requests = (
        Request(CONVERSATION, DemoImage(FASHION_MNIST, "sneaker")),
        Request(CONVERSATION, DemoImage(EMOJI, "pizza")),
    )
    exchanges = run_scene(
        tiny_pipeline, requests, PlainImages(), Settings(seed=0, decoder="pixel", images_per_prompt=1)
    )
    assert calls == [("chat", 2), ("generate", 2), ("chat", 2)]  # three turns, both conversations each time
    for exchange, name in zip(exchanges, ("sneaker", "pizza")):
        assert exchange.note == f"shown: {name}"
        assert [message["role"] for message in exchange.messages] == ["user", "assistant"] * 3
        kinds = [[part["type"] for part in message["content"]] for message in exchange.messages]
        assert kinds == [["image", "text"], ["text"], ["text"], ["image"], ["text"], ["text"]]
        assert [exchange.messages[index]["content"][-1].get("text") for index in (0, 2, 4)] == [
            turn.text for turn in CONVERSATION
        ]


def test_plain_prompts_of_every_shape_are_one_generate_images_call(tiny_pipeline, calls):
    requests = (*drawings(("a cat",), WIDE), *drawings(("a dog",), TALL), *drawings(("a bag",)))
    settings = Settings(seed=0, decoder="pixel", images_per_prompt=2)
    exchanges = run_scene(tiny_pipeline, requests, PlainImages(), settings, per_prompt=True)
    assert calls == [("generate_images", 3)]
    side = tiny_pipeline.image_grid()[0] * tiny_pipeline.visual_tokenizer.config.downsample_factor
    sizes = [[part["image"].size for part in exchange.messages[1]["content"]] for exchange in exchanges]
    assert sizes == [
        [(2 * side, side)] * 2,
        [(side, 2 * side)] * 2,
        [(side, side)] * 2,
    ]  # PIL: (width, height)


def test_edits_and_interleaved_answers_fit_the_context(tiny_pipeline, calls):
    requests = (
        Request((Turn("Mirror it.", IMAGE),), DemoImage(FASHION_MNIST, "sneaker")),
        Request((Turn("Show me a sneaker and a bag.", INTERLEAVED),)),
    )
    exchanges = run_scene(
        tiny_pipeline, requests, PlainImages(), Settings(seed=0, decoder="pixel", images_per_prompt=1)
    )
    assert calls == [("generate", 1), ("generate", 1)]
    assert [part["type"] for part in exchanges[0].messages[1]["content"]] == ["image"]
    assert exchanges[1].messages[1]["content"]  # the untrained model's text or images, within its context


def test_token_room_leaves_the_prompt_its_place_in_the_context(tiny_pipeline):
    context = tiny_pipeline.llm.config.text_config.max_position_embeddings
    conversation = [{"role": "user", "content": [{"type": "text", "text": "draw a cat"}]}]
    prompt = int(
        tiny_pipeline.processor(messages=[conversation], add_generation_prompt=True)["attention_mask"].sum()
    )
    assert demo.token_room(tiny_pipeline, [conversation], 8) == 8
    assert demo.token_room(tiny_pipeline, [conversation], 10 * context) == context - prompt


@pytest.mark.parametrize(
    "build",
    [lambda: Turn("draw", "video"), lambda: Request(()), lambda: Request((Turn("a"),), layout="round"),
     lambda: DemoImage("cifar", "cat")],
)  # fmt: skip
def test_bad_scene_data_fails_where_it_is_written(build):
    with pytest.raises(ValueError):
        build()


def test_the_transcript_names_speakers_and_counts_images():
    small, wide = PIL.Image.new("RGB", (16, 16)), PIL.Image.new("RGB", (32, 16))
    exchange = Exchange(
        "shown: bag",
        [
            {"role": "user", "content": [{"type": "image", "image": small}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "image", "image": small}] * 2 + [{"type": "image", "image": wide}]},
        ],
    )  # fmt: skip
    assert demo.transcript("Scene", [exchange]).splitlines() == [
        "== Scene ==",
        "[shown: bag]",
        "  you: <image 16x16> What?",
        "  model: <2 images 16x16> <image 16x32>",
    ]


def test_a_card_labels_each_message_once_and_keeps_image_runs_together():
    image = PIL.Image.new("RGB", (16, 16))
    exchange = Exchange(
        "shown: bag",
        [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a bag:"}, {"type": "image", "image": image},
                                              {"type": "image", "image": image}]},
            {"role": "assistant", "content": []},
        ],
    )  # fmt: skip
    pieces = demo.card(exchange).pieces
    texts = [piece.text for piece in pieces if isinstance(piece, Text)]
    assert texts == ["shown: bag", "you:", "What?", "model: a bag:", "model: (nothing)"]
    assert [len(piece.images) for piece in pieces if isinstance(piece, Images)] == [1, 2]


def test_wrap_keeps_every_character_within_the_width():
    typeface = font(labelled_picture.TEXT_SIZE)
    text = (
        "a photo of a pair of trousers, an emoji of AB button (blood type) supercalifragilisticexpialidocious"
    )
    lines = wrap(text, 60, typeface)
    assert len(lines) > 3 and all(typeface.getlength(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_the_picture_grows_to_its_labels_and_wraps_its_cards():
    image = PIL.Image.new("RGB", (32, 32), "black")
    short = Card([Text("a bag"), Images([image])])
    long = Card([Text("a photo of a pair of trousers " * 4), Images([image])])
    one = render_sections([Section("short", [short])])
    other = render_sections([Section("long", [long])])
    assert other.height > one.height and other.width == one.width  # the text wrapped, not cut nor widened
    wide = render_sections([Section("wide", [Card([Images([PIL.Image.new("RGB", (64, 32))])])])])
    assert wide.width > one.width
    many = render_sections([Section(f"section {index}", [short] * 12) for index in range(3)], header="demo")
    assert many.width <= labelled_picture.PAGE_MAX_WIDTH and many.height > 3 * one.height
