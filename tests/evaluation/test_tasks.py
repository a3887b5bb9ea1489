"""Evaluation tasks on the user's own data: answer scoring, judges, feature spaces, warnings, the tasks on a
tiny random pipeline over a captioned folder of coloured squares, and ``unimm eval --task`` in-process.

The random pipeline's answers and images are noise: tasks are checked for records, ranges and files; the
judges, the ceiling and the golden metric values are exact."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

from unimm import cli
from unimm.commands.eval import DEFAULT_LIMIT as CLI_DEFAULT_LIMIT
from unimm.commands.eval import SKILL_TASK_NAMES, build_tasks
from unimm.evaluation.answers import contains_match, exact_match, normalize_answer, score_answer, token_f1
from unimm.evaluation.feature_spaces import (
    AutoModelFeatures,
    JudgeFeatures,
    TeacherFeatures,
    load_feature_space,
)
from unimm.evaluation.frechet import frechet_distance
from unimm.evaluation.prompt_judges import ClassifierJudge, label_in_prompt, load_prompt_judge
from unimm.evaluation.task_base import DEFAULT_LIMIT, TaskContext
from unimm.evaluation.task_data import load_task_data, training_data_warning, vocabulary_warning
from unimm.evaluation.task_runner import build_task, load_task_file, run_tasks
from unimm.evaluation.tasks import (
    FrechetTask,
    PromptFollowingTask,
    ReconstructionTask,
    UnderstandingTask,
    image_pair_metrics,
)

COLOURS = {"red": (220, 20, 30), "green": (20, 200, 40), "blue": (30, 40, 210)}
# Eight squares: colour names in turn; the caption of each names its colour.
SQUARES = [name for _ in range(3) for name in COLOURS][:8]
IMAGE_SIZE = 16
JUDGE_SOURCE = '''
import numpy as np

NAMES = ("red", "green", "blue")


def judge(images, prompts):
    """Right when the image's strongest mean channel is the colour the prompt names."""
    colours = [NAMES[int(np.asarray(image.convert("RGB"), dtype=float).mean((0, 1)).argmax())] for image in images]
    return [colour in prompt.split() for colour, prompt in zip(colours, prompts)]
'''


def _square(colour: tuple[int, int, int], noise: int = 0, seed: int = 0) -> PIL.Image.Image:
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), colour, dtype=np.int16)
    if noise:
        pixels += np.random.default_rng(seed).integers(-noise, noise + 1, pixels.shape, dtype=np.int16)
    return PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _folder(root, captions: list[str], names: list[str] = SQUARES, noise: int = 0):
    """A captioned image folder (imagefolder layout): ``i.png`` of colour ``names[i]``, caption ``captions[i]``."""
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        _square(COLOURS[name], noise, seed=index).save(root / f"{index}.png")
    with (root / "metadata.jsonl").open("w") as file:
        for index, caption in enumerate(captions):
            file.write(json.dumps({"file_name": f"{index}.png", "text": caption}) + "\n")
    return root


@pytest.fixture
def squares(tmp_path):
    return _folder(tmp_path / "squares", [f"a {name} square" for name in SQUARES])


@pytest.fixture
def judge_file(tmp_path):
    path = tmp_path / "colour_judge.py"
    path.write_text(JUDGE_SOURCE)
    return path


@pytest.fixture
def context(tmp_path, dataset_cache_dir):
    return TaskContext(output_dir=tmp_path / "eval", batch_size=4, cache_dir=dataset_cache_dir)


# ---------------------------------------------------------------- answer scoring (golden values)
@pytest.mark.parametrize(
    ("text", "normalised"),
    [("The Red, Circle!", "red circle"), ("  an  apple's core ", "apples core"), ("“A” — b", "b"), ("", "")],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    ("answer", "reference", "exact", "contains", "f1"),
    [
        ("A red circle.", "red circle", True, True, 1.0),
        ("red circle", "a big red circle", False, True, 0.8),  # p = 1, r = 2/3
        ("it is a red circle", "Red circle", False, True, 2 * (2 / 4) * 1 / (2 / 4 + 1)),  # p = 1/2, r = 1
        ("red red square", "red square square", False, False, 2 / 3),  # multiset overlap 2 of 3 each
        ("blue", "red", False, False, 0.0),
        ("cat", "category", False, False, 0.0),  # whole words only
        ("", "red", False, False, 0.0),  # an empty answer contains nothing
        ("the", "a", True, False, 1.0),  # both empty after normalisation
    ],
)
def test_answer_scores(answer, reference, exact, contains, f1):
    assert exact_match(answer, reference) is exact
    assert contains_match(answer, reference) is contains
    assert token_f1(answer, reference) == pytest.approx(f1)


def test_score_answer_takes_the_best_reference_per_metric():
    scores = score_answer("a red square", ["blue square", "Red square.", "red square, small"])
    assert scores == {"exact_match": 1.0, "contains": 1.0, "f1": 1.0}
    assert score_answer("square", ["blue square", "green"])["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_answer("x", [])


# ---------------------------------------------------------------- warnings
def test_vocabulary_warning_names_the_rate_and_words(tiny_pipeline):
    tokenizer = tiny_pipeline.processor.tokenizer
    assert vocabulary_warning(tokenizer, ["a red cat", "the blue dog ."], "prompts") is None
    message = vocabulary_warning(tokenizer, ["a purple giraffe", "a red cat", "purple"], "prompts")
    # 3 unknown of 7 words, in 2 of 3 texts; the most frequent word first.
    assert "42.9%" in message and "3 of 7" in message and "2 of 3 texts" in message
    assert message.index("'purple'") < message.index("'giraffe'") and "<unk>" in message


def test_training_data_warning_reads_the_model_card(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    assert "records no training data" in training_data_warning(checkpoint, "fashion_mnist")
    (checkpoint / "README.md").write_text(
        "# x\n\n## Training data\n\n- Fashion-MNIST (60,000 train images)\n- my coloured squares\n\n## Metrics\n\n- y\n"
    )
    assert training_data_warning(checkpoint, "fashion_mnist") is None
    assert training_data_warning(checkpoint, str(tmp_path / "coloured_squares")) is None
    message = training_data_warning(checkpoint, str(tmp_path / "photos"))
    assert "photos" in message and "Fashion-MNIST" in message
    assert "emoji" in training_data_warning(checkpoint, "emoji")  # names the dataset it misses


# ---------------------------------------------------------------- data
def test_task_data_draws_a_seeded_subset_and_warns_without_a_test_split(squares, dataset_cache_dir):
    def load(seed):
        return load_task_data(squares, image_size=IMAGE_SIZE, limit=5, seed=seed, cache_dir=dataset_cache_dir)

    data = load(0)
    indices = [example.index for example in data.examples]
    assert len(indices) == 5 and indices == sorted(indices)
    assert indices == [example.index for example in load(0).examples] != [e.index for e in load(1).examples]
    example = data.examples[0]
    assert example.reference == f"a {SQUARES[example.index]} square" and example.question is None
    assert example.source.endswith(f"{example.index}.png") and example.image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert "5 of 8 rows" in data.description and "no held-out test split" in data.warnings[0]


# ---------------------------------------------------------------- judges
def test_callable_judge_by_file_and_by_module(judge_file, monkeypatch):
    images = [_square(COLOURS[name]) for name in ("red", "green", "blue")]
    prompts = ["a red square", "a red square", "a blue one"]
    assert load_prompt_judge(f"{judge_file}:judge").score(images, prompts) == [1.0, 0.0, 1.0]
    monkeypatch.syspath_prepend(str(judge_file.parent))
    assert load_prompt_judge("colour_judge:judge").score(images, prompts) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_prompt_judge(f"{judge_file}:nope")
    with pytest.raises(ValueError, match="expected module:function"):
        load_prompt_judge("no-such-folder")


def test_callable_judge_values_are_checked(tmp_path):
    (tmp_path / "bad_judge.py").write_text("def judge(images, prompts):\n    return [2.0] * len(images)\n")
    with pytest.raises(ValueError, match="expected a bool or a number in"):
        load_prompt_judge(f"{tmp_path / 'bad_judge.py'}:judge").score([_square((0, 0, 0))], ["x"])


@pytest.mark.parametrize(
    ("label", "prompt", "right"),
    [
        ("red", "a Red square.", True),
        ("tabby, tabby cat", "a photo of a tabby cat", True),
        ("golden_retriever", "a golden retriever", True),
        ("cat", "a category", False),
        ("tabby, tabby cat", "a dog", False),
    ],
)
def test_label_in_prompt(label, prompt, right):
    assert label_in_prompt(label, prompt) is right


@pytest.fixture
def classifier_folder(tmp_path):
    """A tiny random ViT image classifier with colour labels, saved as a transformers folder."""
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(enumerate(COLOURS)),
        label2id={name: index for index, name in enumerate(COLOURS)},
    )
    torch.manual_seed(0)
    folder = tmp_path / "classifier"
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def test_classifier_folder_judge_and_its_features(classifier_folder):
    judge = load_prompt_judge(str(classifier_folder))
    assert isinstance(judge, ClassifierJudge)
    images = [_square(colour, noise=40, seed=index) for index, colour in enumerate(COLOURS.values())]
    labels = judge.predict(images)
    prompts = ["a red square", "a green square", "a blue square"]
    assert judge.score(images, prompts) == [float(label in prompt) for label, prompt in zip(labels, prompts)]
    assert judge.features(images).shape == (3, 16)  # the classifier head's input
    space = load_feature_space(str(classifier_folder), pipeline=None)
    assert isinstance(space, JudgeFeatures) and space.features(images).shape == (3, 16)


def test_automodel_folder_feature_space(classifier_folder, tmp_path):
    classifier = ViTForImageClassification.from_pretrained(classifier_folder)
    folder = tmp_path / "backbone"
    ViTModel(classifier.config).save_pretrained(folder)  # an AutoModel without a classification head
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    space = load_feature_space(str(folder), pipeline=None)
    assert isinstance(space, AutoModelFeatures) and space.name == "backbone features"
    assert space.features([_square((0, 0, 0)), _square((255, 255, 255))]).shape == (2, 16)
    with pytest.raises(ValueError, match="no config.json"):
        load_feature_space(str(tmp_path / "nothing"), pipeline=None)


# ---------------------------------------------------------------- metrics of the tasks
def test_image_pair_metrics_golden_values():
    grey = _square((64, 64, 64))
    value, structural = image_pair_metrics(grey, grey)
    assert value >= 100.0 and structural == pytest.approx(1.0)
    black = _square((0, 0, 0))
    value, _ = image_pair_metrics(black, grey)
    assert value == pytest.approx(12.0074, abs=1e-3)  # 20 log10(255 / 64)
    small = PIL.Image.new("RGB", (8, 8))
    assert image_pair_metrics(small, small)[1] is None  # smaller than the SSIM window


def test_teacher_frechet_reference_is_small_next_to_noise(tiny_pipeline):
    space = TeacherFeatures(tiny_pipeline)
    assert "teacher" in space.description and "FID" not in space.description
    names = [name for _ in range(8) for name in COLOURS]  # 24 squares, slightly noisy
    real = [_square(COLOURS[name], noise=10, seed=index) for index, name in enumerate(names)]
    rng = np.random.default_rng(0)
    noise = [
        PIL.Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
        for _ in range(12)
    ]
    first, second = space.features(real[::2]), space.features(real[1::2])
    assert first.shape == (12, tiny_pipeline.visual_tokenizer.teacher_hidden_size)
    reference = frechet_distance(first, second)
    assert 0.0 <= reference < 0.25 * frechet_distance(space.features(noise), second)


# ---------------------------------------------------------------- the tasks on the tiny pipeline
def test_understanding_task_writes_records_and_scores_in_range(tiny_pipeline, squares, context):
    result = UnderstandingTask(dataset=str(squares), limit=None).run(tiny_pipeline, context)
    for name in ("exact_match", "contains", "f1"):
        assert 0.0 <= result.metrics[name] <= 1.0
    assert result.metrics["num_examples"] == 8 and result.metrics["num_skipped"] == 0
    lines = (context.output_dir / "understanding" / "examples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 8
    assert {"index", "image", "question", "reference", "answer", "exact_match", "contains", "f1"} <= set(
        records[0]
    )
    assert records[0]["question"] == "What is this?" and records[0]["reference"] == "a red square"
    assert records[0]["image"].endswith("0.png")
    assert (context.output_dir / "understanding" / "grid.png").is_file()
    # "What" is not in the tiny tokenizer's lower-case vocabulary; the folder has no test split.
    assert any("'What'" in warning and "100.0%" not in warning for warning in result.warnings)
    assert any("no held-out test split" in warning for warning in result.warnings)
    assert len(result.markdown_rows()) == 3


def test_understanding_asks_the_given_question(tiny_pipeline, squares, context):
    result = UnderstandingTask(dataset=str(squares), question="what colour is this ?", limit=2).run(
        tiny_pipeline, context
    )
    records = [json.loads(line) for line in (context.output_dir / "understanding" / "examples.jsonl").open()]
    assert {record["question"] for record in records} == {"what colour is this ?"}
    assert any("'colour'" in warning for warning in result.warnings)


def test_reconstruction_task(tiny_pipeline, squares, context):
    result = ReconstructionTask(dataset=str(squares), num_diffusion_reconstruction=2).run(
        tiny_pipeline, context
    )
    pixel, diffusion, codebook = (result.metrics[key] for key in ("pixel", "diffusion", "codebook"))
    assert pixel["num_images"] == 8 and diffusion["num_images"] == 2
    assert math.isfinite(pixel["psnr"]) and -1.0 <= pixel["ssim"] <= 1.0
    assert 0.0 < codebook["usage"] <= 1.0 and codebook["size"] == 16 and codebook["num_codes"] == 8 * 4 * 4
    records = [json.loads(line) for line in (context.output_dir / "reconstruction" / "examples.jsonl").open()]
    assert "diffusion_psnr" in records[1] and "diffusion_psnr" not in records[2]


def test_prompt_following_ceiling_is_the_judge_on_real_images(tiny_pipeline, tmp_path, judge_file, context):
    # Two of the eight captions name the wrong colour: the judge's ceiling is 6/8.
    captions = [f"a {name} square" for name in SQUARES]
    captions[0], captions[1] = "a blue square", "a red square"
    folder = _folder(tmp_path / "mislabelled", captions)
    task = PromptFollowingTask(dataset=str(folder), judge=f"{judge_file}:judge", images_per_prompt=2)
    result = task.run(tiny_pipeline, context)
    assert result.metrics["judge_real_accuracy"] == 0.75 and result.metrics["judge_real_total"] == 8
    assert result.metrics["num_images"] == 16 and result.metrics["num_prompts"] == 8
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    records = [
        json.loads(line) for line in (context.output_dir / "prompt_following" / "examples.jsonl").open()
    ]
    assert len(records) == 16 and records[0]["prompt"] == records[1]["prompt"] == "a blue square"
    assert (context.output_dir / records[0]["image"]).is_file()


def test_prompt_following_from_prompts_alone_is_deterministic(tiny_pipeline, judge_file, tmp_path):
    prompts = ["a red square", "a blue square", "a green square"]
    task = PromptFollowingTask(judge=f"{judge_file}:judge", prompts=prompts)
    first = task.run(tiny_pipeline, TaskContext(output_dir=tmp_path / "a", batch_size=2))
    second = task.run(tiny_pipeline, TaskContext(output_dir=tmp_path / "b", batch_size=3))
    assert first.metrics["judge_real_accuracy"] is None and first.metrics["num_images"] == 3
    assert second.metrics == first.metrics
    # Prompt i is seeded with seed + i whatever the batch: the same images in any batch size.
    for index in range(3):
        name = f"prompt_following/images/{index:05d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_frechet_task_names_its_feature_space(tiny_pipeline, squares, context):
    result = FrechetTask(dataset=str(squares)).run(tiny_pipeline, context)
    metrics = result.metrics
    assert metrics["frechet_generated"] >= 0.0 and metrics["frechet_reference"] >= 0.0
    assert metrics["num_generated"] == metrics["num_real"] == metrics["num_real_reference"] == 4
    assert "teacher" in metrics["feature_space"]
    text = result.markdown()
    assert "Fréchet distance in the visual tokenizer's teacher features" in text
    assert "| Fréchet distance in teacher features, real vs real (reference) |" in text
    assert "FID" not in text.replace("not an FID", "")


def test_tasks_refuse_missing_options():
    with pytest.raises(ValueError, match="needs a dataset"):
        UnderstandingTask()
    with pytest.raises(ValueError, match="needs a judge"):
        PromptFollowingTask(prompts=["a red square"])
    with pytest.raises(ValueError, match="did you mean 'question'"):
        build_task("understanding", {"dataset": "x", "questoin": "?"})
    with pytest.raises(ValueError, match="unknown task"):
        build_task("fid", {})
    assert DEFAULT_LIMIT == CLI_DEFAULT_LIMIT


def test_task_file_resolves_paths_against_its_folder(tmp_path, squares, judge_file):
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tasks": [
                    {"task": "understanding", "dataset": "squares", "question": "what is this ?"},
                    {"task": "prompt_following", "dataset": "squares", "judge": "colour_judge.py:judge"},
                    {
                        "task": "frechet",
                        "dataset": "squares",
                        "features": "teacher",
                        "label": "frechet-teacher",
                    },
                ]
            }
        )
    )
    understanding, prompt_following, frechet = load_task_file(path)
    assert understanding.dataset == str(squares) and understanding.question == "what is this ?"
    assert prompt_following.judge == f"{judge_file}:judge" and frechet.key == "frechet-teacher"
    path.write_text(textwrap.dedent("- {task: understanding, dataset: squares, colour: red}\n"))
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        load_task_file(path)


def test_run_tasks_writes_one_report_with_a_section_per_task(tiny_pipeline, squares, judge_file, context):
    tasks = [
        UnderstandingTask(dataset=str(squares), limit=4),
        UnderstandingTask(dataset=str(squares), limit=4, question="what is this ?"),
        PromptFollowingTask(dataset=str(squares), limit=4, judge=f"{judge_file}:judge"),
    ]
    run = run_tasks(tiny_pipeline, tasks, context)
    report = json.loads((context.output_dir / "report.json").read_text())
    assert list(report["tasks"]) == ["understanding", "understanding-2", "prompt_following"]
    assert report["tasks"]["prompt_following"]["metrics"]["judge_real_accuracy"] == 1.0
    text = (context.output_dir / "report.md").read_text()
    assert "Read the warnings before the figures" in text and "| exact match |" in text
    assert (
        "(prompt_following/grid.png)" in text
        and (context.output_dir / "understanding-2" / "grid.png").is_file()
    )
    assert [result.label for result in run.results] == list(report["tasks"])


# ---------------------------------------------------------------- the command
def test_cli_without_a_dataset_is_a_one_line_error(tmp_path, caplog):
    status = cli.main(["eval", str(tmp_path / "missing"), "--task", "understanding"])
    assert status == 1 and "needs a dataset" in caplog.text


def test_cli_runs_tasks_end_to_end(tiny_pipeline, squares, judge_file, tmp_path, dataset_cache_dir, capsys):
    checkpoint = tmp_path / "tiny"
    tiny_pipeline.save_pretrained(checkpoint, training_data=["Fashion-MNIST with templated captions"])
    output_dir = tmp_path / "out"
    # fmt: off
    status = cli.main([
        "eval", str(checkpoint), "--task", "understanding", "--task", "prompt_following", "--task", "reconstruction",
        "--dataset", str(squares), "--judge", f"{judge_file}:judge", "--limit", "6", "--batch-size", "4",
        "--output-dir", str(output_dir), "--cache-dir", dataset_cache_dir, "--steps", "2",
        "--num-diffusion-reconstruction", "1",
    ])
    # fmt: on
    assert status == 0
    out = capsys.readouterr().out
    assert "understanding: exact match" in out and "prompt_following: prompt following" in out
    report = json.loads((output_dir / "report.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and set(report["tasks"]) == {
        "understanding",
        "prompt_following",
        "reconstruction",
    }
    understanding = report["tasks"]["understanding"]
    assert understanding["metrics"]["num_examples"] == 6
    assert any("not among the training data" in warning for warning in understanding["warnings"])
    assert report["tasks"]["prompt_following"]["metrics"]["judge_real_accuracy"] == 1.0
    for task in report["tasks"]:
        assert (output_dir / task / "grid.png").is_file() and (output_dir / task / "examples.jsonl").is_file()
    text = (output_dir / "report.md").read_text()
    assert "## understanding" in text and "## reconstruction" in text and "Warning" in text


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ([], ["demo", *SKILL_TASK_NAMES]),
        (["--dataset", "pics"], ["understanding", "reconstruction"]),
        (["--dataset", "pics", "--judge", "j:f"], ["understanding", "reconstruction", "prompt_following"]),
        (["--dataset", "pics", "--task", "frechet", "--task", "understanding"], ["frechet", "understanding"]),
        (["--dataset", "{path: pics, eval_fraction: 0.2}", "--task", "understanding"], ["understanding"]),
    ],
)
def test_command_line_tasks(options, names):
    args = cli.build_parser().parse_args(["eval", "checkpoint", *options])
    tasks = build_tasks(args)
    assert [task.name for task in tasks] == names
    if "--dataset" in options:
        assert tasks[0].dataset in ("pics", {"path": "pics", "eval_fraction": 0.2})


@pytest.mark.integration
def test_the_demo_report_is_one_task_among_others(tiny_pipeline, squares, tmp_path, dataset_cache_dir):
    checkpoint = tmp_path / "tiny"
    tiny_pipeline.save_pretrained(checkpoint)
    output_dir = tmp_path / "out"
    demo_counts = {
        "--num-understanding": 4,
        "--images-per-class": 1,
        "--num-judge-real": 20,
        "--num-reconstruction": 2,
        "--num-diffusion-reconstruction": 0,
        "--num-emoji": 0,
    }
    options = [f"{option}={value}" for option, value in demo_counts.items()]
    # fmt: off
    status = cli.main([
        "eval", str(checkpoint), "--task", "demo", "--task", "understanding", "--dataset", str(squares),
        "--limit", "3", "--output-dir", str(output_dir), "--cache-dir", dataset_cache_dir, *options,
    ])
    # fmt: on
    assert status == 0
    report = json.loads((output_dir / "report.json").read_text())
    demo = report["tasks"]["demo"]
    assert demo["metrics"]["generation_total"] == 10 and demo["metrics"]["understanding_total"] == 4
    assert (
        demo["files"]["report_md"] == "demo/report.md"
        and (output_dir / "demo" / "generation_grid.png").is_file()
    )
    text = (output_dir / "report.md").read_text()
    assert "## demo" in text and "generation correctness (judged)" in text and "## understanding" in text
