import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from unimm.detokenizer import DetokenizerPipeline

CODEBOOK_SIZE, GRID, IMAGE_SIZE = 16, 4, 16


def run(pipeline, ids, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np", **kwargs}
    return pipeline(ids, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_output_types_and_golden_slice(make_pipeline, image_token_ids):
    pipeline = make_pipeline()
    images = run(pipeline, image_token_ids)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.min() >= 0 and images.max() <= 1
    latents = run(pipeline, image_token_ids, output_type="latent")  # raw samples, before clipping to [0, 1]
    expected = torch.tensor([-1.3283, -1.4358, -0.2846, -0.2911, 1.6208, 1.5471])
    torch.testing.assert_close(latents[0, 0, 0, :6], expected, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(images, (latents.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1), atol=1e-6)
    tensors = run(pipeline, image_token_ids, output_type="pt")
    assert tensors.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(tensors.permute(0, 2, 3, 1).numpy(), images, atol=1e-6)
    pils = run(pipeline, image_token_ids[0], output_type="pil")  # a single (h, w) grid
    assert (
        len(pils) == 1 and isinstance(pils[0], PIL.Image.Image) and pils[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    )


def test_save_load_round_trip_gives_identical_images(make_pipeline, image_token_ids, tmp_path):
    pipeline = make_pipeline()
    pipeline.save_pretrained(tmp_path)
    assert {"model_index.json", "decoder", "scheduler"} <= {path.name for path in tmp_path.iterdir()}
    loaded = DetokenizerPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded, image_token_ids), run(pipeline, image_token_ids))


@pytest.mark.parametrize(
    "scheduler_class", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler]
)
def test_scheduler_swap(make_pipeline, image_token_ids, scheduler_class):
    pipeline = make_pipeline()
    reference = run(pipeline, image_token_ids)
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    images = run(pipeline, image_token_ids)
    assert images.shape == reference.shape and np.isfinite(images).all()
    if scheduler_class is not DDIMScheduler:
        assert not np.allclose(images, reference)


def test_flow_decoder_needs_flow_scheduler(make_decoder, make_pipeline, image_token_ids):
    decoder = make_decoder(prediction_type="flow")
    pipeline = make_pipeline(decoder, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=100))
    assert run(pipeline, image_token_ids).shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    with pytest.raises(
        ValueError, match="FlowMatchEulerDiscreteScheduler exactly for prediction_type 'flow'"
    ):
        run(make_pipeline(decoder), image_token_ids)
    with pytest.raises(
        ValueError, match="prediction_type is 'v_prediction' but the decoder was trained for 'epsilon'"
    ):
        run(
            make_pipeline(scheduler=DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction")),
            image_token_ids,
        )


def test_guidance_is_one_batched_forward_with_the_cfg_formula(make_pipeline, image_token_ids):
    """One step by hand: uncond + s·(cond − uncond), then the scheduler step, equals the pipeline."""
    pipeline, scale = make_pipeline(), 3.0
    calls = []
    hook = pipeline.decoder.register_forward_hook(
        lambda module, args, kwargs_out: calls.append(args[0].shape[0])
    )
    latents = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    guided = pipeline(image_token_ids, 1, scale, latents=latents, output_type="latent").images
    assert calls == [4]  # conditional and null rows of the batch of 2 in one forward
    pipeline(image_token_ids, 1, 1.0, latents=latents, output_type="latent")
    assert calls == [4, 2]  # guidance 1.0: conditional rows only
    hook.remove()

    scheduler = pipeline.scheduler
    scheduler.set_timesteps(1)
    timestep = scheduler.timesteps[0]
    with torch.no_grad():
        conditional = pipeline.decoder(latents, timestep, image_token_ids=image_token_ids).sample
        unconditional = pipeline.decoder(
            latents, timestep, image_token_ids=image_token_ids, drop_condition=torch.tensor([True, True])
        ).sample
    expected = scheduler.step(
        unconditional + scale * (conditional - unconditional), timestep, latents
    ).prev_sample
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-4)


def test_batch_matches_single_images_with_per_image_generators(make_pipeline, image_token_ids):
    pipeline = make_pipeline()
    generators = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = pipeline(image_token_ids, 3, 2.0, generator=generators, output_type="np").images
    for index, seed in enumerate((10, 11)):
        single = pipeline(
            image_token_ids[index : index + 1],
            3,
            2.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        np.testing.assert_allclose(batch[index], single[0], atol=1e-5)


@pytest.mark.parametrize(
    ("vae_class", "vae_kwargs"),
    [
        (
            AutoencoderKL,
            {
                "block_out_channels": (8, 8),
                "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2,
                "latent_channels": 4,
                "norm_num_groups": 4,
                "sample_size": IMAGE_SIZE,
            },
        ),
        (
            AutoencoderTiny,
            {
                "encoder_block_out_channels": (8, 8),
                "decoder_block_out_channels": (8, 8),
                "num_encoder_blocks": (1, 1),
                "num_decoder_blocks": (1, 1),
                "latent_channels": 4,
            },
        ),
    ],
)
def test_latent_space(make_decoder, make_pipeline, image_token_ids, vae_class, vae_kwargs, tmp_path):
    torch.manual_seed(0)
    vae = vae_class(**vae_kwargs).eval()
    decoder = make_decoder(sample_channels=4, sample_size=IMAGE_SIZE // 2)
    pipeline = make_pipeline(decoder, vae=vae)
    latents = run(pipeline, image_token_ids, output_type="latent")
    assert latents.shape == (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)  # the autoencoder halves the side
    images = run(pipeline, image_token_ids)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    pipeline.save_pretrained(tmp_path)
    assert (tmp_path / "vae").is_dir()
    loaded = DetokenizerPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.vae, vae_class)
    np.testing.assert_array_equal(run(loaded, image_token_ids), images)
    with pytest.raises(ValueError, match="4 latent channels but the decoder denoises 3"):
        run(make_pipeline(make_decoder(), vae=vae), image_token_ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": torch.full((1, GRID, GRID), CODEBOOK_SIZE)}, r"must lie in \[0, 15\] \(codebook_size 16\)"),
        ({"ids": torch.zeros(1, 1, GRID, GRID, dtype=torch.long)}, r"shape \(B, h, w\)"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1, got 0"),
        ({"guidance_scale": -1.0}, r"guidance_scale must be >= 0 .*got -1.0"),
        ({"output_type": "jpeg"}, r"output_type must be one of \('pil', 'np', 'pt', 'latent'\)"),
    ],
)
def test_bad_input(make_pipeline, image_token_ids, kwargs, message):
    ids = kwargs.pop("ids", image_token_ids)
    with pytest.raises(ValueError, match=message):
        run(make_pipeline(), ids, **kwargs)
