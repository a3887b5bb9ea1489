"""Dataset specs: every form a recipe's ``dataset`` field takes resolves, in one place, to schema samples."""

from __future__ import annotations

import io
import json
import logging

import datasets
import numpy as np
import PIL.Image
import pyarrow
import pyarrow.parquet
import pytest

from unimm.data import spec as spec_module
from unimm.data.bad_records import BadRecords
from unimm.data.schema import image_segment, sample_features, text_segment
from unimm.data.spec import (
    DatasetSpec,
    DatasetSpecError,
    hold_out,
    load_dataset_spec,
    load_image_splits,
    parse_dataset_spec,
    resolve_spec_paths,
)


def _colours(dataset) -> list[int]:
    """The colour of each sample's image (fixture images are one flat colour)."""
    return [
        int(np.asarray(segment["image"])[0, 0, 0])
        for sample in dataset
        for segment in sample["segments"][:1]
        if segment["type"] == "image"
    ]


def _captions(dataset) -> list[str]:
    return [
        segment["text"] for sample in dataset for segment in sample["segments"] if segment["type"] == "text"
    ]


def _image_folder(files, name: str = "pictures", count: int = 3, metadata: bool = True):
    for index in range(count):
        files.png(f"{name}/{index}.png", 10 * index)
    if metadata:
        files.jsonl(
            f"{name}/metadata.jsonl",
            [{"file_name": f"{i}.png", "text": f"picture {i}"} for i in range(count)],
        )
    return files.root / name


# --- the forms of a spec ----------------------------------------------------------------------------


def test_demo_names_go_to_the_demo_loader(monkeypatch):
    calls = []

    def fake_demo(name, image_size, cache_dir=None):
        calls.append((name, image_size, cache_dir))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})})

    monkeypatch.setattr(spec_module, "load_demo_dataset", fake_demo)
    loaded = load_dataset_spec("emoji", image_size=16, cache_dir="cache")
    assert calls == [("emoji", 16, "cache")] and list(loaded) == ["train"]
    assert parse_dataset_spec("fashion_mnist") == DatasetSpec(demo="fashion_mnist")


def test_captioned_image_folder_is_inferred(files):
    folder = _image_folder(files)
    splits = load_dataset_spec(str(folder))
    assert list(splits) == ["train"]
    assert _colours(splits["train"]) == [0, 10, 20]
    assert _captions(splits["train"]) == ["picture 0", "picture 1", "picture 2"]


def test_image_folder_without_metadata_is_images_only(files):
    folder = _image_folder(files, count=2, metadata=False)
    files.write("pictures/broken.png", files.png_bytes(5)[:30])  # truncated: skipped and counted
    files.write("pictures/notes.txt", "not an image")
    bad_records = BadRecords()
    (train,) = load_dataset_spec(str(folder), bad_records=bad_records).values()
    assert [[segment["type"] for segment in sample["segments"]] for sample in train] == [["image"], ["image"]]
    assert _colours(train) == [0, 10]
    assert dict(bad_records.counts) == {"unreadable_image": 1}


def test_webdataset_shards_as_a_folder_or_a_glob(files):
    (files.root / "shards").mkdir()
    files.tar("shards/a-0.tar", [("0.png", files.png_bytes(1)), ("0.txt", b"one")])
    files.tar("shards/a-1.tar", [("1.png", files.png_bytes(2)), ("1.txt", b"two")])
    assert _captions(load_dataset_spec(str(files.root / "shards"))["train"]) == ["one", "two"]
    assert _captions(load_dataset_spec(str(files.root / "shards" / "*-1.tar"))["train"]) == ["two"]


def test_parquet_jsonl_llava_and_schema_rows_by_their_columns(files):
    files.png("images/0.png", 0)
    table = pyarrow.table({"image": [{"bytes": files.png_bytes(40), "path": None}], "text": ["from parquet"]})
    pyarrow.parquet.write_table(table, files.root / "pairs.parquet")
    assert _captions(load_dataset_spec(str(files.root / "pairs.parquet"))["train"]) == ["from parquet"]

    files.jsonl("pairs.jsonl", [{"image": "images/0.png", "caption": "from jsonl"}])
    assert _captions(load_dataset_spec(str(files.root / "pairs.jsonl"))["train"]) == ["from jsonl"]

    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Black."}]
    files.write("llava.json", json.dumps([{"image": "images/0.png", "conversations": turns}]))
    (conversation,) = load_dataset_spec(str(files.root / "llava.json"))["train"]
    assert [segment["role"] for segment in conversation["segments"]] == ["user", "user", "assistant"]

    files.jsonl("samples.jsonl", [{"segments": [{"type": "image", "image": "images/0.png"}]}])
    (sample,) = load_dataset_spec(str(files.root / "samples.jsonl"))["train"]
    assert [segment["type"] for segment in sample["segments"]] == ["image"]


def test_save_to_disk_folders_keep_their_columns_and_splits(files):
    image = PIL.Image.new("RGB", (8, 8), (7, 7, 7))
    rows = {"segments": [[image_segment(image)], [image_segment(image)]], "label": [3, 4]}
    features = sample_features(label=datasets.Value("int64"))
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(files.root / "one")
    (train,) = load_dataset_spec(str(files.root / "one")).values()
    assert train["label"] == [3, 4]

    table = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(files.root / "two")
    splits = load_dataset_spec(str(files.root / "two"))
    assert (len(splits["train"]), len(splits["test"])) == (2, 1)


def test_mapping_with_format_data_files_and_columns(files):
    files.png("elsewhere/a.png", 50)
    files.jsonl("rows/part-0.jsonl", [{"picture": "a.png", "alt": "custom columns"}])
    files.jsonl("rows/part-1.jsonl", [{"picture": "a.png", "alt": "second file"}])
    spec = {
        "format": "jsonl",
        "data_files": [str(files.root / "rows" / "part-*.jsonl")],
        "image_root": str(files.root / "elsewhere"),
        "image_column": "picture",
        "text_column": "alt",
    }
    train = load_dataset_spec(spec)["train"]
    assert _captions(train) == ["custom columns", "second file"] and _colours(train) == [50, 50]


def test_command_line_forms_json_string_and_yaml_flow_mapping(files):
    from unimm.training.arguments import parse_overrides

    folder = str(_image_folder(files, metadata=False))
    as_json = json.dumps({"format": "images", "path": folder})
    (override,) = parse_overrides([f"dataset={{format: images, path: {folder}}}"]).values()
    assert (
        parse_dataset_spec(as_json)
        == parse_dataset_spec(override)
        == DatasetSpec(format="images", path=folder)
    )
    assert len(load_dataset_spec(as_json)["train"]) == 3


def test_streaming_gives_iterable_splits(files):
    folder = _image_folder(files, metadata=False)
    splits = load_dataset_spec({"path": str(folder), "streaming": True})
    assert isinstance(splits, datasets.IterableDatasetDict)
    assert _colours(splits["train"]) == [0, 10, 20]


# --- paths and eval splits --------------------------------------------------------------------------


def test_relative_paths_resolve_against_base_dir_else_the_working_directory(files, monkeypatch):
    _image_folder(files, name="recipes/pictures")
    spec = {"path": "pictures", "eval_path": "pictures"}
    splits = load_dataset_spec(spec, base_dir=files.root / "recipes")
    assert (len(splits["train"]), len(splits["test"])) == (3, 3)
    monkeypatch.chdir(files.root / "recipes")
    assert len(load_dataset_spec("pictures")["train"]) == 3
    monkeypatch.chdir(files.root)
    with pytest.raises(DatasetSpecError, match="dataset.path: no file or folder at .*pictures"):
        load_dataset_spec("pictures")


def test_resolve_spec_paths_keeps_names_and_makes_paths_absolute(tmp_path):
    assert resolve_spec_paths("demo", tmp_path) == "demo"
    assert resolve_spec_paths("synthetic", tmp_path, names=("synthetic",)) == "synthetic"
    assert resolve_spec_paths("data/x.jsonl", tmp_path) == str(tmp_path / "data" / "x.jsonl")
    resolved = resolve_spec_paths({"path": "a", "eval_fraction": 0.5, "image_root": "/abs"}, tmp_path)
    assert resolved == {"path": str(tmp_path / "a"), "image_root": "/abs", "eval_fraction": 0.5}


def test_eval_fraction_is_a_deterministic_split(files):
    for index in range(20):
        files.png(f"many/{index:02d}.png", index)
    spec = {"path": str(files.root / "many"), "eval_fraction": 0.25, "seed": 3}
    first, again = load_dataset_spec(spec), load_dataset_spec(spec)
    held_out = _colours(first["test"])
    assert len(held_out) == 5 and held_out == _colours(again["test"])
    assert sorted(held_out + _colours(first["train"])) == list(range(20))
    other_seed = _colours(load_dataset_spec({**spec, "seed": 4})["test"])
    assert sorted(other_seed) != sorted(held_out)


def test_image_splits_hold_out_an_eval_split_and_drop_rows_without_images(files, caplog):
    for index in range(10):
        files.png(f"docs/{index}.png", index)
    records = [{"texts": [None, "caption"], "images": [f"docs/{i}.png", None]} for i in range(10)]
    records.append({"texts": ["text only"], "images": [None]})
    path = files.jsonl("docs.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="unimm.data.spec"):
        train, held_out = load_image_splits(str(path), max_train_samples=4)
    assert "1 of 11 training rows have no image" in caplog.text
    assert "holding out 1 of its 10 training rows" in caplog.text
    assert len(train) == 4 and len(held_out) == 1
    assert not set(_colours(train)) & set(_colours(held_out))


def test_image_splits_of_a_folder_without_a_usable_image_is_an_error(files):
    files.write("broken/0.png", b"not a png")
    with pytest.raises(DatasetSpecError, match="no training row has a usable image"):
        load_image_splits(str(files.root / "broken"))


def test_hold_out_of_too_few_rows_is_an_error():
    with pytest.raises(DatasetSpecError, match="leaves no training or no eval row"):
        hold_out(datasets.Dataset.from_dict({"x": [1]}), 0.5, seed=0)


# --- bad specs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"format": "csv", "path": "x"},
            r"dataset.format: unknown format 'csv'; expected one of \('imagefolder'",
        ),
        ({"format": "emoji", "path": "x"}, "a demo dataset is named on its own"),
        ({"pth": "x"}, "dataset: unknown key 'pth' \\(did you mean 'path'\\?\\)"),
        ({"format": "jsonl"}, "a mapping needs exactly one of `path` and `data_files`"),
        ({"path": "a", "data_files": ["b"]}, "exactly one of `path` and `data_files`"),
        ({"format": "images", "data_files": ["b"]}, "format 'images' reads one folder"),
        ({"path": "a", "eval_fraction": 1.5}, r"dataset.eval_fraction: expected a number in \(0, 1\)"),
        ({"path": "a", "eval_fraction": 0.1, "eval_path": "b"}, "eval_path or eval_fraction, not both"),
        ({"path": "a", "streaming": "yes"}, "dataset.streaming: expected true or false"),
        ({"path": 3}, "dataset.path: expected a non-empty string"),
        ("", "expected a demo name"),
        (7, "expected a demo name .*, a path or a mapping, got int"),
        ('{"path": ', "is not a JSON object"),
    ],
)
def test_bad_specs_name_the_field(value, message):
    with pytest.raises(DatasetSpecError, match=message):
        parse_dataset_spec(value)


def test_streaming_is_refused_where_rows_are_read_by_index():
    with pytest.raises(DatasetSpecError, match="dataset.streaming: this stage reads its images by index"):
        parse_dataset_spec({"path": "a", "streaming": True}, random_access=True)


def test_bad_paths_fail_when_loaded(files):
    with pytest.raises(DatasetSpecError, match="no file or folder at .*fashion_mnst.*is not a demo name"):
        load_dataset_spec(str(files.root / "fashion_mnst"))
    files.write("empty/readme.txt", "nothing to train on")
    with pytest.raises(DatasetSpecError, match="dataset.path: nothing recognisable in .*empty"):
        load_dataset_spec(str(files.root / "empty"))
    files.write("table.csv", "a,b\n")
    with pytest.raises(DatasetSpecError, match="cannot tell the format of .*table.csv"):
        load_dataset_spec(str(files.root / "table.csv"))
    with pytest.raises(DatasetSpecError, match="no file matches"):
        load_dataset_spec(str(files.root / "*.tar"))
    with pytest.raises(DatasetSpecError, match="no .tar files for format 'webdataset'"):
        load_dataset_spec({"format": "webdataset", "path": str(files.root / "empty")})
    datasets.Dataset.from_dict({"text": ["no segments"]}).save_to_disk(files.root / "plain")
    with pytest.raises(DatasetSpecError, match="not sample-schema rows"):
        load_dataset_spec(str(files.root / "plain"))


def test_images_of_mixed_modes_and_sizes_load(files):
    modes = {"rgba.png": ("RGBA", (5, 9)), "grey.png": ("L", (20, 7)), "palette.png": ("P", (8, 8))}
    for name, (mode, size) in modes.items():
        buffer = io.BytesIO()
        PIL.Image.new(mode, size).save(buffer, format="PNG")
        files.write(f"mixed/{name}", buffer.getvalue())
    train = load_dataset_spec(str(files.root / "mixed"))["train"]
    assert sorted(sample["segments"][0]["image"].mode for sample in train) == ["L", "P", "RGBA"]


def test_text_segments_only_rows_are_kept_by_load_dataset_spec(files):
    rows = [{"segments": [text_segment("just text")]}]
    files.jsonl("text.jsonl", rows)
    assert _captions(load_dataset_spec(str(files.root / "text.jsonl"))["train"]) == ["just text"]


def test_stage_arguments_keep_data_paths_absolute(tmp_path, monkeypatch):
    from unimm.training.stages.detokenizer import DetokenizerArguments
    from unimm.training.stages.tokenizer import TokenizerStageArguments

    monkeypatch.chdir(tmp_path)
    tokenizer_args = TokenizerStageArguments(dataset={"path": "pics", "eval_fraction": 0.1})
    assert tokenizer_args.dataset == {"path": str(tmp_path / "pics"), "eval_fraction": 0.1}
    assert TokenizerStageArguments(dataset="synthetic").dataset == "synthetic"
    assert TokenizerStageArguments(dataset="emoji").dataset == "emoji"
    assert DetokenizerArguments(tokenizer_path="tok", dataset="pics").dataset == str(tmp_path / "pics")
