"""GenEval and DPG-Bench outputs: prompt files in the published formats, drawn by a tiny random pipeline into
the folder layouts the official scorers read (their listing and cropping code is mirrored here), seeds
recorded and resumable, and ``unimm generate --geneval/--dpg-bench`` in-process."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import PIL.Image
import pytest

from unimm import cli
from unimm.commands.generate import DEFAULT_BATCH_SIZE as CLI_DEFAULT_BATCH_SIZE
from unimm.evaluation.prompt_suites import (
    DEFAULT_BATCH_SIZE,
    DPG_BENCH,
    GENEVAL,
    RECORD_FILE,
    generate_prompt_suite,
    read_dpg_bench_prompts,
    read_geneval_prompts,
)

# Lines in the format of GenEval's prompts/evaluation_metadata.jsonl (djghosh13/geneval).
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
        "prompt": "a photo of two dogs",
    },
    {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a dog left of a cat",
    },
]
# Prompt files as in DPG-Bench's dpg_bench/prompts/ (TencentQQGYLab/ELLA): <item id>.txt, one prompt each.
DPG_PROMPTS = {
    "countbench12": "two red cats and a blue dog on a green grass field.",
    "partiprompts7": "a small emoji of a smiling face.",
    "whoops3": "a big picture of a dog.",
}
FAST = {"decoder": "pixel"}  # the tokenizer's decoder: the layouts do not depend on the decoder


@pytest.fixture
def geneval_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES), encoding="utf-8")
    return path


@pytest.fixture
def dpg_folder(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    for item_id, prompt in DPG_PROMPTS.items():
        (folder / f"{item_id}.txt").write_text(prompt, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from unimm.pipelines.testing import build_random_pipeline

    folder = tmp_path_factory.mktemp("suites") / "tiny"
    build_random_pipeline("tiny").save_pretrained(folder)
    return str(folder)


def geneval_scorer_listing(image_dir):
    """``(metadata, image path)`` pairs as GenEval's evaluation/evaluate_images.py main() finds them."""
    found = []
    for subfolder in os.listdir(image_dir):
        folderpath = os.path.join(image_dir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if os.path.isfile(imagepath) and re.match(r"\d+\.png", imagename):
                found.append((metadata, imagepath))
    return found


def dpg_scorer_crops(image_path, resolution, pic_num):
    """The images DPG-Bench's compute_dpg_bench.py scores for one file (its crop tuples)."""
    image = PIL.Image.open(image_path)
    tuples = [
        (0, 0, resolution, resolution),
        (resolution, 0, resolution * 2, resolution),
        (0, resolution, resolution, resolution * 2),
        (resolution, resolution, resolution * 2, resolution * 2),
    ]
    return [image.crop(crop) for crop in tuples[:pic_num]]


def same_pixels(first, second):
    return np.array_equal(np.asarray(first.convert("RGB")), np.asarray(second.convert("RGB")))


def test_reads_the_published_prompt_formats(geneval_file, dpg_folder):
    geneval = read_geneval_prompts(geneval_file)
    assert [item.key for item in geneval] == ["00000", "00001", "00002"]
    assert [json.loads(item.metadata_line) for item in geneval] == GENEVAL_LINES
    dpg = read_dpg_bench_prompts(dpg_folder)
    assert {item.key: item.prompt for item in dpg} == DPG_PROMPTS
    assert [item.key for item in dpg] == sorted(DPG_PROMPTS)


def test_geneval_layout_is_what_its_scorer_reads(tiny_pipeline, geneval_file, tmp_path):
    output_dir = tmp_path / "geneval"
    run = generate_prompt_suite(
        tiny_pipeline,
        GENEVAL,
        geneval_file,
        output_dir,
        num_images_per_prompt=2,
        batch_size=2,
        seed=7,
        **FAST,
    )
    assert (run.generated, run.skipped, run.num_images_per_prompt) == (3, 0, 2)
    assert sorted(path.name for path in output_dir.iterdir()) == ["00000", "00001", "00002", RECORD_FILE]
    for index, line in enumerate(GENEVAL_LINES):
        folder = output_dir / f"{index:05d}"
        assert (folder / "metadata.jsonl").read_text() == json.dumps(line) + "\n"  # the line, as it was
        assert sorted(path.name for path in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    found = geneval_scorer_listing(output_dir)
    assert len(found) == 6
    assert sorted(metadata["prompt"] for metadata, _ in found) == sorted(
        2 * [line["prompt"] for line in GENEVAL_LINES]
    )
    # Seeds: prompt i drew with seed + i, in the record and in each PNG's text chunks.
    record = json.loads((output_dir / RECORD_FILE).read_text())
    assert [entry["seed"] for entry in record["prompts"]] == [7, 8, 9]
    # The sampling the images were drawn with is recorded even when the call named none: the checkpoint's own.
    plain = {"do_sample": True, "temperature": 1.0, "top_k": None, "top_p": None}
    assert record["generation_options"] == {"decoder": "pixel", "image_sampling": plain}
    sample = PIL.Image.open(output_dir / "00002" / "samples" / "0001.png")
    assert sample.text == {"prompt": GENEVAL_LINES[2]["prompt"], "seed": "9", "image_index": "1"}
    alone = tiny_pipeline.generate_images(
        GENEVAL_LINES[2]["prompt"], num_images_per_prompt=2, seed=[9], **FAST
    )
    assert same_pixels(sample, alone.images[1])


def test_resume_draws_only_what_is_missing_and_as_before(tiny_pipeline, geneval_file, tmp_path):
    output_dir = tmp_path / "geneval"
    options = dict(num_images_per_prompt=2, seed=3, **FAST)
    generate_prompt_suite(tiny_pipeline, GENEVAL, geneval_file, output_dir, batch_size=3, **options)
    lost = output_dir / "00001" / "samples" / "0001.png"
    before = PIL.Image.open(lost).copy()
    kept = output_dir / "00000" / "samples" / "0000.png"
    kept_mtime = kept.stat().st_mtime_ns
    lost.unlink()
    run = generate_prompt_suite(
        tiny_pipeline, GENEVAL, geneval_file, output_dir, batch_size=1, resume=True, **options
    )
    assert (run.generated, run.skipped) == (1, 2)
    assert same_pixels(PIL.Image.open(lost), before)  # the same image, drawn in another batch
    assert kept.stat().st_mtime_ns == kept_mtime
    with pytest.raises(ValueError, match="num_images_per_prompt, seed differ"):
        generate_prompt_suite(
            tiny_pipeline,
            GENEVAL,
            geneval_file,
            output_dir,
            num_images_per_prompt=1,
            seed=4,
            resume=True,
            **FAST,
        )


@pytest.mark.parametrize("count", [4, 3, 1])
def test_dpg_bench_grid_is_what_its_scorer_crops(tiny_pipeline, dpg_folder, tmp_path, count):
    output_dir = tmp_path / "dpg"
    run = generate_prompt_suite(
        tiny_pipeline, DPG_BENCH, dpg_folder, output_dir, num_images_per_prompt=count, batch_size=2, **FAST
    )
    resolution = run.image_size[0]
    assert run.image_size == (resolution, resolution)
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(
        [f"{item_id}.png" for item_id in DPG_PROMPTS] + [RECORD_FILE]
    )
    for index, item_id in enumerate(sorted(DPG_PROMPTS)):
        path = output_dir / f"{item_id}.png"
        # The scorer's question key is the file name up to the first dot: the item id of dpg_bench.csv.
        assert os.path.basename(path).split(".")[0] == item_id
        alone = tiny_pipeline.generate_images(
            DPG_PROMPTS[item_id], num_images_per_prompt=count, seed=[index], **FAST
        )
        crops = dpg_scorer_crops(path, resolution, count)
        assert all(same_pixels(crop, image) for crop, image in zip(crops, alone.images))
        assert PIL.Image.open(path).text["seed"] == str(index)
    assert f"PIC_NUM={count}" in run.scorer_hint() and f" {resolution} " in run.scorer_hint()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_images_per_prompt": 5}, "at most 4 images per prompt"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive int"),
        ({"height": 16, "width": 24}, "height and width must be equal"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"prompts": ["a cat"]}, "sets the prompts itself"),
    ],
)
def test_bad_requests_fail_before_drawing(tiny_pipeline, dpg_folder, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        generate_prompt_suite(tiny_pipeline, DPG_BENCH, dpg_folder, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"tag": "single_object", "prompt": "a cat"}\nnot json\n', "line 2: not a JSON object"),
        ('["a cat"]\n', "line 1: expected a JSON object, got list"),
        ('{"prompt": "a cat"}\n', "line 1: needs a non-empty string 'tag'"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_geneval_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_geneval_prompts(path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_geneval_prompts(tmp_path / "missing.jsonl")


def test_bad_dpg_bench_folders_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder at"):
        read_dpg_bench_prompts(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"holds no \.txt files"):
        read_dpg_bench_prompts(tmp_path)
    (tmp_path / "blank1.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank1.txt' is empty"):
        read_dpg_bench_prompts(tmp_path)


@pytest.mark.integration
def test_generate_command_writes_the_suites(checkpoint, geneval_file, dpg_folder, tmp_path, capsys):
    assert CLI_DEFAULT_BATCH_SIZE == DEFAULT_BATCH_SIZE
    common = ["generate", "--checkpoint", checkpoint, "--num-images-per-prompt", "1", "--decoder", "pixel"]
    geneval_dir, dpg_dir = tmp_path / "geneval", tmp_path / "dpg"
    assert cli.main([*common, "--geneval", str(geneval_file), "--output-dir", str(geneval_dir)]) == 0
    assert len(geneval_scorer_listing(geneval_dir)) == len(GENEVAL_LINES)
    assert "3 prompts drawn, 0 already there" in capsys.readouterr().out
    arguments = [*common, "--dpg-bench", str(dpg_folder), "--output-dir", str(dpg_dir), "--batch-size", "2"]
    assert cli.main(arguments) == 0
    assert cli.main([*arguments, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "0 prompts drawn, 3 already there" in out and "dist_eval.sh" in out
    assert sorted(path.stem for path in dpg_dir.glob("*.png")) == sorted(DPG_PROMPTS)


def test_generate_command_reports_a_bad_prompt_file_in_one_line(tmp_path, caplog):
    bad = tmp_path / "evaluation_metadata.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR):
        status = cli.main(["generate", "--geneval", str(bad), "--checkpoint", str(tmp_path / "none")])
    assert status == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "line 1: not a JSON object" in errors[0]
    with pytest.raises(SystemExit):  # --prompt and a suite are exclusive
        cli.main(["generate", "--prompt", "a cat", "--geneval", str(bad)])
