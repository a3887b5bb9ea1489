import io
import os
import signal
import subprocess
import sys
import time

import datasets
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from unimm.data.bad_records import BadRecordError, BadRecords
from unimm.data.pretokenize import load_pretokenized, pretokenize_images
from unimm.data.schema import image_segment, sample_features, text_segment
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.tokenizer.configuration_dual_codebook import DEFAULT_TEACHER_CONFIG

PATCH = 4
LEVELS = 256


class ColourEncoder(torch.nn.Module):
    """A deterministic stand-in tokenizer: the id of a cell is its mean red value in [0, 255]."""

    def __init__(self, fail_after_calls: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.images_seen = 0
        self.fail_after_calls = fail_after_calls

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.images_seen += len(pixel_values)
        pooled = F.avg_pool2d(pixel_values[:, :1], PATCH)  # (B, 1, h, w), values in [-1, 1]
        return ((pooled[:, 0] + 1) / 2 * (LEVELS - 1)).round().long()  # (B, h, w)


def _processor(size: int = 8) -> DualCodebookImageProcessor:
    return DualCodebookImageProcessor(size={"height": size, "width": size}, downsample_factor=PATCH)


def _dataset(files, count: int) -> datasets.Dataset:
    rows = [
        {"segments": [image_segment(files.png_bytes(value)), text_segment(f"colour {value}")], "label": value}
        for value in range(count)
    ]
    return datasets.Dataset.from_list(rows, features=sample_features(label=datasets.Value("int64")))


def _ids_by_label(dataset: datasets.Dataset) -> dict[int, list[int]]:
    return {row["label"]: row["segments"][0]["image_token_ids"] for row in dataset}


def test_ids_grid_and_text_are_stored(files, tmp_path):
    result = pretokenize_images(
        _dataset(files, 5), ColourEncoder(), _processor(), tmp_path / "out", rows_per_shard=2, batch_size=3
    )
    assert result["label"] == [0, 1, 2, 3, 4]
    for row in result:
        image, text = row["segments"]
        assert image["image"] is None and image["image_grid"] == [2, 2]
        assert image["image_token_ids"] == [row["label"]] * 4  # a flat colour: every cell the same id
        assert text["text"] == f"colour {row['label']}"
    assert sorted(os.listdir(tmp_path / "out")) == [
        "pretokenize.json",
        *[
            f"shard-{i:05d}-of-00003.parquet{suffix}"
            for i in range(3)
            for suffix in ("", ".bad_records.json")
        ],
    ]


def test_mixed_sizes_keep_their_own_grid(files, tmp_path):
    processor = DualCodebookImageProcessor(size=None, downsample_factor=PATCH)  # keep each image's size
    rows = [{"segments": [image_segment(files.png_bytes(9, size)), text_segment("x")]} for size in (8, 16, 8)]
    dataset = datasets.Dataset.from_list(rows, features=sample_features())
    result = pretokenize_images(dataset, ColourEncoder(), processor, tmp_path / "out", batch_size=4)
    assert [row["segments"][0]["image_grid"] for row in result] == [[2, 2], [4, 4], [2, 2]]
    assert result[1]["segments"][0]["image_token_ids"] == [9] * 16


def test_crash_and_resume_gives_the_same_ids_without_redoing_shards(files, tmp_path):
    dataset = _dataset(files, 10)
    options = {"rows_per_shard": 3, "batch_size": 2}  # shards of 3 rows: 2 encode calls per shard
    expected = pretokenize_images(dataset, ColourEncoder(), _processor(), tmp_path / "whole", **options)

    with pytest.raises(RuntimeError, match="simulated crash"):  # dies inside the third shard
        pretokenize_images(
            dataset, ColourEncoder(fail_after_calls=5), _processor(), tmp_path / "resumed", **options
        )
    done = sorted(name for name in os.listdir(tmp_path / "resumed") if name.endswith(".parquet"))
    assert done == ["shard-00000-of-00004.parquet", "shard-00001-of-00004.parquet"]
    assert not [name for name in os.listdir(tmp_path / "resumed") if ".tmp-" in name]
    finished_mtimes = {name: os.stat(tmp_path / "resumed" / name).st_mtime_ns for name in done}

    encoder = ColourEncoder()
    resumed = pretokenize_images(dataset, encoder, _processor(), tmp_path / "resumed", **options)
    assert encoder.images_seen == 4  # only shards 2 (3 rows) and 3 (1 row)
    assert {name: os.stat(tmp_path / "resumed" / name).st_mtime_ns for name in done} == finished_mtimes
    assert _ids_by_label(resumed) == _ids_by_label(expected)
    assert len(resumed) == 10


def test_resume_into_another_jobs_folder_is_refused(files, tmp_path):
    pretokenize_images(_dataset(files, 4), ColourEncoder(), _processor(), tmp_path / "out", rows_per_shard=2)
    with pytest.raises(ValueError, match="holds shards of another job"):
        pretokenize_images(
            _dataset(files, 5), ColourEncoder(), _processor(), tmp_path / "out", rows_per_shard=2
        )


def test_bad_images_are_skipped_counted_and_reported_across_resumes(files, tmp_path):
    rows = [
        {"segments": [image_segment(files.png_bytes(1)), text_segment("good")]},
        {"segments": [image_segment(files.png_bytes(2)[:40]), text_segment("truncated")]},
        {"segments": [image_segment(b""), text_segment("zero bytes")]},
        {"segments": [image_segment(files.png_bytes(4)), text_segment("good too")]},
    ]
    dataset = datasets.Dataset.from_list(rows, features=sample_features())
    tally = BadRecords()
    result = pretokenize_images(
        dataset, ColourEncoder(), _processor(), tmp_path / "out", rows_per_shard=2, bad_records=tally
    )
    assert [row["segments"][1]["text"] for row in result] == ["good", "good too"]
    assert dict(tally.counts) == {"unreadable_image": 2}
    assert "row 1: unreadable_image: segment 0" in tally.report()

    again = BadRecords()  # a finished job run again reads the tallies stored with the shards
    pretokenize_images(
        dataset, ColourEncoder(), _processor(), tmp_path / "out", rows_per_shard=2, bad_records=again
    )
    assert again.counts == tally.counts

    with pytest.raises(BadRecordError, match="row 1: unreadable_image"):
        pretokenize_images(
            dataset, ColourEncoder(), _processor(), tmp_path / "strict", rows_per_shard=2, strict=True
        )


@pytest.mark.integration  # the tokenizer's first forward takes about a second
def test_real_dual_codebook_tokenizer(files, tmp_path):
    torch.manual_seed(0)
    config = DualCodebookConfig(
        codebook_size=16,
        image_size=8,
        hidden_channels=8,
        norm_num_groups=4,
        semantic_hidden_size=16,
        teacher_config={
            **DEFAULT_TEACHER_CONFIG,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "image_size": 8,
            "patch_size": PATCH,
        },
    )
    tokenizer = DualCodebookTokenizer(config).eval()
    processor = DualCodebookImageProcessor.from_tokenizer_config(config)
    result = pretokenize_images(_dataset(files, 3), tokenizer, processor, tmp_path / "out", rows_per_shard=2)
    images = [PIL.Image.open(io.BytesIO(files.png_bytes(value))) for value in range(3)]
    expected = tokenizer.encode(processor(images=images, return_tensors="pt")["pixel_values"])  # (3, 2, 2)
    assert [row["segments"][0]["image_grid"] for row in result] == [list(expected.shape[1:])] * 3
    assert [row["segments"][0]["image_token_ids"] for row in result] == expected.flatten(1).tolist()


# A pre-tokenization job as its own program, for the kill-and-resume and multi-process tests. It logs
# the rows each process tokenized to ``encoded-<rank>.txt``.
JOB_SCRIPT = """
import io, os, sys, time
import datasets, numpy as np, PIL.Image, torch, torch.nn.functional as F
from unimm.data.pretokenize import load_pretokenized, pretokenize_images
from unimm.data.schema import image_segment, sample_features, text_segment
from unimm.tokenizer import DualCodebookImageProcessor

output_dir, seconds_per_batch = sys.argv[1], float(sys.argv[2])
rank = os.environ.get("RANK", "0")

def png(value):
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()

class SlowColourEncoder:
    def encode(self, pixel_values):
        time.sleep(seconds_per_batch)
        ids = ((F.avg_pool2d(pixel_values[:, :1], 4)[:, 0] + 1) / 2 * 255).round().long()
        with open(os.path.join(output_dir, "..", f"encoded-{rank}.txt"), "a") as log:
            log.write("".join(f"{int(row[0, 0])}\\n" for row in ids))
        return ids

rows = [{"segments": [image_segment(png(v)), text_segment(str(v))]} for v in range(12)]
dataset = datasets.Dataset.from_list(rows, features=sample_features())
processor = DualCodebookImageProcessor(size={"height": 8, "width": 8}, downsample_factor=4)
result = pretokenize_images(dataset, SlowColourEncoder(), processor, output_dir, rows_per_shard=2, batch_size=2)
assert [row["segments"][1]["text"] for row in result] == [str(v) for v in range(12)]
"""


def _job(tmp_path, name: str) -> list[str]:
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)
    (tmp_path / name).mkdir()
    return [str(script), str(tmp_path / name / "shards")]


def _encoded_rows(tmp_path, name: str) -> dict[str, list[int]]:
    logs = sorted((tmp_path / name).glob("encoded-*.txt"))
    return {log.stem: [int(line) for line in log.read_text().split()] for log in logs}


def _job_env(tmp_path, clean_env: dict[str, str]) -> dict[str, str]:
    return {**clean_env, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "ACCELERATE_USE_CPU": "1"}


@pytest.mark.integration
def test_killed_job_resumes_without_redoing_finished_shards(tmp_path, clean_env):
    script, shards = _job(tmp_path, "killed")
    env = _job_env(tmp_path, clean_env)
    job = subprocess.Popen([sys.executable, script, shards, "0.5"], env=env)
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine starts Python slowly
    while len(list((tmp_path / "killed" / "shards").glob("shard-*.parquet"))) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = sorted(path.name for path in (tmp_path / "killed" / "shards").glob("shard-*.parquet"))
    assert 2 <= len(finished) < 6
    encoded_before_kill = _encoded_rows(tmp_path, "killed")["encoded-0"]

    (tmp_path / "killed" / "encoded-0.txt").unlink()
    partial = tmp_path / "killed" / "shards" / ".shard-00005-of-00006.parquet.tmp-999"
    partial.write_bytes(b"half a shard")  # as a job killed while writing leaves it
    subprocess.run([sys.executable, script, shards, "0"], env=env, check=True)
    encoded_after_restart = _encoded_rows(tmp_path, "killed")["encoded-0"]
    # No row of a finished shard is tokenized again; the rest is.
    finished_rows = {2 * int(name[6:11]) + offset for name in finished for offset in (0, 1)}
    assert not finished_rows & set(encoded_after_restart)
    assert sorted(finished_rows | set(encoded_after_restart)) == list(range(12))
    assert set(encoded_before_kill) >= finished_rows
    assert not partial.exists()

    # The same rows and ids as an uninterrupted run: a flat colour v gives id v in each of the 4 cells.
    resumed = load_pretokenized(shards)
    assert [row["segments"][1]["text"] for row in resumed] == [str(value) for value in range(12)]
    assert [row["segments"][0]["image_token_ids"] for row in resumed] == [[value] * 4 for value in range(12)]


@pytest.mark.integration
def test_two_processes_share_the_shards(tmp_path, clean_env):
    script, shards = _job(tmp_path, "torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, shards, "0"]
    subprocess.run(command, env=_job_env(tmp_path, clean_env), check=True, timeout=300)
    encoded = _encoded_rows(tmp_path, "torchrun")
    # Shards of 2 rows, round-robin: rank 0 takes shards 0, 2, 4 and rank 1 takes 1, 3, 5.
    assert sorted(encoded["encoded-0"]) == [0, 1, 4, 5, 8, 9]
    assert sorted(encoded["encoded-1"]) == [2, 3, 6, 7, 10, 11]
    result = load_pretokenized(shards)
    assert [row["segments"][0]["image_token_ids"] for row in result] == [[value] * 4 for value in range(12)]


def test_a_shard_of_only_bad_rows_and_a_job_of_only_bad_rows(files, tmp_path):
    good, bad = image_segment(files.png_bytes(1)), image_segment(b"not an image")
    rows = [{"segments": [bad, text_segment("bad")]}] * 2 + [{"segments": [good, text_segment("good")]}]
    dataset = datasets.Dataset.from_list(rows, features=sample_features())
    # The first shard has no good row: its empty parquet file broke loading the whole job.
    result = pretokenize_images(dataset, ColourEncoder(), _processor(), tmp_path / "some", rows_per_shard=2)
    assert [row["segments"][1]["text"] for row in result] == ["good"]
    assert len(load_pretokenized(tmp_path / "some")) == 1

    all_bad = dataset.select([0, 1])
    with pytest.raises(ValueError, match=r"(?s)none of the 2 rows could be tokenized.*unreadable_image: 2"):
        pretokenize_images(all_bad, ColourEncoder(), _processor(), tmp_path / "none", rows_per_shard=1)
    assert list((tmp_path / "none").iterdir()) == []  # a rerun on repaired data starts over
