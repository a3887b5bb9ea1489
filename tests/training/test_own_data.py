"""A user's own captioned images through every step, with the documented commands only.

The coloured-shapes recipe (recipes/shapes: make_dataset.py, tokenizer, prepare, llm, detokenizer, assemble,
eval) at tiny sizes, run by `unimm build` as CLI subprocesses: the LLM under torchrun with 2 processes, the
same data also as a LLaVA JSON through prepare; then the assembled checkpoint chats and
draws through UniMMPipeline, and its eval report scores the held-out split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
SHAPES = REPOSITORY / "recipes" / "shapes"
TIMEOUT_SECONDS = 600
TINY_BACKBONE = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,"
    " num_key_value_heads: 2, max_position_embeddings: 128, tie_word_embeddings: false}"
)
TINY_UNET = [
    "image_size=16",
    "block_out_channels=[16, 32]",
    "down_block_types=[DownBlock2D, CrossAttnDownBlock2D]",
    "up_block_types=[CrossAttnUpBlock2D, UpBlock2D]",
    "norm_num_groups=8",
    "attention_head_dim=8",
    "cross_attention_dim=32",
]
SHORT = ["warmup_steps=0", "eval_steps=2", "sample_steps=2", "save_steps=2"]
SPLITS = "{path: ${work_dir}/data/train, eval_path: ${work_dir}/data/test}"


def _step(name: str, output: str, **values) -> dict:
    return {"name": name, "output": output, **values}


def tiny_build(work_dir: Path) -> dict:
    """recipes/shapes/build.yaml's steps at tiny sizes (the same recipes, smaller by overrides)."""
    llm_args = [
        "model_name_or_path=${work_dir}/prepared/init",
        "max_steps=4",
        "per_device_train_batch_size=4",
    ]
    llm_args += ["bf16=false", "sample_tokenizer_path=${work_dir}/tokenizer/export", *SHORT]
    return {
        "work_dir": str(work_dir),
        "steps": [
            _step(
                "data",
                "${work_dir}/data/test/metadata.jsonl",
                script=str(SHAPES / "make_dataset.py"),
                args=["${work_dir}/data", "--count", "120", "--size", "16"],
            ),
            _step(
                "tokenizer",
                "${work_dir}/tokenizer/export",
                command="train",
                recipe=str(SHAPES / "tokenizer.yaml"),
                args=[
                    "output_dir=${work_dir}/tokenizer",
                    "dataset=${work_dir}/data/train",
                    "tokenizer_config=tiny",
                    "codebook_size=16",
                    "image_size=16",
                    "max_steps=2",
                    "per_device_train_batch_size=8",
                    "max_eval_samples=16",
                    "num_sample_images=4",
                    *SHORT,
                ],
            ),
            *(
                _step(
                    name,
                    f"${{work_dir}}/{name}/prepare.json",
                    command="prepare",
                    recipe=str(SHAPES / "prepare.yaml"),
                    args=[
                        f"output_dir=${{work_dir}}/{name}",
                        "visual_tokenizer=${work_dir}/tokenizer/export",
                        f"dataset={dataset}",
                        f"backbone={TINY_BACKBONE}",
                    ],
                )
                for name, dataset in (
                    ("prepared", SPLITS),
                    ("prepared_llava", "${work_dir}/data/train/llava.json"),
                )
            ),
            _step(
                "llm",
                "${work_dir}/llm/export",
                command="train",
                recipe=str(SHAPES / "llm.yaml"),
                launcher=["torchrun", "--nproc_per_node", "2"],
                args=[
                    "output_dir=${work_dir}/llm",
                    "train_dataset=${work_dir}/prepared/train",
                    "eval_dataset=${work_dir}/prepared/eval",
                    *llm_args,
                ],
            ),
            _step(
                "detokenizer",
                "${work_dir}/detokenizer/export",
                command="train",
                recipe=str(SHAPES / "detokenizer.yaml"),
                args=[
                    "output_dir=${work_dir}/detokenizer",
                    "tokenizer_path=${work_dir}/tokenizer/export",
                    f"dataset={SPLITS}",
                    "max_steps=2",
                    "per_device_train_batch_size=4",
                    "sample_inference_steps=2",
                    "max_eval_samples=8",
                    *TINY_UNET,
                    *SHORT,
                ],
            ),
            _step(
                "assemble",
                "${work_dir}/checkpoint/model_index.json",
                command="assemble",
                args=[
                    "--llm=${work_dir}/llm/export",
                    "--visual-tokenizer=${work_dir}/tokenizer/export",
                    "--detokenizer=${work_dir}/detokenizer/export",
                    "--output=${work_dir}/checkpoint",
                    "--training-data=coloured shapes (${work_dir}/data/train)",
                ],
            ),
            _step(
                "eval",
                "${work_dir}/eval/report.json",
                command="eval",
                args=[
                    "${work_dir}/checkpoint",
                    f"--dataset={SPLITS}",
                    "--task=understanding",
                    "--task=prompt_following",
                    "--task=reconstruction",
                    f"--judge={SHAPES / 'shapes.py'}:judge",
                    "--decoder=pixel",
                    "--limit=6",
                    "--output-dir=${work_dir}/eval",
                ],
            ),
        ],
    }


def test_own_images_through_every_step(tmp_path: Path, subprocess_env: dict[str, str]):
    work = tmp_path / "shapes"
    recipe = tmp_path / "build.yaml"
    recipe.write_text(json.dumps(tiny_build(work)))  # JSON is YAML
    command = [sys.executable, "-m", "unimm.cli", "build", str(recipe)]
    # subprocess_env: no rank variables (and port) inherited from the distributed tests run in this process
    run = {"capture_output": True, "text": True, "timeout": TIMEOUT_SECONDS, "env": subprocess_env}
    result = subprocess.run(command, **run)
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((work / "build.json").read_text())
    assert {name: entry["status"] for name, entry in status.items()} == dict.fromkeys(status, "ran")
    assert "--nproc_per_node" in status["llm"]["command"]

    # Both data layouts became tables: pairs (both directions) and LLaVA conversations.
    kinds = json.loads((work / "prepared" / "prepare.json").read_text())["tables"]["train"]["rows_per_kind"]
    assert kinds["understanding"] > 0 and kinds["generation"] > 0
    llava = json.loads((work / "prepared_llava" / "prepare.json").read_text())["tables"]["train"][
        "rows_per_kind"
    ]
    assert llava.get("conversation", 0) > 0

    # The assembled checkpoint chats and draws; its eval report scores the held-out split with the judge.
    from unimm.pipelines import UniMMPipeline

    pipeline = UniMMPipeline.from_pretrained(work / "checkpoint")
    pipeline.set_progress_bar_config(disable=True)
    image = next((work / "data" / "test" / "images").iterdir())
    assert isinstance(pipeline.chat("What is this?", images=[image], max_new_tokens=4).texts[0], str)
    drawn = pipeline.generate_images(["a red circle", "a blue square"], seed=[0, 1], decoder="pixel")
    assert [image.size for image in drawn.images] == [(16, 16), (16, 16)]
    alone = pipeline.generate_images(["a red circle"], seed=[0], decoder="pixel")
    assert torch.equal(
        drawn.image_token_ids[0], alone.image_token_ids[0]
    )  # a batch row equals its prompt alone
    report = json.loads((work / "eval" / "report.json").read_text())["tasks"]
    assert report["prompt_following"]["metrics"]["judge_real_accuracy"] == 1.0  # the judge itself is right
    assert 0.0 <= report["understanding"]["metrics"]["f1"] <= 1.0
    assert report["reconstruction"]["metrics"]["pixel"]["num_images"] == 6

    # A rerun finds every step done.
    rerun = subprocess.run(command, **run)
    assert rerun.returncode == 0
    status = json.loads((work / "build.json").read_text())
    assert {entry["status"] for entry in status.values()} == {"done already"}
