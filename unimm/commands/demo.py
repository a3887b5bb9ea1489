"""`unimm demo`: every skill of a unified model, on the embedded demo checkpoint, in one labelled picture and a
printed transcript.

The show is a list of scenes (:data:`DEMO_SCENES`): questions about Fashion-MNIST test garments and about emoji
of the training split (held-out emoji are scored by `unimm eval`: their names cannot be known), drawing from
free-form prompts, a three-turn conversation, interleaved answers, edits and wide and tall images. A scene is a
batch of requests, each a conversation of user turns with the kind of answer each asks for; every turn of a
scene runs as one batched call of the public pipeline API (``chat``, ``generate_images``, ``generate``), with
one fixed seed. A checkpoint never taught a skill answers it wrongly, and the demo shows that as it is.

Without a checkpoint (it is trained by recipes/demo/), this writes a grid of the offline demo data with its
captions and says what is missing.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from unimm.commands.labelled_picture import Card, Images, Section, Text, render_sections
from unimm.commands.pipeline_arguments import (
    DEFAULT_CHECKPOINT,
    add_pipeline_arguments,
    captioned_grid,
    load_pipeline,
    report_error,
    stack_rows,
)

if TYPE_CHECKING:
    from unimm.pipelines import UniMMPipeline

logger = logging.getLogger(__name__)

# What a turn asks for.
TEXT, IMAGE, INTERLEAVED = "text", "image", "interleaved"
ANSWER_KINDS = (TEXT, IMAGE, INTERLEAVED)
# The shape of image answers: the model's default grid, twice as wide, or twice as tall.
SQUARE, WIDE, TALL = "square", "wide", "tall"
LAYOUT_SCALE = {SQUARE: (1, 1), WIDE: (1, 2), TALL: (2, 1)}  # (height, width) times the default grid
# Where shown images come from: Fashion-MNIST's test split, and the emoji the model was trained on.
FASHION_MNIST, EMOJI = "fashion_mnist", "emoji"
IMAGE_SOURCES = (FASHION_MNIST, EMOJI)
USER, ASSISTANT = "user", "assistant"
SPEAKERS = {USER: "you", ASSISTANT: "model"}
SPEAKER_COLOURS = {USER: (25, 55, 140), ASSISTANT: (20, 110, 45)}
NOTE_COLOUR = (110, 110, 110)

ANSWER_TOKENS = 32  # a text answer ("an emoji of red heart.") takes under ten
INTERLEAVED_TOKENS = 320  # two or three 8x8 images (76 tokens each) and the text around them
PICTURE_NAME = "demo.png"


@dataclass(frozen=True)
class DemoImage:
    """An image shown to the model: the ``index``-th Fashion-MNIST test image of class ``name``, or the
    training-split emoji called ``name``."""

    source: str
    name: str
    index: int = 0

    def __post_init__(self) -> None:
        if self.source not in IMAGE_SOURCES:
            raise ValueError(f"DemoImage source must be one of {IMAGE_SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class Turn:
    """A user turn and the kind of answer it asks for (``TEXT``, ``IMAGE`` or ``INTERLEAVED``)."""

    text: str
    answer: str = TEXT

    def __post_init__(self) -> None:
        if self.answer not in ANSWER_KINDS:
            raise ValueError(
                f"Turn({self.text!r}): answer must be one of {ANSWER_KINDS}, got {self.answer!r}"
            )


@dataclass(frozen=True)
class Request:
    """One conversation of a scene: its user turns, the image shown with the first, the shape of image
    answers."""

    turns: tuple[Turn, ...]
    shown: DemoImage | None = None
    layout: str = SQUARE

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("a Request needs at least one turn")
        if self.layout not in LAYOUT_SCALE:
            raise ValueError(f"layout must be one of {tuple(LAYOUT_SCALE)}, got {self.layout!r}")


@dataclass(frozen=True)
class Scene:
    """A titled batch of requests. ``count`` names the option that caps how many are shown
    (``"num_images"``, ``"num_prompts"``, or None: all); ``per_prompt``: text-to-image requests draw
    ``--num-images-per-prompt`` images each."""

    title: str
    requests: tuple[Request, ...]
    count: str | None = None
    per_prompt: bool = False


@dataclass
class Exchange:
    """A request as it ran: a note on what was shown, and the chat messages, answers included."""

    note: str
    messages: list[dict] = field(default_factory=list)


def questions(source: str, names: Sequence[str], wordings: Sequence[str]) -> tuple[Request, ...]:
    """One question per shown image, the wordings taken in turn."""
    return tuple(
        Request((Turn(wordings[index % len(wordings)]),), shown=DemoImage(source, name))
        for index, name in enumerate(names)
    )


def drawings(prompts: Sequence[str], layout: str = SQUARE) -> tuple[Request, ...]:
    """One text-to-image request per prompt."""
    return tuple(Request((Turn(prompt, IMAGE),), layout=layout) for prompt in prompts)


QUESTION_WORDINGS = ("What is this?", "What do you see?", "What is in the picture?")
GARMENTS = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
TRAINING_EMOJI = (
    "red heart", "pizza", "rocket", "grinning face", "fire", "penguin", "rainbow", "sun", "snowman", "cat face",
)  # fmt: skip
GARMENT_PROMPTS = (
    "sneaker", "Draw a handbag!", "a pair of trousers", "please draw a dress", "Ankle boot.", "show me a pullover",
)  # fmt: skip
EMOJI_PROMPTS = (
    "an emoji of red heart",
    "Draw an emoji of pizza!",
    "show me an emoji of rocket",
    "an emoji of grinning face.",
    "make an emoji of rainbow",
    "An emoji of penguin, please.",
)
CONVERSATION = (Turn("What is this?"), Turn("Draw another one like it.", IMAGE), Turn("What did you draw?"))
EDITS = ("Mirror it.", "Invert the colours.", "Make it darker.", "Turn it into a sandal.")

DEMO_SCENES = (
    Scene(
        "Questions about Fashion-MNIST test garments",
        questions(FASHION_MNIST, GARMENTS, QUESTION_WORDINGS),
        count="num_images",
    ),
    Scene(
        "Questions about emoji of the training split (held-out emoji names cannot be known)",
        questions(EMOJI, TRAINING_EMOJI, QUESTION_WORDINGS),
        count="num_images",
    ),
    Scene(
        "Drawing garments from free-form prompts", drawings(GARMENT_PROMPTS), "num_prompts", per_prompt=True
    ),
    Scene("Drawing emoji", drawings(EMOJI_PROMPTS), "num_prompts", per_prompt=True),
    Scene(
        "A three-turn conversation: each answer depends on the turns before it",
        (
            Request(CONVERSATION, DemoImage(FASHION_MNIST, "sneaker", 1)),
            Request(CONVERSATION, DemoImage(EMOJI, "pizza")),
        ),
    ),
    Scene(
        "Interleaved answers: text and images in the order asked",
        (
            Request((Turn("Show me a sneaker and a bag.", INTERLEAVED),)),
            Request((Turn("Draw an emoji of fire and an emoji of rocket.", INTERLEAVED),)),
        ),
    ),
    Scene(
        "Edits: an image in, an image out",
        tuple(Request((Turn(edit, IMAGE),), DemoImage(FASHION_MNIST, "sneaker", 2)) for edit in EDITS),
    ),
    Scene(
        "Other aspect ratios: wide and tall images from one checkpoint",
        (
            *drawings(("a sneaker next to a bag", "an emoji of pizza next to an emoji of fire"), WIDE),
            *drawings(("a t-shirt above a pair of trousers",), TALL),
        ),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where the PNG is written")
    parser.add_argument(
        "--num-images",
        type=_positive,
        default=len(GARMENTS),
        help=f"images per dataset to ask about (default: {len(GARMENTS)}, at most {len(GARMENTS)})",
    )
    parser.add_argument(
        "--num-prompts",
        type=_positive,
        default=4,
        help=f"prompts per dataset to draw (default: 4, at most {len(GARMENT_PROMPTS)})",
    )
    parser.add_argument(
        "--num-images-per-prompt", type=_positive, default=4, help="images drawn per prompt (default: 4)"
    )
    parser.add_argument(
        "--decoder",
        choices=("pixel", "diffusion"),
        default="pixel",
        help="the tokenizer's fast pixel decoder (default: keeps the demo within seconds on a CPU), or the "
        "diffusion detokenizer (finer, some seconds per batch on a CPU)",
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return number


# --- the shown images ----------------------------------------------------------------------------------


class DemoImages:
    """The images scenes show, looked up by class or name: Fashion-MNIST's test split (the model never saw
    these images) and the emoji of the training split (the model can know their names)."""

    def __init__(self) -> None:
        self._splits: dict[str, Any] = {}
        self._positions: dict[str, dict[str, list[int]]] = {}

    def _lookup(self, source: str) -> tuple[Any, dict[str, list[int]]]:
        from unimm.data.demo_datasets import FASHION_MNIST_CAPTION_NAMES, load_emoji, load_fashion_mnist

        if source not in self._splits:
            if source == FASHION_MNIST:
                split = load_fashion_mnist()["test"]
                names = [FASHION_MNIST_CAPTION_NAMES[label] for label in split["label"]]
            else:
                split = load_emoji()["train"]
                names = [name.replace("_", " ") for name in split["name"]]
            positions: dict[str, list[int]] = {}
            for position, name in enumerate(names):
                positions.setdefault(name, []).append(position)
            self._splits[source], self._positions[source] = split, positions
        return self._splits[source], self._positions[source]

    def image(self, shown: DemoImage) -> Image.Image:
        split, positions = self._lookup(shown.source)
        found = positions.get(shown.name, [])
        if len(found) <= shown.index:
            where = "Fashion-MNIST test split" if shown.source == FASHION_MNIST else "emoji training split"
            raise ValueError(
                f"the {where} holds {len(found)} images of {shown.name!r}, not {shown.index + 1}"
            )
        return split[found[shown.index]]["segments"][0]["image"]

    @staticmethod
    def note(shown: DemoImage) -> str:
        return (
            f"Fashion-MNIST test image: {shown.name}"
            if shown.source == FASHION_MNIST
            else f"emoji: {shown.name}"
        )


# --- running a scene -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What every pipeline call of the demo shares."""

    seed: int
    decoder: str
    images_per_prompt: int


def layout_size(pipeline: UniMMPipeline, layout: str) -> tuple[int | None, int | None]:
    """``(height, width)`` in pixels of image answers of ``layout``; ``(None, None)`` (the model's default
    size) for ``SQUARE``."""
    if layout == SQUARE:
        return None, None
    height, width = pipeline.image_grid()  # the default grid
    factor = pipeline.visual_tokenizer.config.downsample_factor
    scale_height, scale_width = LAYOUT_SCALE[layout]
    return height * scale_height * factor, width * scale_width * factor


def token_room(pipeline: UniMMPipeline, conversations: list[list[dict]], wanted: int) -> int:
    """``wanted`` new tokens, or fewer where the longest prompt leaves less room in the model's context."""
    context = getattr(pipeline.llm.config.text_config, "max_position_embeddings", None)
    if context is None:
        return wanted
    batch = pipeline.processor(messages=conversations, add_generation_prompt=True)
    return max(1, min(wanted, context - int(batch["attention_mask"].sum(-1).max())))


@dataclass
class Asked:
    """The requests of a scene that ask for one kind of answer at one turn: their conversations so far (the
    user turn included), and whether text-to-image requests draw ``images_per_prompt`` images."""

    conversations: list[list[dict]]
    requests: list[Request]
    per_prompt: bool


def answer_text(pipeline: UniMMPipeline, asked: Asked, settings: Settings) -> list[list[dict]]:
    room = token_room(pipeline, asked.conversations, ANSWER_TOKENS)
    texts = pipeline.chat(asked.conversations, max_new_tokens=room, seed=settings.seed).texts
    return [[{"type": "text", "text": text}] for text in texts]


def answer_image(pipeline: UniMMPipeline, asked: Asked, settings: Settings) -> list[list[dict]]:
    """Plain prompts through ``generate_images`` (every size in one call); conversations with images or
    earlier turns through ``generate(output="image")``, one call per size."""
    conversations = asked.conversations
    sizes = [layout_size(pipeline, request.layout) for request in asked.requests]
    if all(len(conversation) == 1 and _is_text_only(conversation[0]) for conversation in conversations):
        count = settings.images_per_prompt if asked.per_prompt else 1
        images = pipeline.generate_images(
            [_text_of(conversation[0]) for conversation in conversations],
            num_images_per_prompt=count,
            height=[height for height, _ in sizes],
            width=[width for _, width in sizes],
            seed=settings.seed,
            decoder=settings.decoder,
        ).images
        return [
            _image_parts(images[index * count : (index + 1) * count]) for index in range(len(conversations))
        ]
    answers: list[list[dict]] = [[] for _ in conversations]
    for size in dict.fromkeys(sizes):
        indices = [index for index, other in enumerate(sizes) if other == size]
        output = pipeline.generate(
            [conversations[index] for index in indices],
            output=IMAGE,
            height=size[0],
            width=size[1],
            seed=settings.seed,
            decoder=settings.decoder,
        )
        for index, segments in zip(indices, output.segments):
            answers[index] = _content(segments)
    return answers


def answer_interleaved(pipeline: UniMMPipeline, asked: Asked, settings: Settings) -> list[list[dict]]:
    """Text and images as the model decides, their sizes too (the engine keeps each size to what still fits
    the token budget)."""
    output = pipeline.generate(
        asked.conversations,
        output=INTERLEAVED,
        max_new_tokens=token_room(pipeline, asked.conversations, INTERLEAVED_TOKENS),
        seed=settings.seed,
        decoder=settings.decoder,
    )
    return [_content(segments) for segments in output.segments]


ANSWERERS: dict[str, Callable[[UniMMPipeline, Asked, Settings], list[list[dict]]]] = {
    TEXT: answer_text,
    IMAGE: answer_image,
    INTERLEAVED: answer_interleaved,
}


def _is_text_only(message: dict) -> bool:
    return all(part["type"] == "text" for part in message["content"])


def _text_of(message: dict) -> str:
    return " ".join(part["text"] for part in message["content"] if part["type"] == "text")


def _image_parts(images: list[Image.Image]) -> list[dict]:
    return [{"type": "image", "image": image} for image in images]


def _content(segments: list[str | Image.Image]) -> list[dict]:
    """Interleaved output segments as chat content parts."""
    return [
        {"type": "text", "text": segment} if isinstance(segment, str) else {"type": "image", "image": segment}
        for segment in segments
    ]


def run_scene(
    pipeline: UniMMPipeline,
    requests: Sequence[Request],
    images: DemoImages,
    settings: Settings,
    per_prompt: bool = False,
) -> list[Exchange]:
    """Every request's conversation, turn by turn: at each turn the requests asking for the same kind of
    answer are answered by one pipeline call, and the answers join the conversations."""
    exchanges = [Exchange(images.note(request.shown) if request.shown else "") for request in requests]
    for number in range(max(len(request.turns) for request in requests)):
        by_kind: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            if number >= len(request.turns):
                continue
            turn = request.turns[number]
            shown = _image_parts([images.image(request.shown)]) if number == 0 and request.shown else []
            content = [*shown, {"type": "text", "text": turn.text}]
            exchanges[index].messages.append({"role": USER, "content": content})
            by_kind.setdefault(turn.answer, []).append(index)
        for kind, indices in by_kind.items():
            batch = Asked(
                [exchanges[index].messages for index in indices],
                [requests[index] for index in indices],
                per_prompt,
            )
            for index, content in zip(indices, ANSWERERS[kind](pipeline, batch, settings)):
                exchanges[index].messages.append({"role": ASSISTANT, "content": content})
    return exchanges


def scene_requests(scene: Scene, args: argparse.Namespace) -> tuple[Request, ...]:
    """The scene's requests, as many as its ``count`` option asks for."""
    return scene.requests if scene.count is None else scene.requests[: getattr(args, scene.count)]


# --- showing it ----------------------------------------------------------------------------------------


def transcript(title: str, exchanges: list[Exchange]) -> str:
    """A scene as text: its title, then per request the note and every message, images as ``<image HxW>``."""
    lines = [f"== {title} =="]
    for exchange in exchanges:
        if exchange.note:
            lines.append(f"[{exchange.note}]")
        for message in exchange.messages:
            lines.append(f"  {SPEAKERS[message['role']]}: " + " ".join(_describe(message["content"])))
    return "\n".join(lines)


def _describe(content: list[dict]) -> list[str]:
    """Content parts as words: texts as they are, a run of images of one size as ``<3 images 32x32>``."""
    words: list[str] = []
    for is_image, parts in groupby(content, key=lambda part: part["type"] == "image"):
        if not is_image:
            words.extend(part["text"] or '""' for part in parts)
            continue
        for (width, height), same in groupby(parts, key=lambda part: part["image"].size):
            count = len(list(same))
            words.append(f"<{'image' if count == 1 else f'{count} images'} {height}x{width}>")
    return words


def card(exchange: Exchange) -> Card:
    """A request as a card: the note in grey, then each message in order, its speaker before its first text
    (or alone above a leading image)."""
    pieces: list[Text | Images] = [Text(exchange.note, NOTE_COLOUR)] if exchange.note else []
    for message in exchange.messages:
        role, speaker = message["role"], SPEAKERS[message["role"]] + ":"
        colour, labelled = SPEAKER_COLOURS[role], False
        for part in message["content"]:
            if part["type"] == "text":
                pieces.append(Text(part["text"] if labelled else f"{speaker} {part['text']}", colour))
            else:
                if not labelled:
                    pieces.append(Text(speaker, colour))
                if pieces and isinstance(pieces[-1], Images):
                    pieces[-1].images.append(part["image"])
                else:
                    pieces.append(Images([part["image"]]))
            labelled = True
        if not labelled:  # an empty answer
            pieces.append(Text(f"{speaker} (nothing)", colour))
    return Card(pieces)


def run_pipeline_demo(args: argparse.Namespace) -> int:
    # 1. The model; its progress bars stay off (the transcript is the output).
    try:
        pipeline = load_pipeline(args)
    except (OSError, ValueError) as error:
        return report_error(error)
    pipeline.set_progress_bar_config(disable=True)
    settings = Settings(args.seed, args.decoder, args.num_images_per_prompt)
    header = (
        f"unimm demo of {args.checkpoint}: images decoded by the {args.decoder} decoder, seed {args.seed}. "
        "Answers are the model's own, right or wrong."
    )
    print(header)
    # 2. Every scene, each turn one batched pipeline call; its transcript as soon as it is done.
    images, sections = DemoImages(), []
    for scene in DEMO_SCENES:
        start = time.perf_counter()
        try:
            exchanges = run_scene(pipeline, scene_requests(scene, args), images, settings, scene.per_prompt)
        except ValueError as error:  # e.g. a checkpoint whose grids cannot hold a wide image
            logger.warning("%s: left out (%s)", scene.title, error)
            continue
        logger.info("%s: %.1f s", scene.title, time.perf_counter() - start)
        print(f"\n{transcript(scene.title, exchanges)}")
        sections.append(Section(scene.title, [card(exchange) for exchange in exchanges]))
    # 3. One picture of every scene.
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / PICTURE_NAME
    render_sections(sections, header).save(path)
    print(f"\npicture: {path}")
    return 0


# --- without a checkpoint ------------------------------------------------------------------------------


def demo_samples(num_images: int) -> list[tuple[list[Image.Image], list[str]]]:
    """(images, captions) of the first ``num_images`` Fashion-MNIST and emoji test samples."""
    from unimm.data.demo_datasets import load_emoji, load_fashion_mnist  # here: `unimm --help` stays light

    samples = []
    for dataset in (load_fashion_mnist()["test"], load_emoji()["test"]):
        rows = dataset.select(range(min(num_images, len(dataset))))
        samples.append(([row["segments"][0]["image"] for row in rows], rows["caption"]))
    return samples


def write_data_grid(output_dir: Path, num_images: int) -> Path:
    rows = [captioned_grid(images, captions) for images, captions in demo_samples(num_images)]
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "demo_data.png"
    stack_rows(rows).save(path)
    return path


def main(args: argparse.Namespace) -> int:
    if (Path(args.checkpoint) / "model_index.json").is_file():
        return run_pipeline_demo(args)
    path = write_data_grid(args.output_dir, args.num_images)
    logger.info("demo data (Fashion-MNIST and emoji test images with captions): %s", path)
    logger.warning(
        "no demo checkpoint at %s (it is trained by recipes/demo/): only the data grid was written; "
        "pass --checkpoint to use another model",
        args.checkpoint,
    )
    return 0


__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEMO_SCENES",
    "Request",
    "Scene",
    "Turn",
    "add_arguments",
    "main",
    "run_scene",
]
