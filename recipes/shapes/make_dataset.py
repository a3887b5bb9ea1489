"""Coloured shapes with captions: a stand-in for "your own image folder" (neither Fashion-MNIST nor emoji).

    python recipes/shapes/make_dataset.py data/shapes --count 3000 --size 32

Writes ``OUT/train/images/NNNNN.png`` with ``OUT/train/metadata.jsonl`` (the imagefolder layout:
``file_name``, ``text``), the same pairs as a LLaVA conversation file ``OUT/train/llava.json``, and a
held-out split in ``OUT/test/`` (the same layout). Each image is one shape (circle, square or triangle) in one of six colours, of a
random size and place on a light background: "a red circle". The same ``--seed`` gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from shapes import COLOURS, SHAPES, draw_shape  # this folder: the script's own

TEST_SHARE = 0.1


def write_split(folder: Path, count: int, size: int, rng: random.Random) -> list[dict[str, str]]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"images/{index:05d}.png"
        draw_shape(shape, colour, size, rng).save(folder / name)
        records.append({"file_name": name, "text": f"a {colour} {shape}"})
    with open(folder / "metadata.jsonl", "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return records


def write_llava(folder: Path, records: list[dict[str, str]]) -> None:
    conversations = [
        {
            "id": str(index),
            "image": record["file_name"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shape is this?"},
                {"from": "gpt", "value": record["text"] + "."},
            ],
        }
        for index, record in enumerate(records)
    ]
    (folder / "llava.json").write_text(json.dumps(conversations, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--count", type=int, default=3000, help="images in all (train + test)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    test_count = max(1, round(args.count * TEST_SHARE))
    train = write_split(args.output / "train", args.count - test_count, args.size, rng)
    write_split(args.output / "test", test_count, args.size, rng)
    write_llava(args.output / "train", train)


if __name__ == "__main__":
    main()
