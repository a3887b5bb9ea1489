import copy

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


def test_model_cpu_offload_gives_the_resident_images(
    make_decoder, make_reconstructing_decoder, make_tokenizer, make_pipeline, image_token_ids
):
    # Offloaded, the precomputed condition reached the hooked forward as an argument that accelerate rebuilt
    # from its items and failed; the condition and the pixel decoder copy are computed outside `forward`.
    for decoder in (make_decoder(), make_reconstructing_decoder(make_tokenizer())):
        resident = run(make_pipeline(decoder), image_token_ids)
        pipeline = make_pipeline(copy.deepcopy(decoder))
        pipeline.enable_model_cpu_offload(device="cpu")  # the CPU stands in for the accelerator here
        assert hasattr(pipeline.decoder, "_hf_hook")
        np.testing.assert_array_equal(run(pipeline, image_token_ids), resident)


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
    # Refining encodes the image with the autoencoder (its latents' mode, normalised) and noises that.
    calls, hook = record_forwards(pipeline)
    noise = torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=torch.Generator().manual_seed(1))
    refined = run(
        pipeline, image_token_ids, num_inference_steps=4, image=initial_images(), strength=0.5, latents=noise
    )
    hook.remove()
    assert refined.shape == images.shape and len(calls) == 2
    samples = pipeline.encode_samples(initial_images() * 2 - 1)
    expected_start = pipeline.scheduler.add_noise(samples, noise, pipeline.scheduler.timesteps[2:3])
    torch.testing.assert_close(calls[0][0][2:], expected_start)
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


def initial_images(batch_size=2, seed=3):
    """Images in [0, 1] as `output_type="pt"` returns them, (B, 3, H, W)."""
    return torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def record_forwards(pipeline):
    """Hook on the decoder: the (sample, timestep) of every forward, in order."""
    calls = []
    hook = pipeline.decoder.register_forward_hook(
        lambda module, args, output: calls.append((args[0].clone(), args[1].clone()))
    )
    return calls, hook


def test_refine_at_full_strength_is_the_plain_call(make_pipeline, image_token_ids):
    pipeline = make_pipeline(scheduler=DPMSolverMultistepScheduler(num_train_timesteps=100))
    plain = run(pipeline, image_token_ids)
    np.testing.assert_array_equal(run(pipeline, image_token_ids, image=initial_images(), strength=1.0), plain)


@pytest.mark.parametrize(
    "scheduler", [DDIMScheduler(num_train_timesteps=100, clip_sample=False), DPMSolverMultistepScheduler()]
)
def test_refine_noises_the_image_and_runs_the_last_strength_of_the_schedule(
    make_pipeline, image_token_ids, scheduler
):
    pipeline = make_pipeline(scheduler=scheduler)
    plain_before = run(pipeline, image_token_ids)
    noise = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    calls, hook = record_forwards(pipeline)
    refined = run(
        pipeline, image_token_ids, num_inference_steps=4, image=initial_images(), strength=0.5, latents=noise
    )
    hook.remove()
    scheduler.set_timesteps(4)
    assert [int(timestep[0]) for _, timestep in calls] == scheduler.timesteps[2:].tolist()
    if hasattr(scheduler, "set_begin_index"):  # sigma schedulers index add_noise by the begin step
        scheduler.set_begin_index(2)
    expected_start = scheduler.add_noise(initial_images() * 2 - 1, noise, scheduler.timesteps[2:3].repeat(2))
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, timestep: sample)
    torch.testing.assert_close(calls[0][0][2:], scale_input(expected_start, scheduler.timesteps[2]))
    assert refined.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(refined).all()
    # The refine call leaves no state behind in the scheduler (its begin index is reset).
    np.testing.assert_array_equal(run(pipeline, image_token_ids), plain_before)


def test_refine_with_a_flow_decoder(make_decoder, make_pipeline, image_token_ids):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100)
    pipeline = make_pipeline(make_decoder(prediction_type="flow"), scheduler=scheduler)
    noise = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    calls, hook = record_forwards(pipeline)
    run(pipeline, image_token_ids, num_inference_steps=4, image=initial_images(), strength=0.5, latents=noise)
    hook.remove()
    assert len(calls) == 2
    sigma = scheduler.sigmas[2]  # x_t = (1 - σ)·x0 + σ·noise at the third of four steps
    torch.testing.assert_close(calls[0][0][2:], (1 - sigma) * (initial_images() * 2 - 1) + sigma * noise)


def test_refine_batch_matches_single_images_and_takes_pil(make_pipeline, image_token_ids):
    pipeline = make_pipeline()
    images = run(pipeline, image_token_ids, seed=5, output_type="pil")  # refine the pipeline's own output

    def refine(ids, image, seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return pipeline(ids, 4, 2.0, generator=generators, output_type="np", image=image, strength=0.5).images

    batch = refine(image_token_ids, images, (10, 11))
    for index, seed in enumerate((10, 11)):
        single = refine(image_token_ids[index : index + 1], images[index], (seed,))
        np.testing.assert_allclose(batch[index], single[0], atol=1e-5)
    # PIL images and tensors in [0, 1] of the same pixels give the same images.
    as_tensor = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2) / 255
    np.testing.assert_allclose(refine(image_token_ids, as_tensor, (10, 11)), batch, atol=1e-5)
    # One image is used for every grid.
    np.testing.assert_array_equal(
        refine(image_token_ids, images[0], (10, 11)), refine(image_token_ids, [images[0]] * 2, (10, 11))
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": 0.0}, r"strength must be in \(0, 1\], got 0.0"),
        ({"strength": 1.5}, r"strength must be in \(0, 1\], got 1.5"),
        ({"strength": 0.5, "image": None}, r"strength=0.5 refines an initial image: pass `image` too"),
        ({"strength": 0.2}, r"strength=0.2 x num_inference_steps=3 leaves no denoising step"),
        ({"image": initial_images(3), "strength": 0.5}, r"image must hold 1 or 2 images .*got 3"),
        ({"image": initial_images()[:, :1], "strength": 0.5}, r"image must have 3 channels, got 1"),
    ],
)
def test_bad_refine_input(make_pipeline, image_token_ids, kwargs, message):
    kwargs = {"image": initial_images(), **kwargs}
    with pytest.raises(ValueError, match=message):
        run(make_pipeline(), image_token_ids, **kwargs)
