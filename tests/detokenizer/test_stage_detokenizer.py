"""The ``detokenizer`` training stage, with a tiny random tokenizer saved to disk (no trained one needed)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from unimm.detokenizer import DetokenizerPipeline
from unimm.training.stages.detokenizer import DetokenizerArguments, DetokenizerStage

IMAGE_SIZE, GRID = 16, 4
REPOSITORY = Path(__file__).resolve().parents[2]
TINY_DECODER = {
    "block_out_channels": [32, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "num_train_timesteps": 100,
    "num_sample_images": 2,
    "sample_inference_steps": 2,
}


def save_tiny_tokenizer(path: Path, image_size: int) -> str:
    from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer

    torch.manual_seed(0)
    teacher = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    teacher.update(intermediate_size=64, image_size=image_size, patch_size=4, num_channels=3)
    config = DualCodebookConfig(
        codebook_size=16,
        semantic_code_dim=8,
        pixel_code_dim=4,
        downsample_factor=4,
        image_size=image_size,
        hidden_channels=16,
        channel_multipliers=[1, 1, 1],
        norm_num_groups=4,
        semantic_hidden_size=32,
        teacher_config=teacher,
    )
    DualCodebookTokenizer(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), IMAGE_SIZE)


def synthetic_images(count: int, seed: int = 0) -> list[PIL.Image.Image]:
    """Blocky random colour images: learnable from the tokens, no dataset needed."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        blocks = rng.integers(0, 256, size=(GRID, GRID, 3), dtype=np.uint8)
        images.append(PIL.Image.fromarray(blocks.repeat(IMAGE_SIZE // GRID, 0).repeat(IMAGE_SIZE // GRID, 1)))
    return images


def make_stage(tokenizer_path, **overrides) -> DetokenizerStage:
    return DetokenizerStage(
        DetokenizerArguments(
            tokenizer_path=tokenizer_path,
            image_size=IMAGE_SIZE,
            **{"dataset": "fashion_mnist", **TINY_DECODER, **overrides},
        )
    )


def test_datasets_hold_the_tokenizer_ids(tokenizer_path):
    stage = make_stage(tokenizer_path)
    train_set, eval_set = stage.datasets_from_images(synthetic_images(6), synthetic_images(3, seed=1))
    assert len(train_set) == 6 and len(eval_set) == 3
    item = train_set[0]
    assert item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["image_token_ids"].shape == (
        GRID,
        GRID,
    )
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    # The tokenizer's normalisation is mean 0.5 / std 0.5: its inputs are these same [-1, 1] pixels.
    expected = stage.tokenizer.encode(item["pixel_values"][None])[0]
    torch.testing.assert_close(item["image_token_ids"], expected)
    stage.validate(stage.build_model(), train_set)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_objectives(tokenizer_path, prediction_type):
    stage = make_stage(tokenizer_path, prediction_type=prediction_type, snr_gamma=5.0)
    samples, noise = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    noisy, timesteps, target, weights = stage._noisy_inputs(samples, noise)
    if prediction_type == "flow":
        sigmas = (timesteps / 100).view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, (1 - sigmas) * samples + sigmas * noise)
        torch.testing.assert_close(target, noise - samples)
        assert torch.equal(weights, torch.ones(64))
        return
    alphas = stage.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, alphas.sqrt() * samples + (1 - alphas).sqrt() * noise)
    if prediction_type == "epsilon":
        torch.testing.assert_close(target, noise)
    else:
        torch.testing.assert_close(target, alphas.sqrt() * noise - (1 - alphas).sqrt() * samples)
    snr = alphas.flatten() / (1 - alphas.flatten())
    denominator = snr if prediction_type == "epsilon" else snr + 1
    torch.testing.assert_close(weights, snr.clamp(max=5.0) / denominator)


def test_bad_arguments(tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="dataset.format: unknown format 'cifar'"):
        DetokenizerArguments(tokenizer_path=tokenizer_path, dataset={"format": "cifar", "path": "data"})
    with pytest.raises(ValueError, match=r"condition_dropout must be in \[0, 1\)"):
        DetokenizerArguments(tokenizer_path=tokenizer_path, dataset="fashion_mnist", condition_dropout=1.5)
    with pytest.raises(ValueError, match="not a saved tokenizer folder"):
        DetokenizerStage(DetokenizerArguments(tokenizer_path=str(tmp_path), dataset="fashion_mnist"))

    for weight in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="teacher_feature_weight must be finite and >= 0"):
            DetokenizerArguments(
                tokenizer_path=tokenizer_path, dataset="fashion_mnist", teacher_feature_weight=weight
            )
    with pytest.raises(ValueError, match="needs pixel-space training"):
        DetokenizerArguments(
            tokenizer_path=tokenizer_path, dataset="fashion_mnist", teacher_feature_weight=1.0, vae_path="vae"
        )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_predicted_clean_inverts_the_objective(tokenizer_path, prediction_type):
    """The exact target fed back as the prediction gives back the clean samples (α_t² as the signal share)."""
    stage = make_stage(tokenizer_path, prediction_type=prediction_type)
    samples, noise = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)
    noisy, timesteps, target, _ = stage._noisy_inputs(samples, noise)
    if prediction_type != "flow":  # ε-prediction divides by α_t: keep t away from pure noise
        timesteps = timesteps.clamp(max=90)
        noisy = stage.noise_scheduler.add_noise(samples, noise, timesteps)
        target = (
            noise
            if prediction_type == "epsilon"
            else stage.noise_scheduler.get_velocity(samples, noise, timesteps)
        )
    clean, signal = stage.predicted_clean(noisy, timesteps, target)
    torch.testing.assert_close(clean, samples, atol=1e-4, rtol=1e-4)
    assert signal.shape == (16,) and ((signal >= 0) & (signal <= 1)).all()


def _loss_and_model(tokenizer_path, weight):
    stage = make_stage(tokenizer_path, teacher_feature_weight=weight)
    train_set, _ = stage.datasets_from_images(synthetic_images(4), None)
    batch = torch.utils.data.default_collate([train_set[index] for index in range(4)])
    torch.manual_seed(0)
    model = stage.build_model().train()
    torch.manual_seed(1)
    loss, metrics = stage.compute_loss(model, batch, -1)
    return stage, model, loss, metrics


def test_teacher_feature_loss_is_off_at_weight_zero_and_additive(tokenizer_path):
    _, _, base_loss, base_metrics = _loss_and_model(tokenizer_path, 0.0)
    assert set(base_metrics) == {"mse", "dropped_fraction"}
    assert all(isinstance(value, torch.Tensor) for value in base_metrics.values())  # no host sync per step
    _, _, loss, metrics = _loss_and_model(tokenizer_path, 0.5)
    assert set(metrics) == {"mse", "dropped_fraction", "teacher_feature_loss"}
    assert metrics["mse"] == base_metrics["mse"]  # the same draws, the same diffusion term
    torch.testing.assert_close(loss.detach(), base_loss.detach() + 0.5 * metrics["teacher_feature_loss"])


def test_teacher_feature_loss_trains_the_decoder_not_the_tokenizer(tokenizer_path):
    stage, model, loss, metrics = _loss_and_model(tokenizer_path, 1.0)
    assert torch.isfinite(loss) and 0 < metrics["teacher_feature_loss"] <= 2
    loss.backward()
    gradients = [param.grad for param in model.parameters() if param.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in gradients)
    assert any(grad.abs().sum() > 0 for grad in gradients)
    assert all(param.grad is None and not param.requires_grad for param in stage.tokenizer.parameters())


@pytest.mark.integration
def test_training_steps_ema_samples_and_export(tokenizer_path, tmp_path):
    """A plain-PyTorch driver over the stage's methods: the loss falls, EMA and export work."""
    stage = make_stage(tokenizer_path, condition_dropout=0.2, ema_decay=0.9)
    train_set, eval_set = stage.datasets_from_images(synthetic_images(16), synthetic_images(4, seed=1))
    model = stage.build_model().train()
    optimizer = torch.optim.AdamW(stage.parameter_groups(model), lr=2e-3)
    batch = torch.utils.data.default_collate([train_set[index] for index in range(16)])
    losses = []
    for step in range(40):
        torch.manual_seed(step % 4)  # the same 4 noise draws over and over: the loss must fall
        loss, metrics = stage.compute_loss(model, batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    assert set(metrics) == {"mse", "dropped_fraction"}
    # The EMA lags the trained weights (the first parameter is the learned null condition).
    assert not any(
        torch.equal(shadow, param) for shadow, param in zip(stage.ema.shadow_params, model.parameters())
    )

    eval_metrics = stage.evaluate(model.eval(), torch.utils.data.DataLoader(eval_set, batch_size=2))
    assert np.isfinite(eval_metrics["loss"]) and eval_metrics["dropped_fraction"] == 0.0

    (grid_path,) = stage.write_samples(model, 40, tmp_path / "samples")
    assert PIL.Image.open(grid_path).size == (3 * IMAGE_SIZE, 2 * IMAGE_SIZE)  # 2 images × 3 columns

    # Checkpoint state → a fresh stage → export: the exported decoder holds the EMA weights.
    state = stage.state_dict()
    restored = make_stage(tokenizer_path, condition_dropout=0.2, ema_decay=0.9)
    restored.load_state_dict(state)
    restored.export(model, tmp_path / "export")
    pipeline = DetokenizerPipeline.from_pretrained(tmp_path / "export")
    exported = dict(pipeline.decoder.named_parameters())
    stage.ema.step(model.parameters())
    for (name, _), shadow in zip(model.named_parameters(), stage.ema.shadow_params):
        torch.testing.assert_close(exported[name], shadow, msg=name)
    images = pipeline(batch["image_token_ids"][:2], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert (
        json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "DPMSolverMultistepScheduler"
    )


@pytest.mark.integration
def test_tiny_recipe_through_the_training_loop(tmp_path):
    """recipes/detokenizer/tiny.yaml on 64 Fashion-MNIST images with the DeepSpeed loop, then its export."""
    from unimm.training.arguments import load_recipe
    from unimm.training.loop import train

    tokenizer = save_tiny_tokenizer(tmp_path / "tokenizer", 32)
    overrides = [f"tokenizer_path={tokenizer}", f"output_dir={tmp_path / 'run'}"]
    result = train(load_recipe(REPOSITORY / "recipes" / "detokenizer" / "tiny.yaml", overrides))
    assert result.global_step == 6 and np.isfinite(result.last_loss)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record["split"] == "train"] == [2, 4, 6]
    assert any(record["split"] == "eval" and record["dropped_fraction"] == 0.0 for record in records)
    assert list((tmp_path / "run" / "samples").rglob("*.png"))
    pipeline = DetokenizerPipeline.from_pretrained(result.export_dir)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(torch.zeros(1, 8, 8, dtype=torch.long), num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_latent_space_stage(tokenizer_path, tmp_path):
    """With `vae_path` the stage trains on the frozen autoencoder's latents and exports it with the decoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    vae.save_pretrained(tmp_path / "vae")
    stage = make_stage(tokenizer_path, vae_path=str(tmp_path / "vae"))
    train_set, _ = stage.datasets_from_images(synthetic_images(4), None)
    model = stage.build_model().train()
    assert model.config.sample_channels == 4
    batch = torch.utils.data.default_collate([train_set[index] for index in range(4)])
    samples = stage.to_samples(batch["pixel_values"])
    assert samples.shape == (4, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    loss, _ = stage.compute_loss(model, batch, step=0)
    loss.backward()
    assert torch.isfinite(loss)
    stage.export(model, tmp_path / "export")
    pipeline = DetokenizerPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipeline.vae, AutoencoderKL)
    images = pipeline(batch["image_token_ids"][:1], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_condition_on_reconstruction_copies_the_frozen_pixel_decoder(tokenizer_path):
    stage = make_stage(tokenizer_path, condition_on_reconstruction=True)
    train_set, _ = stage.datasets_from_images(synthetic_images(4), None)
    batch = torch.utils.data.default_collate([train_set[index] for index in range(4)])
    model = stage.build_model().train()
    ids = batch["image_token_ids"]
    torch.testing.assert_close(model.reconstruct(ids), stage.tokenizer.decode(ids))  # mean/std 0.5: [-1, 1]
    loss, _ = stage.compute_loss(model, batch, -1)
    loss.backward()
    copied = [param for name, param in model.named_parameters() if name.startswith("reconstruction_decoder.")]
    assert copied and all(param.grad is None for param in copied)
    assert torch.isfinite(loss) and model.unet.conv_in.weight.grad is not None


def make_image_folder(folder: Path, count: int) -> Path:
    """A user's captioned image folder: RGB, RGBA and greyscale images of sizes other than the training size."""
    modes = ("RGB", "RGBA", "L")
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    records = []
    for index in range(count):
        size = (10 + 5 * index, 40 - 3 * index)
        pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        PIL.Image.fromarray(pixels, "RGBA").convert(modes[index % len(modes)]).save(folder / f"{index}.png")
        records.append({"file_name": f"{index}.png", "text": f"picture {index}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def test_stage_trains_on_a_user_image_folder(tokenizer_path, tmp_path):
    """A folder spec without an eval split: images fitted to 16 px RGB, one held out, a few steps train."""
    folder = make_image_folder(tmp_path / "pictures", count=6)
    PIL.Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(folder / "transparent.png")
    with (folder / "metadata.jsonl").open("a") as file:
        file.write(json.dumps({"file_name": "transparent.png", "text": "nothing"}) + "\n")
    stage = make_stage(tokenizer_path, dataset=str(folder), dataset_cache_dir=str(tmp_path / "cache"))
    train_set, eval_set = stage.build_datasets()
    assert (len(train_set), len(eval_set)) == (6, 1)  # 5% of 7 rows, at least one, held out
    pixels = torch.cat([train_set.images, eval_set.images])  # (7, 3, 16, 16) uint8
    assert pixels.shape == (7, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (pixels == 255).flatten(1).all(dim=1).sum() == 1  # the transparent image: alpha over white
    model = stage.build_model().train()
    stage.validate(model, train_set)
    optimizer = torch.optim.AdamW(stage.parameter_groups(model), lr=1e-3)
    batch = torch.utils.data.default_collate([train_set[index] for index in range(len(train_set))])
    for step in range(3):
        loss, _ = stage.compute_loss(model, batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)


def test_recipe_takes_the_dataset_as_a_mapping(tokenizer_path, tmp_path):
    from unimm.training.arguments import parse_recipe

    mapping = {"path": str(tmp_path), "eval_path": str(tmp_path / "held_out")}
    recipe = parse_recipe({"stage": "detokenizer", "tokenizer_path": tokenizer_path, "dataset": mapping})
    assert recipe.stage_args.dataset == mapping
    with pytest.raises(ValueError, match="streaming: this stage reads its images by index"):
        DetokenizerArguments(tokenizer_path=tokenizer_path, dataset={"path": "x", "streaming": True})


@pytest.mark.integration
def test_tiny_recipe_runs_on_an_image_folder(tmp_path):
    """recipes/detokenizer/tiny.yaml with `dataset` overridden by a folder, through the shared loop."""
    from unimm.training.arguments import load_recipe
    from unimm.training.loop import train

    tokenizer = save_tiny_tokenizer(tmp_path / "tokenizer", 32)
    folder = make_image_folder(tmp_path / "pictures", count=10)
    overrides = [
        f"tokenizer_path={tokenizer}",
        f"output_dir={tmp_path / 'run'}",
        f"dataset={{path: {folder}, eval_fraction: 0.2}}",
        f"dataset_cache_dir={tmp_path / 'cache'}",
        "max_steps=2",
        "save_steps=2",
        "sample_steps=2",
    ]
    result = train(load_recipe(REPOSITORY / "recipes" / "detokenizer" / "tiny.yaml", overrides))
    assert result.global_step == 2 and np.isfinite(result.last_loss)
    assert list((tmp_path / "run" / "samples").rglob("*.png"))
