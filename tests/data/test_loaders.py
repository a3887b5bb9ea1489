import json
from collections import Counter

import datasets
import datasets.distributed
import pyarrow
import pyarrow.parquet
import pytest

from unimm.data.bad_records import BadRecords
from unimm.data.loaders import (
    load_image_folder,
    load_interleaved,
    load_jsonl,
    load_llava,
    load_parquet,
    load_webdataset,
    mix_datasets,
)


def _pairs(dataset, files) -> list[tuple[int, str]]:
    """(image colour, caption) per sample, checking the pair layout on the way."""
    pairs = []
    for sample in dataset:
        image, text = sample["segments"]
        assert (image["type"], text["type"]) == ("image", "text")
        pairs.append((files.pixel_value(image["image"]), text["text"]))
    return pairs


def test_jsonl_pairs_resolve_relative_paths(files):
    dataset = load_jsonl(files.pairs_jsonl())
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["segments"]
    assert _pairs(dataset, files) == [(0, "caption 0"), (10, "caption 1"), (20, "caption 2")]


def test_jsonl_streaming_gives_the_same_samples(files):
    path = files.pairs_jsonl()
    dataset = load_jsonl(path, streaming=True)
    assert isinstance(dataset, datasets.IterableDataset)
    assert _pairs(dataset, files) == _pairs(load_jsonl(path), files)


def test_parquet_with_image_bytes_and_paths(files):
    files.png("on_disk.png", 70)
    table = pyarrow.table(
        {
            "image": [
                {"bytes": files.png_bytes(50), "path": None},
                {"bytes": None, "path": "on_disk.png"},
            ],
            "text": ["from bytes", "from a path"],
        }
    )
    pyarrow.parquet.write_table(table, files.root / "pairs.parquet")
    dataset = load_parquet(files.root / "pairs.parquet")
    assert _pairs(dataset, files) == [(50, "from bytes"), (70, "from a path")]


def test_webdataset_shards_with_txt_and_json_captions(files):
    first = files.tar("shard-0.tar", [("a/0.png", files.png_bytes(1)), ("a/0.txt", b"zero")])
    second = files.tar(
        "shard-1.tar",
        [("b/7.png", files.png_bytes(7)), ("b/7.json", json.dumps({"caption": "seven"}).encode())],
    )
    dataset = load_webdataset([first, second])
    assert _pairs(dataset, files) == [(1, "zero"), (7, "seven")]
    streamed = load_webdataset([first, second], streaming=True)
    assert streamed.num_shards == 2  # one shard per tar, so workers and nodes split the files
    assert _pairs(streamed, files) == [(1, "zero"), (7, "seven")]
    second_node = datasets.distributed.split_dataset_by_node(streamed, rank=1, world_size=2)
    assert _pairs(second_node, files) == [(7, "seven")]


def test_image_folder_with_jsonl_and_csv_metadata(files):
    files.png("train/cat.png", 3)
    files.png("train/dog.png", 4)
    files.jsonl("train/metadata.jsonl", [{"file_name": "cat.png", "text": "a cat"}])
    files.png("extra/bird.png", 5)
    files.write("extra/metadata.csv", 'file_name,caption\nbird.png,"a bird, flying"\n')
    files.write("train/metadata_dog.txt", "not metadata")
    dataset = load_image_folder(files.root)
    # dog.png has no metadata entry: reported as a bad record, not silently loaded without a caption.
    assert sorted(_pairs(dataset, files)) == [(3, "a cat"), (5, "a bird, flying")]


def test_llava_conversations_place_images_at_placeholders(files):
    files.png("coco/1.png", 9)
    records = [
        {
            "id": "1",
            "image": "coco/1.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A grey square."},
            ],
        },
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    files.write("llava.json", json.dumps(records))
    first, second = load_llava(files.root / "llava.json")
    layout = [(s["type"], s["role"], s["text"]) for s in first["segments"]]
    assert layout == [
        ("image", "user", None),
        ("text", "user", "What is this?"),
        ("text", "assistant", "A grey square."),
    ]
    assert files.pixel_value(first["segments"][0]["image"]) == 9
    assert [(s["role"], s["text"]) for s in second["segments"]] == [("user", "Hi"), ("assistant", "Hello")]


def test_interleaved_documents_keep_the_order(files):
    files.png("doc/a.png", 11)
    files.png("doc/b.png", 22)
    record = {"texts": ["intro", None, "middle", None], "images": [None, "doc/a.png", None, "doc/b.png"]}
    (document,) = load_interleaved(files.jsonl("docs.jsonl", [record]))
    kinds = [s["type"] for s in document["segments"]]
    assert kinds == ["text", "image", "text", "image"]
    assert [files.pixel_value(s["image"]) for s in document["segments"] if s["type"] == "image"] == [11, 22]
    assert [s["text"] for s in document["segments"] if s["type"] == "text"] == ["intro", "middle"]


def test_rows_already_in_the_schema(files):
    files.png("pictures/p.png", 33)
    records = [
        {
            "segments": [
                {"type": "text", "role": "user", "text": "draw it"},
                {
                    "type": "image",
                    "role": "assistant",
                    "image_token_ids": [4, 5, 6, 7, 8, 9],
                    "image_grid": [2, 3],
                },
            ],
            "id": "a",
        },
        {"segments": [{"type": "image", "image": "pictures/p.png"}, {"type": "text", "text": "a picture"}]},
    ]
    tokens, pixels = load_jsonl(files.jsonl("samples.jsonl", records), kind="samples")
    assert [(s["type"], s["role"]) for s in tokens["segments"]] == [("text", "user"), ("image", "assistant")]
    assert tokens["segments"][1]["image_token_ids"] == [4, 5, 6, 7, 8, 9]
    assert tokens["segments"][1]["image_grid"] == [2, 3]
    assert files.pixel_value(pixels["segments"][0]["image"]) == 33
    assert pixels["segments"][0]["role"] == ""


def test_mixture_follows_the_weights(files):
    files.png("x.png", 1)
    many_a = files.jsonl("a.jsonl", [{"image": "x.png", "caption": "a"}] * 200)
    many_b = files.jsonl("b.jsonl", [{"image": "x.png", "caption": "b"}] * 200)
    mixture = mix_datasets(
        [load_jsonl(many_a, streaming=True), load_jsonl(many_b, streaming=True)], weights=[3, 1], seed=0
    )
    counts = Counter(sample["segments"][1]["text"] for sample in mixture.take(200))
    assert counts["a"] + counts["b"] == 200
    assert 120 <= counts["a"] <= 180  # 150 expected at weights 3:1 (binomial sd ≈ 6)


def test_mixture_rejects_bad_weights(files):
    dataset = load_jsonl(files.pairs_jsonl())
    with pytest.raises(ValueError, match="one weight per dataset"):
        mix_datasets([dataset, dataset], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        mix_datasets([dataset], weights=[-1.0])


def test_edited_file_is_read_again(files):
    path = files.pairs_jsonl()
    assert len(load_jsonl(path)) == 3
    files.pairs_jsonl(count=4)
    assert len(load_jsonl(path)) == 4  # not the cached three rows


def test_missing_data_file_is_a_clear_error(files):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(files.root / "nope.jsonl")
    files.png("folder/a.png", 1)
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl or metadata.csv under"):
        load_image_folder(files.root / "folder")


def test_relative_image_paths_cannot_leave_the_dataset_folder(files):
    files.png("outside/secret.png", 7)
    files.png("data/images/0.png", 0)
    path = files.jsonl(
        "data/pairs.jsonl",
        [
            {"image": "images/0.png", "caption": "inside"},
            {"image": "../outside/secret.png", "caption": "escapes"},
            {"image": "images/../../outside/secret.png", "caption": "escapes too"},
        ],
    )
    bad_records = BadRecords()
    assert _pairs(load_jsonl(path, bad_records=bad_records), files) == [(0, "inside")]
    assert dict(bad_records.counts) == {"outside_root": 2}
    # The image folder layout: file_name in metadata.jsonl follows the same rule.
    files.png("folder/cat.png", 3)
    files.jsonl(
        "folder/metadata.jsonl",
        [{"file_name": "cat.png", "text": "a cat"}, {"file_name": "../outside/secret.png", "text": "no"}],
    )
    bad_records = BadRecords()
    assert _pairs(load_image_folder(files.root / "folder", bad_records=bad_records), files) == [(3, "a cat")]
    assert dict(bad_records.counts) == {"outside_root": 1}


def test_relative_data_folder_is_joined_once(files, monkeypatch):
    files.png("data/shapes/cat.png", 3)
    files.jsonl("data/shapes/metadata.jsonl", [{"file_name": "cat.png", "text": "a cat"}])
    files.jsonl("data/shapes/sub/pairs.jsonl", [{"image": "cat.png", "caption": "a cat"}])
    files.jsonl("data/pairs.jsonl", [{"image": "shapes/cat.png", "caption": "a cat"}])
    monkeypatch.chdir(files.root)
    # "data/shapes" was joined twice ("data/data/shapes/cat.png"), so every row was missing.
    bad_records = BadRecords()
    assert _pairs(load_image_folder("data/shapes", bad_records=bad_records), files) == [(3, "a cat")]
    assert bad_records.total == 0
    assert _pairs(load_jsonl("data/pairs.jsonl"), files) == [(3, "a cat")]
    # A data file's root is its own folder unless image_root says otherwise.
    assert _pairs(load_jsonl("data/shapes/sub/pairs.jsonl", image_root="data/shapes"), files) == [
        (3, "a cat")
    ]
