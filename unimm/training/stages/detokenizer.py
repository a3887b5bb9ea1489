"""Training stage ``detokenizer``: a `TokenDiffusionDecoder` learns to turn a frozen tokenizer's ids into images.

Per batch: images → (once, when the datasets are built) ids from the frozen tokenizer; images → the
diffusion sample (pixels in [-1, 1], or latents of a frozen autoencoder); noise at a random timestep;
the decoder predicts noise (`epsilon`), velocity (`v_prediction`) or the rectified-flow velocity
(`flow`) with the condition dropped for a fraction of the rows (classifier-free guidance).
Min-SNR weighting for the DDPM objectives, logit-normal timestep sampling for flow. An EMA copy of the
weights (diffusers `EMAModel`) is what gets sampled and exported.
Optionally (`condition_on_reconstruction`), the decoder also sees the tokenizer pixel decoder's image of the
ids. Optionally (`teacher_feature_weight`), the frozen tokenizer's semantic teacher compares its features of the
predicted clean image with those of the real one (1 - cos per token-grid cell, weighted by α_t²).

The EMA is updated from `compute_loss` once per new training step (so it works with any loop and with
gradient accumulation; the update at step s folds in the optimizer step s-1, and `export` folds in the
last one). Under ZeRO-3, parameters are partitioned outside the forward: use ZeRO-0/2 for this stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoModel,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr
from diffusers.utils import make_image_grid
from torch import nn
from tqdm.auto import tqdm

from unimm.data.schema import open_image
from unimm.data.spec import load_image_splits, parse_dataset_spec, resolve_spec_paths
from unimm.detokenizer import DetokenizerPipeline, TokenDiffusionDecoder
from unimm.detokenizer.pipeline_detokenizer import autoencoder_scale_and_shift
from unimm.tokenizer import DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.stages.base import TrainingStage

logger = logging.getLogger(__name__)

IMAGE_MODES = {1: "L", 3: "RGB"}  # PIL mode of a tokenizer's num_channels
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class DetokenizerArguments:
    """Recipe fields of the ``detokenizer`` stage."""

    tokenizer_path: str = field(metadata={"help": "folder of a trained DualCodebookTokenizer (kept frozen)"})
    dataset: str | dict[str, Any] = field(
        metadata={"help": "a dataset spec: a demo name, a path or a mapping (see recipes/README.md)"},
    )
    image_size: int = field(
        default=32, metadata={"help": "training image side in pixels (images of any size are resized)"}
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "the `datasets` cache (demo datasets: ~/.cache/unimm/datasets)"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use only the first N training images"}
    )
    max_eval_samples: int | None = field(
        default=1000, metadata={"help": "use only the first N held-out images"}
    )
    tokenize_batch_size: int = field(default=256, metadata={"help": "batch size of the one-off tokenization"})
    vae_path: str | None = field(
        default=None,
        metadata={"help": "frozen diffusers AutoencoderKL/AutoencoderTiny folder: train in its latent space"},
    )
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    )
    layers_per_block: int = 2
    norm_num_groups: int = 32
    attention_head_dim: int = 32
    cross_attention_dim: int = 128
    prediction_type: str = field(
        default="v_prediction", metadata={"help": "'epsilon', 'v_prediction' or 'flow'"}
    )
    condition_on_reconstruction: bool = field(
        default=False,
        metadata={
            "help": "also condition on the frozen tokenizer pixel decoder's image of the ids (the decoder "
            "keeps a copy of it), so the diffusion model only adds what that decoder misses"
        },
    )
    num_train_timesteps: int = 1000
    beta_schedule: str = field(
        default="squaredcos_cap_v2", metadata={"help": "DDPM beta schedule (not for flow)"}
    )
    snr_gamma: float | None = field(
        default=5.0, metadata={"help": "min-SNR-γ loss weighting (None: plain MSE)"}
    )
    timestep_sampling: str = field(
        default="logit_normal", metadata={"help": f"flow only: one of {TIMESTEP_SAMPLINGS}"}
    )
    condition_dropout: float = field(
        default=0.1, metadata={"help": "probability of the null condition per row"}
    )
    ema_decay: float = field(
        default=0.999, metadata={"help": "decay of the EMA weights that are sampled and exported"}
    )
    num_sample_images: int = field(default=8, metadata={"help": "held-out images in the PNG sample grids"})
    sample_inference_steps: int = field(default=20, metadata={"help": "denoising steps for sample grids"})
    sample_guidance_scale: float = field(
        default=1.5, metadata={"help": "guidance for sample grids and export"}
    )
    sample_seed: int = field(default=0, metadata={"help": "seed of the sample grids' noise"})
    teacher_feature_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of 1 - cos between the tokenizer teacher's features of the predicted clean image "
            "and of the real one, per token-grid cell (0: off; pixel space only)"
        },
    )

    def __post_init__(self) -> None:
        parse_dataset_spec(self.dataset, random_access=True)  # a malformed spec fails with the recipe
        # Paths resolve against the working directory and are kept absolute in the saved recipe.
        self.dataset = resolve_spec_paths(self.dataset, base_dir=None)
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}"
            )
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 or None, got {self.snr_gamma}")
        if not (math.isfinite(self.teacher_feature_weight) and self.teacher_feature_weight >= 0):
            raise ValueError(
                f"teacher_feature_weight must be finite and >= 0, got {self.teacher_feature_weight}"
            )
        if self.teacher_feature_weight > 0 and self.vae_path is not None:
            raise ValueError("teacher_feature_weight > 0 needs pixel-space training (vae_path unset)")


class TokenImageDataset(torch.utils.data.Dataset):
    """Images (uint8, (N, C, H, W)) with their token ids (N, h, w), held in memory."""

    def __init__(self, images: torch.Tensor, image_token_ids: torch.Tensor) -> None:
        if images.shape[0] != image_token_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {image_token_ids.shape[0]} id grids")
        self.images = images
        self.image_token_ids = image_token_ids

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixel_values = self.images[index].float() / 127.5 - 1.0  # (C, H, W) in [-1, 1]
        return {"pixel_values": pixel_values, "image_token_ids": self.image_token_ids[index].long()}


def images_to_tensor(images: Sequence[Any], num_channels: int) -> torch.Tensor:
    """PIL images → uint8 tensor (N, C, H, W) with the tokenizer's channel count."""
    mode = IMAGE_MODES[num_channels]
    arrays = [
        np.asarray(image.convert(mode), dtype=np.uint8).reshape(image.height, image.width, num_channels)
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def fit_image(image: Any, processor: DualCodebookImageProcessor, size: int, mode: str) -> Any:
    """A decoded image of ``size`` × ``size`` pixels in PIL ``mode``: as it is when it already is one, else
    through the tokenizer's image processor (RGB with alpha over white, resized)."""
    image = open_image(image)  # EXIF orientation and high bit depths, as the loaders checked them
    if image.mode == mode and image.size == (size, size):
        return image
    pixel_values = processor(image, return_tensors="np").pixel_values  # (1, C, size, size)
    return processor.postprocess(pixel_values)[0].convert(mode)


def to_tokenizer_range(pixel_values: torch.Tensor, tokenizer: nn.Module) -> torch.Tensor:
    """Images in [-1, 1] → the tokenizer's normalisation (its image processor's mean/std)."""
    mean = torch.tensor(tokenizer.config.image_mean, device=pixel_values.device).view(1, -1, 1, 1)
    std = torch.tensor(tokenizer.config.image_std, device=pixel_values.device).view(1, -1, 1, 1)
    return ((pixel_values + 1) / 2 - mean.to(pixel_values.dtype)) / std.to(pixel_values.dtype)


def from_tokenizer_range(pixel_values: torch.Tensor, tokenizer: nn.Module) -> torch.Tensor:
    """The tokenizer's normalisation → images in [-1, 1]."""
    mean = torch.tensor(tokenizer.config.image_mean, device=pixel_values.device).view(1, -1, 1, 1)
    std = torch.tensor(tokenizer.config.image_std, device=pixel_values.device).view(1, -1, 1, 1)
    return (pixel_values * std.to(pixel_values.dtype) + mean.to(pixel_values.dtype)) * 2 - 1


@torch.no_grad()
def tokenize_images(
    tokenizer: nn.Module, images: torch.Tensor, batch_size: int, description: str
) -> torch.Tensor:
    """Token ids (N, h, w) of uint8 images (N, C, H, W) with a frozen tokenizer, batched, with a progress bar."""
    device = next(tokenizer.parameters()).device
    id_grids = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=description, unit="batch"):
        pixel_values = images[start : start + batch_size].to(device).float() / 127.5 - 1.0
        id_grids.append(tokenizer.encode(to_tokenizer_range(pixel_values, tokenizer)).to(torch.int32).cpu())
    return torch.cat(id_grids)


class DetokenizerStage(TrainingStage):
    """Trains a `TokenDiffusionDecoder` against a frozen trained tokenizer."""

    name = "detokenizer"
    arguments_class = DetokenizerArguments

    def __init__(self, stage_args: DetokenizerArguments) -> None:
        super().__init__(stage_args)
        self.tokenizer = self._load_tokenizer(stage_args.tokenizer_path)
        self.vae = (
            AutoModel.from_pretrained(stage_args.vae_path).eval().requires_grad_(False)
            if stage_args.vae_path
            else None
        )
        self.noise_scheduler = self.build_scheduler()
        self.ema: EMAModel | None = None
        self._ema_step = -1
        self._pending_ema_state: dict[str, Any] | None = None
        self._sample_batch: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _load_tokenizer(path: str) -> DualCodebookTokenizer:
        if not Path(path, "config.json").is_file():
            raise ValueError(
                f"tokenizer_path {path!r} is not a saved tokenizer folder (no config.json); train one first"
            )
        return DualCodebookTokenizer.from_pretrained(path).eval().requires_grad_(False)

    def build_scheduler(self) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
        """The training noise schedule (its config also seeds the exported inference scheduler)."""
        args = self.args
        if args.prediction_type == "flow":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=args.num_train_timesteps)
        return DDPMScheduler(
            num_train_timesteps=args.num_train_timesteps,
            beta_schedule=args.beta_schedule,
            prediction_type=args.prediction_type,
            timestep_spacing="trailing",  # few-step samplers start from pure noise
            clip_sample=False,
        )

    def build_model(self) -> TokenDiffusionDecoder:
        args = self.args
        if self.vae is not None:
            sample_channels = self.vae.config.latent_channels
        else:
            sample_channels = self.tokenizer.config.num_channels
        return TokenDiffusionDecoder.from_tokenizer(
            self.tokenizer,
            sample_channels=sample_channels,
            sample_size=args.image_size,
            block_out_channels=list(args.block_out_channels),
            down_block_types=list(args.down_block_types),
            up_block_types=list(args.up_block_types),
            layers_per_block=args.layers_per_block,
            norm_num_groups=args.norm_num_groups,
            attention_head_dim=args.attention_head_dim,
            cross_attention_dim=args.cross_attention_dim,
            prediction_type=args.prediction_type,
            condition_on_reconstruction=args.condition_on_reconstruction,
        )

    def _load_split_images(self) -> tuple[list[Any], list[Any]]:
        """The first image of each training and eval row of the dataset spec, fitted to ``image_size``
        (see ``load_image_splits`` for the eval split held out when the spec names none)."""
        args = self.args
        train, held_out = load_image_splits(
            args.dataset,
            image_size=args.image_size,
            cache_dir=args.dataset_cache_dir,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
        )
        size = {"height": args.image_size, "width": args.image_size}
        processor = DualCodebookImageProcessor.from_tokenizer_config(self.tokenizer.config, size=size)
        mode = IMAGE_MODES[self.tokenizer.config.num_channels]
        result = []
        for rows in (train, held_out):
            images = [_first_image(row) for row in rows] if rows is not None else []
            result.append([fit_image(image, processor, args.image_size, mode) for image in images])
        return result[0], result[1]

    def build_datasets(self) -> tuple[TokenImageDataset, TokenImageDataset | None]:
        """The dataset's images and their ids, tokenized once by the frozen tokenizer."""
        train_images, eval_images = self._load_split_images()
        return self.datasets_from_images(train_images, eval_images)

    def datasets_from_images(
        self, train_images: Sequence[Any], eval_images: Sequence[Any] | None
    ) -> tuple[TokenImageDataset, TokenImageDataset | None]:
        """Tokenize PIL images with the frozen tokenizer into `(train, eval)` datasets."""
        channels = self.tokenizer.config.num_channels
        datasets = []
        for name, images in (("train", train_images), ("eval", eval_images)):
            if not images:
                datasets.append(None)
                continue
            pixels = images_to_tensor(images, channels)
            ids = tokenize_images(
                self.tokenizer, pixels, self.args.tokenize_batch_size, f"tokenizing {name} images"
            )
            datasets.append(TokenImageDataset(pixels, ids))
            logger.info(
                "%s: %d images of %s px on a %s token grid",
                name,
                len(ids),
                tuple(pixels.shape[-2:]),
                tuple(ids.shape[-2:]),
            )
        if datasets[0] is None:
            raise ValueError("the detokenizer stage needs at least one training image")
        self.set_sample_batch(datasets[1] if datasets[1] is not None else datasets[0])
        return datasets[0], datasets[1]

    # ----- loss -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_samples(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → the diffusion sample (themselves, or scaled autoencoder latents)."""
        if self.vae is None:
            return pixel_values
        self.vae.to(pixel_values.device)
        scale, shift = autoencoder_scale_and_shift(self.vae)
        latents = retrieve_latents(self.vae.encode(pixel_values.to(self.vae.dtype)))
        return (latents - shift) * scale

    def _noisy_inputs(
        self, samples: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy samples, model timesteps, target, per-row loss weights) for the configured objective."""
        args, batch_size = self.args, samples.shape[0]
        if args.prediction_type == "flow":
            sigmas = compute_density_for_timestep_sampling(
                args.timestep_sampling, batch_size, logit_mean=0.0, logit_std=1.0, device=samples.device
            )
            sigmas_4d = sigmas.view(-1, 1, 1, 1).to(samples.dtype)
            noisy = (1 - sigmas_4d) * samples + sigmas_4d * noise  # rectified flow: x_t = (1-σ) x_0 + σ ε
            return noisy, sigmas * args.num_train_timesteps, noise - samples, torch.ones_like(sigmas)
        timesteps = torch.randint(0, args.num_train_timesteps, (batch_size,), device=samples.device)
        noisy = self.noise_scheduler.add_noise(samples, noise, timesteps)
        if args.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(samples, noise, timesteps)
        weights = torch.ones(batch_size, device=samples.device)
        if args.snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, timesteps)
            clipped = torch.clamp(snr, max=args.snr_gamma)
            weights = clipped / (snr + 1) if args.prediction_type == "v_prediction" else clipped / snr
        return noisy, timesteps, target, weights

    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        training = _unwrap(model).training  # a DeepSpeed engine's own flag does not follow .eval()
        if step >= 0 and training:
            self._update_ema(model, step)
        pixel_values = batch["pixel_values"]
        samples = self.to_samples(pixel_values)
        dtype = next(model.parameters()).dtype
        samples = samples.to(dtype)
        noise = torch.randn_like(samples)
        noisy, timesteps, target, weights = self._noisy_inputs(samples, noise)
        drop_condition = torch.rand(samples.shape[0], device=samples.device) < self.args.condition_dropout
        if not training:
            drop_condition = torch.zeros_like(drop_condition)
        prediction = model(
            noisy, timesteps, image_token_ids=batch["image_token_ids"], drop_condition=drop_condition
        ).sample
        per_row = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (per_row * weights).mean()
        metrics = {
            "mse": per_row.detach().mean(),  # tensors: read only when the loop logs
            "dropped_fraction": drop_condition.float().mean(),
        }
        if self.args.teacher_feature_weight > 0:
            teacher_loss = self.teacher_feature_loss(noisy, timesteps, prediction, pixel_values)
            loss = loss + self.args.teacher_feature_weight * teacher_loss
            metrics["teacher_feature_loss"] = float(teacher_loss.detach())
        return loss, metrics

    def predicted_clean(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 estimate (B, C, H, W), signal fraction (B,)) from the model's prediction at `timesteps`.

        The signal fraction is α_t² = SNR / (1 + SNR), the share of x_t's variance that is the image.
        """
        noisy, prediction = noisy.float(), prediction.float()
        if self.args.prediction_type == "flow":
            sigmas = timesteps.float() / self.args.num_train_timesteps  # x_t = (1-σ) x0 + σ ε, v = ε - x0
            sigmas_4d = sigmas.view(-1, 1, 1, 1)
            signal = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
            return noisy - sigmas_4d * prediction, signal
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(noisy.device)[timesteps]  # (B,) = α_t²
        alpha = alphas_cumprod.sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas_cumprod).sqrt().view(-1, 1, 1, 1)
        if self.args.prediction_type == "epsilon":
            return (noisy - sigma * prediction) / alpha, alphas_cumprod
        return alpha * noisy - sigma * prediction, alphas_cumprod  # v = α ε - σ x0

    def teacher_feature_loss(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: torch.Tensor,
        pixel_values: torch.Tensor,
    ) -> torch.Tensor:
        """1 - cos between the frozen teacher's features of the predicted x0 and of the real image, per
        token-grid cell, averaged over cells; rows weighted by their signal fraction α_t².

        Near pure noise x0_pred is the blurry posterior mean of many images, and pulling its features towards
        one sharp image's would ask for detail the noisy input cannot tell; α_t² (the share of x_t that is
        signal, → 0 there, → 1 near the data) fades the term out smoothly without a threshold knob.
        """
        tokenizer = self.tokenizer.to(pixel_values.device)
        clean, signal = self.predicted_clean(noisy, timesteps, prediction)
        factor = tokenizer.config.downsample_factor
        grid = (pixel_values.shape[-2] // factor, pixel_values.shape[-1] // factor)
        with torch.no_grad():
            target = tokenizer.teacher_features(to_tokenizer_range(pixel_values.float(), tokenizer), grid)[0]
        features = tokenizer.teacher_features(to_tokenizer_range(clean, tokenizer), grid)[0]  # (B, h, w, Dt)
        per_row = (1 - F.cosine_similarity(features, target, dim=-1)).mean(dim=(1, 2))  # (B,)
        return (per_row * signal).mean()

    # ----- EMA ------------------------------------------------------------------------------------------
    def _ensure_ema(self, model: nn.Module) -> EMAModel:
        parameters = list(_unwrap(model).parameters())
        if self.ema is None:
            self.ema = EMAModel(parameters, decay=self.args.ema_decay, use_ema_warmup=True, power=2 / 3)
            if self._pending_ema_state is not None:
                self.ema.load_state_dict(self._pending_ema_state)
                self._pending_ema_state = None
            # fp32 shadow weights: a bf16 copy could not absorb updates of (1 - decay) × a small difference.
            self.ema.to(device=parameters[0].device, dtype=torch.float32)
        return self.ema

    def _update_ema(self, model: nn.Module, step: int) -> None:
        fresh = self.ema is None and self._pending_ema_state is None
        ema = self._ensure_ema(model)
        if not fresh and step > self._ema_step:
            ema.step(_unwrap(model).parameters())
        self._ema_step = step

    def ema_parameters_applied(self, model: nn.Module) -> _EMAWeights:
        """Context manager: the model holds its EMA weights inside, its training weights after."""
        if self.ema is None and self._pending_ema_state is None:
            return _EMAWeights(None, _unwrap(model))
        return _EMAWeights(self._ensure_ema(model), _unwrap(model))

    def state_dict(self) -> dict[str, Any]:
        """The EMA weights and the last step folded into them (saved with every checkpoint)."""
        ema_state = self.ema.state_dict() if self.ema is not None else self._pending_ema_state
        return {"ema": ema_state, "ema_step": self._ema_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The EMAModel needs the model's parameters: it is rebuilt from this state on first use.
        self.ema, self._pending_ema_state, self._ema_step = None, state.get("ema"), state.get("ema_step", -1)

    def validate(self, model: nn.Module, train_dataset: torch.utils.data.Dataset) -> None:
        """The images must be `downsample_factor` × the token grid, and the ids inside the codebook."""
        item = train_dataset[0]
        grid, size = tuple(item["image_token_ids"].shape), tuple(item["pixel_values"].shape[-2:])
        factor = _unwrap(model).config.downsample_factor
        if (grid[0] * factor, grid[1] * factor) != size:
            raise ValueError(
                f"images of {size[0]}x{size[1]} px do not match a {grid[0]}x{grid[1]} token grid × {factor}"
            )
        _unwrap(model).check_image_token_ids(item["image_token_ids"][None])

    # ----- samples and export ---------------------------------------------------------------------------
    def build_pipeline(self, model: nn.Module) -> DetokenizerPipeline:
        """The inference pipeline around `model`: DPM-Solver++ (trailing spacing) or flow-matching Euler."""
        if self.args.prediction_type == "flow":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        pipeline = DetokenizerPipeline(decoder=_unwrap(model), scheduler=scheduler, vae=self.vae)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def set_sample_batch(self, dataset: TokenImageDataset) -> None:
        """Fix the held-out images shown in the PNG grids."""
        count = min(self.args.num_sample_images, len(dataset))
        self._sample_batch = torch.utils.data.default_collate([dataset[index] for index in range(count)])

    @torch.no_grad()
    def write_samples(self, model: nn.Module, step: int, output_dir: Path) -> list[Path]:
        """A PNG grid, one row per image: original | tokenizer pixel decoder | diffusion decoder (EMA)."""
        if self._sample_batch is None:
            return []
        module = _unwrap(model)
        device = next(module.parameters()).device
        ids = self._sample_batch["image_token_ids"].to(device)
        self.tokenizer.to(device)
        original = self._sample_batch["pixel_values"].to(device)
        pixel_decoded = from_tokenizer_range(self.tokenizer.decode(ids), self.tokenizer)
        was_training = module.training
        module.eval()
        with self.ema_parameters_applied(module):
            generator = torch.Generator(device=device).manual_seed(self.args.sample_seed)
            diffused = self.build_pipeline(module)(
                ids,
                self.args.sample_inference_steps,
                self.args.sample_guidance_scale,
                generator=generator,
                output_type="pt",
            ).images
        module.train(was_training)
        columns = [(original + 1) / 2, (pixel_decoded + 1) / 2, diffused.to(original)]
        images = [_to_pil(column[row]) for row in range(ids.shape[0]) for column in columns]
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"detokenizer_samples_step{step:07d}.png"
        make_image_grid(images, rows=ids.shape[0], cols=len(columns)).save(path)
        return [path]

    def export(self, model: nn.Module, output_dir: Path) -> None:
        """Write a `DetokenizerPipeline` folder (decoder with EMA weights, scheduler, autoencoder if any)."""
        module = _unwrap(model)
        if self.ema is not None or self._pending_ema_state is not None:
            self._ensure_ema(module).step(module.parameters())  # fold in the last optimizer step
            self._ema_step += 1
        with self.ema_parameters_applied(module):
            self.build_pipeline(module).save_pretrained(output_dir)


class _EMAWeights:
    def __init__(self, ema: EMAModel | None, module: nn.Module) -> None:
        self.ema, self.parameters = ema, list(module.parameters())

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc_info: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.parameters)


def _first_image(row: dict[str, Any]) -> Any:
    return next(segment["image"] for segment in row["segments"] if segment["image"] is not None)


def _unwrap(model: nn.Module) -> nn.Module:
    # DeepSpeed engines and DDP wrap the trained module as `.module`.
    return getattr(model, "module", model)


def _to_pil(image: torch.Tensor) -> Any:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
