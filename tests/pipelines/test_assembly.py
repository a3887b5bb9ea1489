"""`unimm assemble`: one checkpoint folder from parts saved (and trained) on their own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unimm.cli import main as unimm_main
from unimm.llm import ModalitySampling
from unimm.llm.sampling import default_image_sampling
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.assembly import assemble_pipeline
from unimm.pipelines.testing import build_random_pipeline
from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipeline's components as the stages write them: the LLM with its processor, the visual
    tokenizer, the detokenizer, each in its own folder."""
    root = tmp_path_factory.mktemp("parts")
    pipeline = build_random_pipeline("tiny", seed=0)
    pipeline.llm.save_pretrained(root / "llm")
    pipeline.processor.save_pretrained(root / "llm")
    pipeline.visual_tokenizer.save_pretrained(root / "tokenizer")
    pipeline.detokenizer.save_pretrained(root / "detokenizer")
    return {
        "root": root,
        "llm": root / "llm",
        "tokenizer": root / "tokenizer",
        "detokenizer": root / "detokenizer",
    }


def test_assemble_command_writes_a_checkpoint_that_behaves_like_the_parts(tiny_pipeline, parts, tmp_path):
    output = tmp_path / "checkpoint"
    argv = ["assemble", "--llm", str(parts["llm"]), "--visual-tokenizer", str(parts["tokenizer"])]
    argv += ["--detokenizer", str(parts["detokenizer"]), "--output", str(output), "--training-data", "shapes"]
    assert unimm_main(argv) == 0
    assert {path.name for path in output.iterdir()} >= {"model_index.json", "llm", "processor", "README.md"}
    assert "shapes" in (output / "README.md").read_text()
    loaded = UniMMPipeline.from_pretrained(output)
    loaded.set_progress_bar_config(disable=True)
    question = "what is this?"
    assert (
        loaded.chat(question, max_new_tokens=6).texts == tiny_pipeline.chat(question, max_new_tokens=6).texts
    )
    drawn = loaded.generate_images("a cat", seed=0, decoder="pixel").image_token_ids[0]
    assert torch.equal(
        drawn, tiny_pipeline.generate_images("a cat", seed=0, decoder="pixel").image_token_ids[0]
    )
    # Assembling again replaces the earlier checkpoint; the LLM can be stored in another dtype.
    assemble_pipeline(parts["llm"], parts["tokenizer"], output, dtype=torch.bfloat16)
    assert UniMMPipeline.from_pretrained(output, dtype=None).llm.dtype == torch.bfloat16
    assert not (output / "detokenizer").exists()


def test_assemble_gives_the_checkpoint_its_own_image_sampling(parts, tmp_path):
    """``--image-temperature/--image-top-k``: the checkpoint samples image codes so when a call names no
    sampling (the pipeline, the CLI, the server, the eval tasks), as if the call had named it."""
    output = tmp_path / "checkpoint"
    argv = ["assemble", "--llm", str(parts["llm"]), "--visual-tokenizer", str(parts["tokenizer"])]
    assert (
        unimm_main([*argv, "--output", str(output), "--image-temperature", "0.5", "--image-top-k", "4"]) == 0
    )
    loaded = UniMMPipeline.from_pretrained(output)
    loaded.set_progress_bar_config(disable=True)
    own = ModalitySampling(do_sample=True, temperature=0.5, top_k=4)
    assert default_image_sampling(loaded.llm.generation_config) == own
    options = dict(num_images_per_prompt=3, seed=0, decoder="pixel")
    drawn = loaded.generate_images("a cat", **options).image_token_ids
    assert torch.equal(drawn, loaded.generate_images("a cat", image_sampling=own, **options).image_token_ids)
    plain = loaded.generate_images("a cat", image_sampling=ModalitySampling(do_sample=True), **options)
    assert not torch.equal(drawn, plain.image_token_ids)
    # Without the options the checkpoint keeps the plain default.
    assert unimm_main([*argv, "--output", str(output)]) == 0
    plain_checkpoint = UniMMPipeline.from_pretrained(output).llm.generation_config
    assert default_image_sampling(plain_checkpoint) == ModalitySampling(do_sample=True)


def test_parts_that_do_not_fit_are_refused_with_the_reason(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no processor"):
        assemble_pipeline(parts["tokenizer"], parts["tokenizer"], tmp_path / "out")
    other = DualCodebookTokenizer(DualCodebookConfig.tiny(codebook_size=32))
    other.save_pretrained(tmp_path / "other_tokenizer")
    with pytest.raises(ValueError, match="different codebooks"):
        assemble_pipeline(parts["llm"], tmp_path / "other_tokenizer", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint folder"):
        assemble_pipeline(parts["llm"], parts["tokenizer"], tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    # The command reports the same errors as one line and exit status 1.
    argv = ["assemble", "--llm", str(tmp_path / "missing"), "--visual-tokenizer", str(parts["tokenizer"])]
    assert unimm_main([*argv, "--output", str(tmp_path / "out")]) == 1
