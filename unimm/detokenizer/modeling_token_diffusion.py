"""TokenDiffusionDecoder: a diffusers denoiser conditioned on the visual tokenizer's image token ids.

Each token id looks up its two frozen codebook vectors (semantic ⊕ pixel, copied from the tokenizer so
this folder loads on its own). The concatenated vectors, projected and given 2-D sine-cosine positions,
are the cross-attention states of a `UNet2DConditionModel`; the pixel vectors, as a `(Dp, h, w)` map
upsampled to the sample's resolution, are concatenated to the noisy input. Dropping the condition
(classifier-free guidance) replaces every token's vector by one learned null vector.

With `condition_on_reconstruction`, the decoder also holds a frozen copy of the tokenizer's own pixel decoder
and concatenates its image of the same ids (resized to the sample's resolution) to the noisy input, so
the denoiser only has to add what that fast decoder misses; a dropped condition zeroes it.

The sample is pixels in [-1, 1] (pixel space) or the latents of a diffusers autoencoder; the model
does not need to know which: `sample_channels` says how many channels the sample has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from unimm.tokenizer.configuration_dual_codebook import DualCodebookConfig
from unimm.tokenizer.modeling_dual_codebook import DualCodebookPixelDecoder

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
UPSAMPLING_MODES = ("nearest", "bilinear", "bicubic")
# The tokenizer config fields its pixel decoder is built from (besides the two code sizes, ours too).
RECONSTRUCTION_DECODER_FIELDS = (
    "num_channels",
    "hidden_channels",
    "channel_multipliers",
    "num_res_blocks",
    "norm_num_groups",
    "image_mean",
    "image_std",
)


@dataclass
class TokenDiffusionDecoderOutput(BaseOutput):
    """Output of [`TokenDiffusionDecoder`].

    Args:
        sample (`torch.Tensor` of shape `(B, sample_channels, H, W)`): the model's prediction (noise,
            velocity or flow, per `config.prediction_type`).
    """

    sample: torch.Tensor


@dataclass
class TokenDiffusionCondition(BaseOutput):
    """The decoder's conditioning, computed once per image and reused at every denoising step.

    Args:
        encoder_hidden_states (`torch.Tensor` of shape `(B, h*w, cross_attention_dim)`): cross-attention states.
        pixel_code_map (`torch.Tensor` of shape `(B, pixel_code_dim, h, w)`): the pixel codebook vectors on
            the token grid (the null vector where the condition is dropped).
        reconstruction (`torch.Tensor` of shape `(B, C, h*f, w*f)`, *optional*): the tokenizer pixel decoder's
            image of the ids in [-1, 1] (zeros where the condition is dropped); only with
            `condition_on_reconstruction`.
    """

    encoder_hidden_states: torch.Tensor
    pixel_code_map: torch.Tensor
    reconstruction: torch.Tensor | None = None

    def to(self, *args: Any, **kwargs: Any) -> TokenDiffusionCondition:
        """The condition with its tensors moved or cast as by ``Tensor.to``: accelerate's offload hooks move a
        forward's arguments with it (without it, they rebuild this mapping from its non-None items and fail)."""
        moved = {name: value.to(*args, **kwargs) for name, value in self.items()}
        return TokenDiffusionCondition(**moved)


class TokenDiffusionDecoder(ModelMixin, ConfigMixin):
    r"""A diffusion decoder from image token ids to images (pixels or autoencoder latents).

    Args:
        codebook_size (`int`): K, the tokenizer's number of shared indices.
        semantic_code_dim (`int`): Ds, the size of a semantic codebook vector.
        pixel_code_dim (`int`): Dp, the size of a pixel codebook vector.
        downsample_factor (`int`): image pixels per token along each side (the tokenizer's).
        sample_channels (`int`): channels of the denoised sample (3 for RGB pixels, the autoencoder's
            latent channels in latent space).
        sample_size (`int`): default side of the sample (any multiple of the token grid works).
        block_out_channels, down_block_types, up_block_types, mid_block_type, layers_per_block,
            norm_num_groups, attention_head_dim, transformer_layers_per_block: the `UNet2DConditionModel`'s.
        cross_attention_dim (`int`): width of the token condition states.
        condition_upsampling (`str`): how the pixel-code map is resized to the sample:
            `"nearest"`, `"bilinear"` or `"bicubic"`.
        prediction_type (`str`): what the model was trained to predict: `"epsilon"`, `"v_prediction"`
            (use a DDPM-family scheduler with the same `prediction_type`) or `"flow"` (rectified flow:
            velocity `noise - sample`, use `FlowMatchEulerDiscreteScheduler`).
        condition_on_reconstruction (`bool`): also condition on the tokenizer pixel decoder's image of the ids,
            concatenated to the noisy input (bilinearly resized to the sample, e.g. to latent resolution).
        reconstruction_decoder_config (`dict`, *optional*): the tokenizer config fields its pixel decoder is
            built from (`RECONSTRUCTION_DECODER_FIELDS`); required with `condition_on_reconstruction`.
            [`from_tokenizer`] fills it and copies the weights.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 1024,
        semantic_code_dim: int = 32,
        pixel_code_dim: int = 8,
        downsample_factor: int = 4,
        sample_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        attention_head_dim: int = 32,
        transformer_layers_per_block: int = 1,
        cross_attention_dim: int = 128,
        condition_upsampling: str = "nearest",
        prediction_type: str = "epsilon",
        condition_on_reconstruction: bool = False,
        reconstruction_decoder_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if condition_upsampling not in UPSAMPLING_MODES:
            raise ValueError(
                f"condition_upsampling must be one of {UPSAMPLING_MODES}, got {condition_upsampling!r}"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        token_dim = semantic_code_dim + pixel_code_dim
        self.reconstruction_decoder = self._build_reconstruction_decoder()
        reconstruction_channels = (
            self.reconstruction_decoder.conv_out.out_channels if self.reconstruction_decoder else 0
        )
        # Frozen copies of the tokenizer's codebooks (buffers: saved with the model, never trained).
        self.register_buffer("semantic_codebook", torch.zeros(codebook_size, semantic_code_dim))
        self.register_buffer("pixel_codebook", torch.zeros(codebook_size, pixel_code_dim))
        # Replaces every token's (semantic ⊕ pixel) vector when the condition is dropped.
        self.null_token_embedding = nn.Parameter(torch.randn(token_dim) * 0.02)
        self.condition_norm = nn.LayerNorm(token_dim)
        self.condition_proj = nn.Sequential(
            nn.Linear(token_dim, cross_attention_dim),
            nn.GELU(),
            nn.Linear(cross_attention_dim, cross_attention_dim),
        )
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=sample_channels + pixel_code_dim + reconstruction_channels,
            out_channels=sample_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            mid_block_type=mid_block_type,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            cross_attention_dim=cross_attention_dim,
        )

    def _build_reconstruction_decoder(self) -> DualCodebookPixelDecoder | None:
        """The frozen copy of the tokenizer's pixel decoder (None unless `condition_on_reconstruction`)."""
        config = self.config
        if not config.condition_on_reconstruction:
            return None
        fields = config.reconstruction_decoder_config
        missing = sorted(set(RECONSTRUCTION_DECODER_FIELDS) - set(fields or {}))
        if missing:
            raise ValueError(
                f"condition_on_reconstruction needs reconstruction_decoder_config with the tokenizer's "
                f"{list(RECONSTRUCTION_DECODER_FIELDS)}; missing {missing} (TokenDiffusionDecoder.from_tokenizer "
                "fills it)"
            )
        tokenizer_config = DualCodebookConfig(
            semantic_code_dim=config.semantic_code_dim,
            pixel_code_dim=config.pixel_code_dim,
            downsample_factor=config.downsample_factor,
            **{name: fields[name] for name in RECONSTRUCTION_DECODER_FIELDS},
        )
        return DualCodebookPixelDecoder(tokenizer_config).requires_grad_(False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> TokenDiffusionDecoder:
        """Build a decoder sized by a trained `DualCodebookTokenizer` and copy its codebook vectors (and, with
        `condition_on_reconstruction=True`, its pixel decoder).

        `kwargs` set the other config fields (UNet size, `sample_channels`, `prediction_type`, ...)."""
        config = tokenizer.config
        if kwargs.get("condition_on_reconstruction"):
            kwargs.setdefault(
                "reconstruction_decoder_config",
                {name: getattr(config, name) for name in RECONSTRUCTION_DECODER_FIELDS},
            )
        model = cls(
            codebook_size=config.codebook_size,
            semantic_code_dim=config.semantic_code_dim,
            pixel_code_dim=config.pixel_code_dim,
            downsample_factor=config.downsample_factor,
            **kwargs,
        )
        semantic, pixel = tokenizer.get_codebook_vectors()
        model.load_codebook(semantic, pixel)
        if model.reconstruction_decoder is not None:
            model.reconstruction_decoder.load_state_dict(tokenizer.pixel_decoder.state_dict())
        return model

    @torch.no_grad()
    def load_codebook(self, semantic: torch.Tensor, pixel: torch.Tensor) -> None:
        """Copy the tokenizer's codebook vectors: `semantic` (K, Ds) and `pixel` (K, Dp)."""
        for name, vectors, buffer in (
            ("semantic", semantic, self.semantic_codebook),
            ("pixel", pixel, self.pixel_codebook),
        ):
            if tuple(vectors.shape) != tuple(buffer.shape):
                raise ValueError(
                    f"{name} codebook must have shape {tuple(buffer.shape)} (codebook_size, {name}_code_dim) "
                    f"from the decoder's config, got {tuple(vectors.shape)}"
                )
            buffer.copy_(vectors.detach().to(buffer))

    def check_image_token_ids(self, image_token_ids: torch.Tensor) -> None:
        """Raise `ValueError` unless `image_token_ids` is an integer `(B, h, w)` grid of ids in `[0, K)`."""
        if not isinstance(image_token_ids, torch.Tensor) or image_token_ids.is_floating_point():
            raise ValueError(
                f"image_token_ids must be an integer tensor of shape (B, h, w), got "
                f"{type(image_token_ids).__name__} {getattr(image_token_ids, 'dtype', '')}"
            )
        if image_token_ids.ndim != 3 or min(image_token_ids.shape) == 0:
            raise ValueError(
                f"image_token_ids must have shape (B, h, w) with non-empty sides, got {tuple(image_token_ids.shape)}"
            )
        low, high = int(image_token_ids.min()), int(image_token_ids.max())
        if low < 0 or high >= self.config.codebook_size:
            raise ValueError(
                f"image_token_ids must lie in [0, {self.config.codebook_size - 1}] (codebook_size "
                f"{self.config.codebook_size}), got values in [{low}, {high}]"
            )

    def _grid_positions(self, height: int, width: int, reference: torch.Tensor) -> torch.Tensor:
        # Fixed 2-D sine-cosine positions, so any grid size works without resizing learned tables.
        positions = get_2d_sincos_pos_embed(
            self.config.cross_attention_dim,
            (height, width),
            base_size=max(height, width),
            device=reference.device,
        )
        return positions.to(reference.dtype)  # (h*w, C)

    # `embed_condition` and `reconstruct` are called outside `forward`: under the pipeline's CPU offload their
    # hook first brings the codebooks and the pixel decoder copy to the execution device (as diffusers'
    # autoencoders' `encode`/`decode` do).
    @apply_forward_hook
    def embed_condition(
        self, image_token_ids: torch.Tensor, drop_condition: torch.Tensor | None = None
    ) -> TokenDiffusionCondition:
        """Conditioning for a batch of token grids; rows where `drop_condition` (B,) is True get the null one."""
        self.check_image_token_ids(image_token_ids)
        image_token_ids = image_token_ids.to(self.semantic_codebook.device)
        batch_size, height, width = image_token_ids.shape
        tokens = torch.cat(
            [self.semantic_codebook[image_token_ids], self.pixel_codebook[image_token_ids]], dim=-1
        )  # (B, h, w, Ds + Dp)
        tokens = tokens.to(self.null_token_embedding.dtype)
        if drop_condition is not None:
            if tuple(drop_condition.shape) != (batch_size,):
                raise ValueError(
                    f"drop_condition must have shape ({batch_size},) like the batch, got {tuple(drop_condition.shape)}"
                )
            drop = drop_condition.to(device=tokens.device, dtype=torch.bool)[:, None, None, None]
            tokens = torch.where(drop, self.null_token_embedding, tokens)
        states = self.condition_proj(self.condition_norm(tokens)).flatten(1, 2)  # (B, h*w, C)
        states = states + self._grid_positions(height, width, states)
        pixel_code_map = tokens[..., self.config.semantic_code_dim :].permute(0, 3, 1, 2)  # (B, Dp, h, w)
        reconstruction = None
        if self.reconstruction_decoder is not None:
            reconstruction = self.reconstruct(image_token_ids).to(tokens.dtype)  # (B, C, h*f, w*f)
            if drop_condition is not None:
                reconstruction = torch.where(drop, 0.0, reconstruction)
        return TokenDiffusionCondition(
            encoder_hidden_states=states, pixel_code_map=pixel_code_map, reconstruction=reconstruction
        )

    @apply_forward_hook
    @torch.no_grad()
    def reconstruct(self, image_token_ids: torch.Tensor) -> torch.Tensor:
        """The tokenizer pixel decoder's images (B, C, h*f, w*f) in [-1, 1] of ids (B, h, w), as its
        `decode` gives them (clipped to the image range), from the frozen copies of its codebook and decoder."""
        if self.reconstruction_decoder is None:
            raise ValueError(
                "this decoder has no pixel decoder copy: build it with condition_on_reconstruction"
            )
        self.check_image_token_ids(image_token_ids)
        image_token_ids = image_token_ids.to(self.semantic_codebook.device)
        code_maps = torch.cat(
            [self.semantic_codebook[image_token_ids], self.pixel_codebook[image_token_ids]], dim=-1
        ).permute(0, 3, 1, 2)  # (B, Ds + Dp, h, w)
        images = self.reconstruction_decoder(code_maps)  # (B, C, H, W), the tokenizer's normalisation
        fields = self.config.reconstruction_decoder_config
        mean = images.new_tensor(fields["image_mean"]).view(1, -1, 1, 1)
        std = images.new_tensor(fields["image_std"]).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1) * 2 - 1

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        image_token_ids: torch.Tensor | None = None,
        drop_condition: torch.Tensor | None = None,
        condition: TokenDiffusionCondition | None = None,
        return_dict: bool = True,
    ) -> TokenDiffusionDecoderOutput | tuple[torch.Tensor]:
        """Predict noise/velocity for `sample` (B, sample_channels, H, W) at `timestep`.

        Give either `image_token_ids` (B, h, w) (with optional `drop_condition` (B,)) or a precomputed
        `condition` from [`embed_condition`] (the pipeline reuses it across steps)."""
        if (image_token_ids is None) == (condition is None):
            raise ValueError("give exactly one of image_token_ids or condition")
        if condition is None:
            condition = self.embed_condition(image_token_ids, drop_condition)
        pixel_code_map = condition.pixel_code_map
        if sample.ndim != 4 or sample.shape[1] != self.config.sample_channels:
            raise ValueError(
                f"sample must have shape (B, {self.config.sample_channels}, H, W), got {tuple(sample.shape)}"
            )
        if sample.shape[0] != pixel_code_map.shape[0]:
            raise ValueError(f"sample batch {sample.shape[0]} != condition batch {pixel_code_map.shape[0]}")
        (height, width), grid = sample.shape[-2:], pixel_code_map.shape[-2:]
        if height % grid[0] or width % grid[1]:
            raise ValueError(
                f"sample size {height}x{width} must be a multiple of the token grid {grid[0]}x{grid[1]}"
            )
        pixel_code_map = F.interpolate(
            pixel_code_map.to(sample.dtype), size=(height, width), mode=self.config.condition_upsampling
        )  # (B, Dp, H, W)
        inputs = [sample, pixel_code_map]
        if self.reconstruction_decoder is not None:
            inputs.append(self._resized_reconstruction(condition, (height, width), sample.dtype))
        prediction = self.unet(
            torch.cat(inputs, dim=1),  # (B, sample_channels + Dp [+ C], H, W)
            timestep,
            encoder_hidden_states=condition.encoder_hidden_states.to(sample.dtype),
        ).sample
        if not return_dict:
            return (prediction,)
        return TokenDiffusionDecoderOutput(sample=prediction)

    def _resized_reconstruction(
        self, condition: TokenDiffusionCondition, size: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """The condition's reconstruction at the sample's resolution, (B, C, H, W)."""
        if condition.reconstruction is None:
            raise ValueError(
                "this decoder conditions on the pixel decoder's reconstruction but the condition has none: "
                "compute it with embed_condition"
            )
        reconstruction = condition.reconstruction.to(dtype)
        if tuple(reconstruction.shape[-2:]) != size:  # latent space: down to the latents' resolution
            reconstruction = F.interpolate(reconstruction, size=size, mode="bilinear", antialias=True)
        return reconstruction
