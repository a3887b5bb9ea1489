"""The unified skills' evaluation tasks (``unimm eval --task skills``).

Metrics are checked three ways: pure helpers against golden values; every task on an *oracle* pipeline (the
public API's signatures, answering each skill perfectly for coloured squares) scores 100% and meets the edit
target, and a model that returns its input unedited scores exactly the unedited baseline; and the tasks on the
tiny random pipeline and through ``unimm eval`` for records, files and ranges (integration)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import yaml

from unimm import cli
from unimm.commands.eval import SKILL_TASK_NAMES, build_tasks
from unimm.data.demo_datasets import FASHION_MNIST_TEMPLATES
from unimm.data.skills import (
    DARKER,
    DEFAULT_DRAW_OTHER,
    INVERT,
    MIRROR,
    TALL,
    WIDE,
    PhraseTemplate,
    article,
    edit_pixels,
)
from unimm.evaluation.skill_base import DEMO_CLASSES, ClassNames
from unimm.evaluation.skill_tasks import (
    DEFAULT_WORDINGS,
    SKILL_TASKS,
    CompositionTask,
    EditTask,
    InterleavedTask,
    MultiTurnTask,
    NamingTask,
    PromptWordingTask,
    halves,
    interleaved_verdict,
    per_prompt_shares,
    pixel_edit_metrics,
)
from unimm.evaluation.task_base import DEFAULT_LIMIT, TaskContext
from unimm.evaluation.task_runner import run_tasks
from unimm.pipelines.conversations import conversations_with_images

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "prepare.yaml"
COLOURS = {"red": (220, 20, 30), "green": (20, 200, 40), "blue": (30, 40, 210)}
NAMES = list(COLOURS)
SQUARES = [NAMES[index % len(NAMES)] for index in range(6)]
SIZE = 16  # the tiny pipeline's images
JUDGE_SOURCE = '''
import numpy as np

NAMES = ("red", "green", "blue")


def judge(images, prompts):
    """Right when the image's strongest mean channel is the colour the prompt names."""
    colours = [NAMES[int(np.asarray(image.convert("RGB"), dtype=float).mean((0, 1)).argmax())] for image in images]
    return [colour in prompt.split() for colour, prompt in zip(colours, prompts)]
'''
# The options that point the skill tasks at coloured squares instead of the demo's classes.
SQUARE_OPTIONS = {"classes": NAMES, "subject": "{article} {label} square"}


def _square(name: str, size: tuple[int, int] = (SIZE, SIZE)) -> PIL.Image.Image:
    """A square of a colour with a darker left half (so a mirror is not the identity)."""
    pixels = np.tile(np.array(COLOURS[name], dtype=np.uint8), (size[1], size[0], 1))
    pixels[:, : size[0] // 2] //= 2
    return PIL.Image.fromarray(pixels)


def _colours_in(text: str) -> list[str]:
    """The colour names of a text, in the order they appear."""
    return sorted((name for name in NAMES if re.search(rf"\b{name}\b", text.lower())), key=text.lower().index)


def _colour_of(image: PIL.Image.Image) -> str:
    return NAMES[int(np.asarray(image.convert("RGB"), dtype=float).mean((0, 1)).argmax())]


@pytest.fixture
def squares(tmp_path):
    """A captioned image folder: ``i.png`` of colour ``SQUARES[i]``, captioned "a <colour> square"."""
    root = tmp_path / "squares"
    root.mkdir()
    with (root / "metadata.jsonl").open("w") as file:
        for index, name in enumerate(SQUARES):
            _square(name).save(root / f"{index}.png")
            file.write(json.dumps({"file_name": f"{index}.png", "text": f"a {name} square"}) + "\n")
    return root


@pytest.fixture
def judge(tmp_path):
    path = tmp_path / "colour_judge.py"
    path.write_text(JUDGE_SOURCE)
    return f"{path}:judge"


@pytest.fixture
def context(tmp_path, dataset_cache_dir):
    return TaskContext(output_dir=tmp_path / "eval", batch_size=4, cache_dir=dataset_cache_dir)


# ---------------------------------------------------------------- an oracle pipeline
class OraclePipeline:
    """The tiny pipeline, except that chat, generate and generate_images answer every skill perfectly for
    coloured squares: they draw the colours a text names (two side by side or stacked at a wide or tall
    size), edit exactly, and name the colour of the last image of a conversation. ``edits=False``: a model
    that returns the image it is given instead of editing it."""

    def __init__(self, pipeline, edits: bool = True) -> None:
        self._pipeline, self._edits = pipeline, edits

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate_images(self, prompts, height=None, width=None, **options):
        return SimpleNamespace(
            images=[self._draw(prompt, height or SIZE, width or SIZE) for prompt in prompts]
        )

    def generate(self, messages, output="interleaved", **options):
        segments = []
        for conversation in messages:
            text, image = self._last(conversation)
            colours = _colours_in(text)
            if output == "interleaved":
                segments.append(["Here they are:", *(_square(name) for name in colours)])
            elif image is not None and "another" in text:
                segments.append([_square(_colour_of(image))])
            elif image is not None and not colours:
                segments.append([self._edit(image, text)])
            else:
                segments.append([_square(colours[0])])
        return SimpleNamespace(segments=segments)

    def chat(self, messages, images=None, **options):
        conversations = conversations_with_images(messages, images)  # as the pipeline reads its arguments
        return SimpleNamespace(texts=[f"a {_colour_of(self._last(c)[1])} square." for c in conversations])

    def _draw(self, prompt: str, height: int, width: int) -> PIL.Image.Image:
        colours = _colours_in(prompt)
        if len(colours) == 1:
            return _square(colours[0], (width, height))
        tall = height > width
        parts = [
            np.asarray(_square(name, (width, height // 2) if tall else (width // 2, height)))
            for name in colours
        ]
        return PIL.Image.fromarray(np.concatenate(parts, axis=0 if tall else 1))

    def _edit(self, image: PIL.Image.Image, instruction: str) -> PIL.Image.Image:
        if not self._edits:
            return image
        op = next(
            op
            for op, word in ((MIRROR, "mirror"), (DARKER, "darker"), (INVERT, "invert"))
            if word in instruction
        )
        return PIL.Image.fromarray(edit_pixels(np.asarray(image.convert("RGB")), op))

    @staticmethod
    def _last(conversation):
        """The last user text and the last image of a conversation."""
        text, image = "", None
        for message in conversation:
            parts = message["content"]
            parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
            for part in parts:
                if part["type"] == "image":
                    image = part["image"]
                elif message["role"] == "user":
                    text = part["text"]
        return text, image


def _square_tasks(squares, judge, limit: int = 3):
    dataset = {"dataset": str(squares), "split": "train", "limit": limit}
    return [
        PromptWordingTask(**SQUARE_OPTIONS, judge=judge, num_images_per_prompt=2),
        MultiTurnTask(**SQUARE_OPTIONS, judge=judge, num_drawn=4, **dataset),
        InterleavedTask(**SQUARE_OPTIONS, judge=judge, num_requests=4),
        EditTask(**SQUARE_OPTIONS, judge=judge, **dataset),
        CompositionTask(**SQUARE_OPTIONS, judge=judge, num_per_layout=3),
        NamingTask(**dataset),
    ]


def test_a_perfect_model_scores_every_skill_fully(tiny_pipeline, squares, judge, context):
    run = run_tasks(OraclePipeline(tiny_pipeline), _square_tasks(squares, judge), context)
    metrics = {result.label: result.metrics for result in run.results}
    assert metrics["prompt_wording"]["mean"] == metrics["prompt_wording"]["min"] == 1.0
    assert metrics["prompt_wording"]["num_prompts"] == len(DEFAULT_WORDINGS) * len(NAMES)
    turns = metrics["multi_turn"]
    for name in ("another_same_class", "first_answer_right", "what_drawn_names_judged_class", "drawn_right"):
        assert turns[name] == 1.0, name
    assert turns["what_drawn_names_asked_class"] == turns["draw_other_right"] == 1.0
    assert metrics["interleaved"]["right"] == metrics["interleaved"]["two_images"] == 1.0
    for op in (MIRROR, DARKER, INVERT):
        edit = metrics["edit"][op]
        assert edit["within_target"] and edit["share_within"] == 1.0 and edit["gap_db"] < 0, op
        assert edit["psnr"] > edit["reconstruction_psnr"] and edit["num_images"] == 3
    assert metrics["edit"]["relabel"]["right"] == 1.0
    assert metrics["composition"]["both_right"] == 1.0
    assert (
        metrics["composition"][WIDE]["width"] == 2 * SIZE
        and metrics["composition"][TALL]["height"] == 2 * SIZE
    )
    assert metrics["naming"]["exact_match"] == 1.0
    # The report: a section per task; each task's grid and records.
    text = (context.output_dir / "report.md").read_text()
    for label in SKILL_TASKS:
        assert f"## {label}" in text, label
        assert (context.output_dir / label / "grid.png").is_file()
        assert (context.output_dir / label / "examples.jsonl").is_file()
    records = (context.output_dir / "edit" / "examples.jsonl").read_text().splitlines()
    assert len(records) == 3 * 4 and json.loads(records[0])["op"] == MIRROR


def test_a_model_that_does_not_edit_scores_the_unedited_baseline(tiny_pipeline, squares, judge, context):
    task = EditTask(**SQUARE_OPTIONS, judge=judge, ops=[DARKER, INVERT], dataset=str(squares), split="train")
    result = task.run(OraclePipeline(tiny_pipeline, edits=False), context)
    for op in (DARKER, INVERT):
        values = result.metrics[op]
        assert values["psnr"] == pytest.approx(values["unedited_psnr"]) and values["num_images"] == len(
            SQUARES
        )

    # Darker halves every value: the unedited images' mean PSNR against it is fixed by their pixels.
    def unedited_psnr(name):
        pixels = np.asarray(_square(name), dtype=float)
        return 10 * math.log10(
            255**2 / np.mean((pixels - edit_pixels(np.asarray(_square(name)), DARKER)) ** 2)
        )

    expected = np.mean([unedited_psnr(name) for name in SQUARES])
    assert result.metrics[DARKER]["unedited_psnr"] == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------- pure helpers (golden values)
@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("a t-shirt.", 0),
        ("A T-Shirt!", 0),
        ("a shirt", 6),
        ("a button-up shirt", 6),
        ("an ankle boot.", 9),
        ("boots", 9),
        ("a pair of trousers", 1),
        ("trousers", 1),
        ("two sneakers", 7),
        ("a sneaker and a bag", None),
        ("an emoji of a cat", None),
        ("", None),
    ],
)
def test_class_names_find_the_one_class_a_text_names(text, label):
    assert ClassNames(DEMO_CLASSES).named(text) == label


def test_class_names_fields_and_errors():
    names = ClassNames(NAMES, "{article} {label} square")
    assert names.fields(0) == {"label": "red", "article": "a", "subject": "a red square"}
    assert names.pair_fields(0, 2)["subject_2"] == "a blue square"
    assert ClassNames(DEMO_CLASSES).fields(9)["subject"] == "an ankle boot"
    with pytest.raises(ValueError, match="at least two classes"):
        ClassNames(["red"])
    with pytest.raises(ValueError, match="names two classes"):
        ClassNames(["boot", "ankle boot, boot"])
    with pytest.raises(ValueError, match="expected a list"):
        ClassNames("red, green")
    with pytest.raises(ValueError, match="subject"):
        ClassNames(NAMES, "{colour} square")


def test_demo_classes_are_the_recipes_labels_and_synonyms():
    source = yaml.safe_load(RECIPE.read_text())["sources"][0]
    synonyms = source.get("label_synonyms", {})
    assert list(DEMO_CLASSES) == [
        ", ".join([name, *synonyms.get(name, [])]) for name in source["label_names"]
    ]


def _expansions(template: str, values: dict[str, str]) -> set[str]:
    """Every text a recipe template can write (its alternatives' product), lower-cased, on one line."""
    pieces = PhraseTemplate(template, "t", ("subject", "label", "article", "caption")).pieces
    options = [(piece,) if isinstance(piece, str) else piece for piece in pieces]
    return {
        " ".join("".join(choice).format_map(values).lower().split()) for choice in itertools.product(*options)
    }


def test_default_paraphrases_are_wordings_the_recipe_never_writes():
    recipe = yaml.safe_load(RECIPE.read_text())
    templates = [*recipe["prompt_templates"], *DEFAULT_DRAW_OTHER]
    names = ClassNames(DEMO_CLASSES)
    for index, entry in enumerate(DEMO_CLASSES):
        written = set()
        for name in (part.strip() for part in entry.split(",")):
            subject = f"{article(name)} {name}"
            for caption in (
                template.format(article=article(name), name=name) for template in FASHION_MNIST_TEMPLATES
            ):
                values = {"subject": subject, "label": name, "article": article(name), "caption": caption}
                written |= {text for template in templates for text in _expansions(template, values)}
        fields = names.fields(index)
        prompts = [" ".join(wording.format_map(fields).lower().split()) for wording in DEFAULT_WORDINGS]
        assert prompts[0] in written  # the bare class name is taught
        assert not set(prompts[1:]) & written, entry


def test_per_prompt_shares_and_interleaved_verdicts():
    assert per_prompt_shares([True, False, True, True, False, False], 2) == [0.5, 1.0, 0.0]
    assert interleaved_verdict(2, True, True)
    assert not interleaved_verdict(3, True, True)  # a third image is not what was asked
    assert not interleaved_verdict(2, True, False) and not interleaved_verdict(1, True, None)


def test_halves_of_wide_and_tall_images():
    wide = PIL.Image.fromarray(
        np.concatenate([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)], 1)
    )
    left, right = halves(wide, WIDE)
    assert (
        left.size == right.size == (4, 4) and np.asarray(left).max() == 0 and np.asarray(right).min() == 255
    )
    top, bottom = halves(wide.transpose(PIL.Image.Transpose.TRANSPOSE), TALL)
    assert np.asarray(top).max() == 0 and np.asarray(bottom).min() == 255
    with pytest.raises(ValueError, match="unknown layout"):
        halves(wide, "diagonal")


def test_pixel_edit_metrics_golden_values():
    source = np.full((16, 16, 3), 100, np.uint8)
    exact = PIL.Image.fromarray(edit_pixels(source, INVERT))  # 155 everywhere
    output = PIL.Image.fromarray(np.asarray(exact) + 5)  # off by 5 levels: 20 log10(255 / 5) dB
    reconstruction = PIL.Image.fromarray(np.asarray(exact) - 10)  # off by 10: 20 log10(255 / 10) dB
    metrics, per_image = pixel_edit_metrics(
        [exact], [output], [reconstruction], [PIL.Image.fromarray(source)]
    )
    assert metrics["psnr"] == pytest.approx(20 * math.log10(255 / 5), abs=1e-3)
    assert metrics["reconstruction_psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=1e-3)
    assert metrics["unedited_psnr"] == pytest.approx(20 * math.log10(255 / 55), abs=1e-3)
    assert metrics["gap_db"] == pytest.approx(-20 * math.log10(2), abs=1e-3) and metrics["within_target"]
    worse = PIL.Image.fromarray(np.asarray(exact) - 30)  # 9.5 dB below the reconstruction: not within 3 dB
    metrics, _ = pixel_edit_metrics([exact], [worse], [reconstruction], [PIL.Image.fromarray(source)])
    assert not metrics["within_target"] and metrics["share_within"] == 0.0 and per_image[0]["within"]


def test_tasks_refuse_bad_options():
    with pytest.raises(ValueError, match="ops must be some of"):
        EditTask(ops=["rotate"])
    with pytest.raises(ValueError, match="no instruction for"):
        EditTask(ops=[MIRROR], instructions={DARKER: "darker"})
    with pytest.raises(ValueError, match="must always contain"):
        EditTask(instructions={MIRROR: "mirror", DARKER: "x", INVERT: "y", "relabel": "turn it around"})
    with pytest.raises(ValueError, match=r"uses \{colour\}"):
        PromptWordingTask(wordings=["draw {colour}"])
    with pytest.raises(ValueError, match="layouts must be"):
        CompositionTask(layouts=["diagonal"])
    with pytest.raises(ValueError, match="needs a dataset"):
        MultiTurnTask(dataset=None)
    with pytest.raises(ValueError, match="num_requests"):
        InterleavedTask(num_requests=0)


# ---------------------------------------------------------------- the command line
def test_unimm_eval_runs_the_demo_report_and_every_skill_by_default():
    assert tuple(SKILL_TASKS) == SKILL_TASK_NAMES
    args = cli.build_parser().parse_args(["eval", "checkpoint"])
    tasks = build_tasks(args)
    assert [task.name for task in tasks] == ["demo", *SKILL_TASK_NAMES]
    limits = {task.name: getattr(task, "limit", None) for task in tasks}
    assert limits["multi_turn"] == limits["edit"] == limits["naming"] == 100


@pytest.mark.parametrize(
    ("options", "limits"),
    [
        ([], {"understanding": DEFAULT_LIMIT, "edit": 100}),
        (["--limit", "7"], {"understanding": 7, "edit": 7}),
        (["--limit", "0"], {"understanding": None, "edit": None}),  # every row
    ],
)
def test_limit_applies_to_every_task_only_when_given(options, limits):
    args = cli.build_parser().parse_args(
        ["eval", "checkpoint", "--task", "understanding", "--task", "skills", "--dataset", "pics", *options]
    )
    tasks = {task.name: task for task in build_tasks(args)}
    assert list(tasks) == ["understanding", *SKILL_TASK_NAMES]
    assert {name: tasks[name].limit for name in limits} == limits
    assert tasks["edit"].dataset == tasks["multi_turn"].dataset == "pics"


# ---------------------------------------------------------------- the tiny random pipeline
@pytest.mark.integration
def test_skill_tasks_on_the_tiny_pipeline_write_records_in_range(tiny_pipeline, squares, judge, context):
    run = run_tasks(tiny_pipeline, _square_tasks(squares, judge, limit=2), context)
    results = {result.label: result for result in run.results}
    assert list(results) == list(SKILL_TASKS)
    wording = results["prompt_wording"].metrics
    assert 0.0 <= wording["min"] <= wording["mean"] <= 1.0 and len(wording["per_prompt"]) == 24
    interleaved = results["interleaved"].metrics
    # Two images of 4x4 codes and the text budget, within the tiny model's 256 positions.
    assert interleaved["token_budget"] == 2 * tiny_pipeline.llm.vocabulary.image_sequence_length(4, 4) + 64
    for result in results.values():  # the tiny tokenizer does not know "square"
        assert result.summary and result.table and any("unknown token" in w for w in result.warnings)
    edit = results["edit"].metrics
    for op in (MIRROR, DARKER, INVERT):
        assert math.isfinite(edit[op]["psnr"]) and math.isfinite(edit[op]["reconstruction_psnr"])
    report = json.loads((context.output_dir / "report.json").read_text())
    assert set(report["tasks"]) == set(SKILL_TASKS)
    lines = (context.output_dir / "multi_turn" / "examples.jsonl").read_text().splitlines()
    parts = [json.loads(line)["part"] for line in lines]
    assert parts.count("another") == 2 and parts.count("what_drawn") == 4
    assert (context.output_dir / "multi_turn" / "what_drawn_grid.png").is_file()


@pytest.mark.integration
def test_cli_runs_skill_tasks_from_a_task_file(
    tiny_pipeline, squares, judge, tmp_path, dataset_cache_dir, capsys
):
    checkpoint = tmp_path / "tiny"
    tiny_pipeline.save_pretrained(checkpoint)
    judge_file = judge.rpartition(":")[0]
    tasks_file = tmp_path / "skills.yaml"
    options = {**SQUARE_OPTIONS, "judge": f"{Path(judge_file).name}:judge"}
    tasks_file.write_text(
        yaml.safe_dump(
            [
                {"task": "composition", **options, "num_per_layout": 2, "layouts": [WIDE]},
                {
                    "task": "edit",
                    **options,
                    "dataset": "squares",
                    "split": "train",
                    "limit": 2,
                    "ops": [MIRROR],
                },
            ]
        )
    )
    output_dir = tmp_path / "out"
    # fmt: off
    status = cli.main([
        "eval", str(checkpoint), "--tasks-file", str(tasks_file), "--output-dir", str(output_dir),
        "--cache-dir", dataset_cache_dir, "--batch-size", "2",
    ])
    # fmt: on
    assert status == 0
    out = capsys.readouterr().out
    assert "composition: both halves right" in out and "edit: mirror" in out
    report = json.loads((output_dir / "report.json").read_text())
    assert report["tasks"]["composition"]["metrics"][WIDE]["num_images"] == 2
    assert report["tasks"]["edit"]["metrics"][MIRROR]["num_images"] == 2
