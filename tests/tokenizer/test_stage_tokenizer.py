from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from unimm.tokenizer import DualCodebookTokenizer
from unimm.training.stages import get_stage_class
from unimm.training.stages.tokenizer import TokenizerStage, TokenizerStageArguments

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tokenizer"


@pytest.fixture
def stage() -> TokenizerStage:
    args = TokenizerStageArguments(
        tokenizer_config="tiny", dataset="synthetic", image_size=16, num_synthetic_samples=8
    )
    return TokenizerStage(args)


def test_stage_is_registered():
    assert get_stage_class("tokenizer") is TokenizerStage


def test_stage_builds_trains_evaluates_and_exports(stage, tmp_path):
    train_set, eval_set = stage.build_datasets()
    model = stage.build_model()
    batch = stage.collate([train_set[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    loss, logged = stage.compute_loss(model, batch, step=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert {"reconstruction_loss", "semantic_loss", "codebook_usage", "perplexity", "psnr"} <= set(logged)
    loader = torch.utils.data.DataLoader(eval_set, batch_size=4, collate_fn=stage.collate)
    results = stage.evaluate(model, loader)
    assert set(results) == {"psnr", "ssim", "codebook_usage", "perplexity"}
    assert model.training  # evaluate restores the mode
    (grid,) = stage.write_samples(model, step=3, output_dir=tmp_path)
    assert grid.name == "reconstructions-0000003.png"
    assert Image.open(grid).size == (8 * 16, 2 * 16)  # 8 columns; originals row + reconstructions row
    stage.export(model, tmp_path / "export")
    loaded = AutoModel.from_pretrained(tmp_path / "export").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "export")
    model.eval()
    pixel_values = processor(
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)), return_tensors="pt"
    ).pixel_values
    assert torch.equal(loaded.encode(pixel_values), model.encode(pixel_values))


def test_codebooks_get_no_weight_decay(stage):
    model = stage.build_model()
    groups = stage.parameter_groups(model)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert (
        id(model.quantizer.semantic_codebook) in no_decay and id(model.quantizer.pixel_codebook) in no_decay
    )
    assert groups[1]["weight_decay"] == 0.0
    assert all(p.requires_grad for group in groups for p in group["params"])


def test_bad_stage_arguments():
    with pytest.raises(ValueError, match="dataset='cifar'"):
        TokenizerStageArguments(dataset="cifar")
    with pytest.raises(ValueError, match="unknown tokenizer config"):
        TokenizerStage(TokenizerStageArguments(tokenizer_config="huge", dataset="synthetic"))


def test_missing_teacher_folder_names_the_fix(tmp_path):
    args = TokenizerStageArguments(
        tokenizer_config="tiny",
        dataset="synthetic",
        image_size=16,
        teacher_name_or_path=str(tmp_path / "absent"),
    )
    with pytest.raises(OSError, match="pretrain_teacher_epochs"):
        TokenizerStage(args).build_model()


@pytest.mark.integration
def test_stage_pretrains_teacher_then_builds_tokenizer_on_it(tmp_path):
    args = TokenizerStageArguments(
        tokenizer_config="tiny",
        dataset="synthetic",
        image_size=16,
        num_synthetic_samples=64,
        teacher_name_or_path=str(tmp_path / "teacher"),
        pretrain_teacher_epochs=2.0,
    )
    stage = TokenizerStage(args)
    stage.build_datasets()
    model = stage.build_model()
    assert (tmp_path / "teacher" / "config.json").exists()
    teacher = AutoModel.from_pretrained(tmp_path / "teacher")
    torch.testing.assert_close(model.teacher.embeddings.cls_token, teacher.embeddings.cls_token)


@pytest.mark.integration
def test_plain_training_reduces_reconstruction_error(stage):
    stage.args.num_synthetic_samples = 32
    train_set, _ = stage.build_datasets()
    model = stage.build_model().train()
    optimizer = torch.optim.AdamW(stage.parameter_groups(model), lr=3e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True, collate_fn=stage.collate)
    history = []
    for step in range(40):
        batch = next(iter(loader))
        loss, logged = stage.compute_loss(model, batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(logged["reconstruction_loss"])
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5])


@pytest.mark.integration
def test_tiny_recipe_runs_in_the_shared_loop(tmp_path):
    from unimm.training.arguments import load_recipe
    from unimm.training.loop import train

    recipe = load_recipe(RECIPES / "tiny.yaml", overrides=[f"output_dir={tmp_path}"])
    result = train(recipe)
    assert result.global_step == 4 and np.isfinite(result.last_loss)
    assert result.export_dir is not None
    model = DualCodebookTokenizer.from_pretrained(result.export_dir)
    assert model.config.codebook_size == 16
    assert list(tmp_path.rglob("reconstructions-*.png"))
