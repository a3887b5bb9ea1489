"""DetokenizerPipeline: image token ids → images with a `TokenDiffusionDecoder` and any diffusers scheduler.

Given initial images (e.g. the tokenizer's pixel decoder output for the same tokens) and a `strength`, it
refines them as diffusers' img2img pipelines do: noise them to the `strength` point of the schedule and
denoise from there with the token conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .modeling_token_diffusion import TokenDiffusionDecoder

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class DetokenizerPipelineOutput(BaseOutput):
    """Output of [`DetokenizerPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` (B, H, W, C) in [0, 1] or `torch.Tensor` (B, C, H, W)
            in [0, 1]; the raw samples for `output_type="latent"`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def autoencoder_downsample_factor(vae: AutoencoderKL | AutoencoderTiny | None) -> int:
    """Image pixels per latent cell along each side (1 without an autoencoder: pixel space)."""
    if vae is None:
        return 1
    if isinstance(vae, AutoencoderTiny):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def autoencoder_scale_and_shift(vae: AutoencoderKL | AutoencoderTiny) -> tuple[float, float]:
    """The autoencoder's latent normalisation `z = (latent - shift) * scale`."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


class DetokenizerPipeline(DiffusionPipeline):
    r"""Decode grids of image token ids into images by diffusion.

    Components:
        decoder ([`TokenDiffusionDecoder`]): the token-conditioned denoiser (with
            `condition_on_reconstruction`, it computes the tokenizer pixel decoder's image of the ids itself,
            once per call in `embed_condition`, from its frozen copy of that decoder).
        scheduler ([`SchedulerMixin`]): any diffusers scheduler matching `decoder.config.prediction_type`
            (DDIM, DDPM, DPMSolverMultistep, Euler, ... for `epsilon`/`v_prediction`;
            `FlowMatchEulerDiscreteScheduler` for `flow`).
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`], *optional*): present when the decoder works in the
            autoencoder's latent space; absent in pixel space.
    """

    model_cpu_offload_seq = "decoder->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        decoder: TokenDiffusionDecoder,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | AutoencoderTiny | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(decoder=decoder, scheduler=scheduler, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=autoencoder_downsample_factor(vae))

    def check_inputs(
        self,
        image_token_ids: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        image: PipelineImageInput | None = None,
        strength: float = 1.0,
    ) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if strength < 1 and image is None:
            raise ValueError(f"strength={strength} refines an initial image: pass `image` too")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"strength={strength} x num_inference_steps={num_inference_steps} leaves no denoising step; "
                "raise either"
            )
        if guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be >= 0 (1.0 = no guidance, > 1 = stronger condition), got {guidance_scale}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        self.decoder.check_image_token_ids(image_token_ids)
        flow_scheduler = isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)
        prediction_type = self.decoder.config.prediction_type
        if flow_scheduler != (prediction_type == "flow"):
            raise ValueError(
                f"the decoder predicts {prediction_type!r} but the scheduler is {type(self.scheduler).__name__}; "
                "use FlowMatchEulerDiscreteScheduler exactly for prediction_type 'flow'"
            )
        if (
            not flow_scheduler
            and self.scheduler.config.get("prediction_type", prediction_type) != prediction_type
        ):
            raise ValueError(
                f"scheduler.config.prediction_type is {self.scheduler.config.prediction_type!r} but the decoder "
                f"was trained for {prediction_type!r}"
            )
        if self.vae is not None and self.vae.config.latent_channels != self.decoder.config.sample_channels:
            raise ValueError(
                f"the autoencoder has {self.vae.config.latent_channels} latent channels but the decoder denoises "
                f"{self.decoder.config.sample_channels} channels"
            )

    def sample_shape(self, image_token_ids: torch.Tensor) -> tuple[int, int, int, int]:
        """Shape of the denoised sample (pixels or latents) for a `(B, h, w)` grid of token ids."""
        batch_size, grid_height, grid_width = image_token_ids.shape
        pixels_per_cell = self.decoder.config.downsample_factor // autoencoder_downsample_factor(self.vae)
        if pixels_per_cell < 1:
            raise ValueError(
                "the autoencoder downsamples more than the tokenizer: latents would be below the grid"
            )
        channels = self.decoder.config.sample_channels
        return (batch_size, channels, grid_height * pixels_per_cell, grid_width * pixels_per_cell)

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """The last `strength` of the schedule set by `scheduler.set_timesteps` and its number of steps
        (diffusers' img2img `get_timesteps`)."""
        init_steps = min(int(num_inference_steps * strength), num_inference_steps)
        start = max(num_inference_steps - init_steps, 0)
        timesteps = self.scheduler.timesteps[start * self.scheduler.order :]
        # Multistep schedulers (DPM-Solver, Euler, ...) index sigmas by step: start them at `start`.
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return timesteps, num_inference_steps - start

    def prepare_image(
        self, image: PipelineImageInput, shape: tuple[int, int, int, int], device: torch.device
    ) -> torch.Tensor:
        """Initial images → (B, C, H, W) pixels in [-1, 1] at the token grid's size (one image is repeated)."""
        batch_size, _, height, width = shape
        factor = autoencoder_downsample_factor(self.vae)
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list) and isinstance(image[0], PIL.Image.Image):
            image = [picture.convert("RGB") for picture in image]  # grayscale PIL would give one channel
        pixels = self.image_processor.preprocess(image, height=height * factor, width=width * factor)
        channels = (
            self.vae.config.in_channels if self.vae is not None else self.decoder.config.sample_channels
        )
        if pixels.shape[1] != channels:
            raise ValueError(f"image must have {channels} channels, got {pixels.shape[1]}")
        if pixels.shape[0] == 1:
            pixels = pixels.expand(batch_size, -1, -1, -1)
        elif pixels.shape[0] != batch_size:
            raise ValueError(
                f"image must hold 1 or {batch_size} images (one per token grid), got {pixels.shape[0]}"
            )
        return pixels.to(device)

    def encode_samples(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → clean samples (normalised autoencoder latents in latent space)."""
        if self.vae is None:
            return pixels
        scale, shift = autoencoder_scale_and_shift(self.vae)
        # The distribution's mode, not a sample: the noise comes from `generator` alone.
        latents = retrieve_latents(self.vae.encode(pixels.to(self.vae.dtype)), sample_mode="argmax")
        return (latents - shift) * scale

    def decode_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Denoised samples → images in [-1, 1] (through the autoencoder in latent space)."""
        if self.vae is None:
            return samples
        scale, shift = autoencoder_scale_and_shift(self.vae)
        return self.vae.decode((samples / scale + shift).to(self.vae.dtype)).sample

    @torch.no_grad()
    def __call__(
        self,
        image_token_ids: torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        image: PipelineImageInput | None = None,
        strength: float = 1.0,
    ) -> DetokenizerPipelineOutput | tuple:
        """Decode `image_token_ids` (B, h, w) (or one (h, w) grid) into B images of `h·f × w·f` pixels.

        Args:
            num_inference_steps: denoising steps (>= 1).
            guidance_scale: classifier-free guidance `uncond + s·(cond − uncond)`; 1.0 disables it (one
                forward per step), otherwise conditional and null rows go through one batched forward.
            generator: seeds the initial noise (one per image for per-image reproducibility).
            latents: initial noise to start from instead of drawing it (with `image`: the noise added to it).
            output_type: `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or `"latent"` (raw samples).
            image: initial images to refine (img2img), one or one per grid: PIL, or arrays/tensors in
                [0, 1] as `output_type="np"`/`"pt"` return; resized to the token grid's size.
            strength: in (0, 1]; with `image`, the fraction of the schedule run: the image is noised to
                the timestep `int(num_inference_steps * strength)` steps before the end and denoised from
                there. 1.0 starts from pure noise and ignores the image (as diffusers' inpainting does at
                full strength), so it gives exactly the plain call's images.
        """
        # 1. Check inputs; a single grid becomes a batch of one.
        if isinstance(image_token_ids, torch.Tensor) and image_token_ids.ndim == 2:
            image_token_ids = image_token_ids[None]
        self.check_inputs(image_token_ids, num_inference_steps, guidance_scale, output_type, image, strength)
        device = self._execution_device
        dtype = self.decoder.dtype
        image_token_ids = image_token_ids.to(device)
        batch_size = image_token_ids.shape[0]
        do_guidance = guidance_scale != 1.0

        # 2. Conditioning, computed once: null rows first, then conditional rows, in one batch.
        if do_guidance:
            drop_condition = torch.arange(2 * batch_size, device=device) < batch_size
            condition = self.decoder.embed_condition(image_token_ids.repeat(2, 1, 1), drop_condition)
        else:
            condition = self.decoder.embed_condition(image_token_ids)

        # 3. Timesteps: all of them, or the last `strength` of them when refining an image.
        shape = self.sample_shape(image_token_ids)
        pixels = None if image is None else self.prepare_image(image, shape, device)
        refine = pixels is not None and strength < 1
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if refine:
            timesteps, _ = self.get_timesteps(num_inference_steps, strength)

        # 4. Initial noise (drawn the same way with or without an image), added to the image's samples.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} for these token ids, got {tuple(latents.shape)}"
            )
        latents = latents.to(device=device, dtype=dtype)
        if refine:
            samples = self.encode_samples(pixels).to(dtype)
            start = timesteps[:1].repeat(batch_size)
            if hasattr(self.scheduler, "add_noise"):
                latents = self.scheduler.add_noise(samples, latents, start)
            else:  # flow matching: x_t = (1 - t)·x0 + t·noise
                latents = self.scheduler.scale_noise(samples, start, latents)
        else:
            latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

        # 5. Denoising loop.
        for timestep in self.progress_bar(timesteps):
            model_input = torch.cat([latents, latents]) if do_guidance else latents  # (2B or B, C, H, W)
            if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
                model_input = self.scheduler.scale_model_input(model_input, timestep)
            prediction = self.decoder(
                model_input, timestep.expand(model_input.shape[0]), condition=condition
            ).sample
            if do_guidance:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, timestep, latents, generator=generator).prev_sample

        # 6. Decode (autoencoder in latent space) and convert to the requested type.
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_samples(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DetokenizerPipelineOutput(images=images)
