import json

import numpy as np
import PIL.Image
import pytest
import torch

from unimm import cli
from unimm.data.pretokenize import load_pretokenized
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.tokenizer.configuration_dual_codebook import DEFAULT_TEACHER_CONFIG


def _tiny_tokenizer() -> DualCodebookTokenizer:
    torch.manual_seed(0)
    teacher = {**DEFAULT_TEACHER_CONFIG, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = DualCodebookConfig(
        codebook_size=16,
        image_size=8,
        hidden_channels=8,
        norm_num_groups=4,
        semantic_hidden_size=16,
        teacher_config={**teacher, "image_size": 8, "patch_size": 4},
    )
    return DualCodebookTokenizer(config).eval()


@pytest.mark.integration
def test_tokenize_images_command(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    tokenizer = _tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # saved without its processor: rebuilt from the config
    images = []
    for value in range(5):
        array = np.random.default_rng(value).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        PIL.Image.fromarray(array).save(tmp_path / f"{value}.png")
        images.append(PIL.Image.fromarray(array))
    records = [{"image": f"{value}.png", "caption": f"image {value}"} for value in range(5)]
    records.append({"image": "missing.png", "caption": "gone"})  # skipped and reported, the rest kept
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    argv = ["tokenize-images", "--tokenizer", str(tmp_path / "tokenizer"), "--format", "jsonl"]
    argv += [
        "--data",
        str(tmp_path / "data.jsonl"),
        "--output",
        str(tmp_path / "out"),
        "--rows-per-shard",
        "2",
    ]
    assert cli.main(argv) == 0

    result = load_pretokenized(tmp_path / "out")
    assert [row["segments"][1]["text"] for row in result] == [f"image {value}" for value in range(5)]
    processor = DualCodebookImageProcessor.from_tokenizer_config(tokenizer.config)
    expected = tokenizer.encode(processor(images=images, return_tensors="pt")["pixel_values"])  # (5, 2, 2)
    assert [row["segments"][0]["image_token_ids"] for row in result] == expected.flatten(1).tolist()
    assert all(row["segments"][0]["image_grid"] == [2, 2] for row in result)
