"""The dual-codebook visual tokenizer with shared indices (after TokenFlow), single scale.

One image goes through two branches: a **semantic** branch (features of a vision teacher loaded with
`AutoModel`, then a trainable adapter) and a **pixel** branch (a VQGAN-style convolutional encoder).
Both produce one vector per grid cell. The codebook has K entries and entry k owns a semantic vector and
a pixel vector, so a cell's single id is chosen by the weighted sum of both distances and carries both
meaning (for the language model) and texture (for the pixel decoder).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from . import losses
from .configuration_dual_codebook import DualCodebookConfig, teacher_config_without_dtype

logger = logging.getLogger(__name__)


def apply_forward_hook(method: Callable) -> Callable:
    """Run an accelerate offload hook (``enable_model_cpu_offload``) before an entry point other than
    ``forward``, so ``encode``/``decode`` find the weights on the execution device. diffusers has the same
    decorator; this transformers model does not import the diffusion stack for it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)
        return method(self, *args, **kwargs)

    return wrapper


@dataclass
class DualCodebookQuantizerOutput(ModelOutput):
    """Result of the shared-index quantizer; embeddings carry straight-through gradients."""

    image_token_ids: torch.LongTensor | None = None  # (B, h, w)
    semantic_embeddings: torch.FloatTensor | None = None  # (B, h, w, Ds)
    pixel_embeddings: torch.FloatTensor | None = None  # (B, h, w, Dp)
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None  # fraction of the K entries hit in this batch
    perplexity: torch.FloatTensor | None = None


@dataclass
class DualCodebookEmbeddingOutput(ModelOutput):
    """Codebook vectors of given ids (what the pixel decoder and the detokenizer read)."""

    semantic_embeddings: torch.FloatTensor | None = None  # (B, h, w, Ds)
    pixel_embeddings: torch.FloatTensor | None = None  # (B, h, w, Dp)


@dataclass
class DualCodebookTokenizerOutput(ModelOutput):
    """Output of [`DualCodebookTokenizer.forward`]: everything a training loss reads, unweighted
    (`unimm.tokenizer.losses.DualCodebookLoss` weighs the terms and owns the GAN)."""

    image_token_ids: torch.LongTensor | None = None  # (B, h, w)
    reconstruction: torch.FloatTensor | None = None  # (B, C, H, W), normalised range
    semantic_embeddings: torch.FloatTensor | None = None  # (B, h, w, Ds), straight-through
    pixel_embeddings: torch.FloatTensor | None = None  # (B, h, w, Dp), straight-through
    semantic_prediction: torch.FloatTensor | None = None  # (B, h, w, Dt), the semantic decoder's
    teacher_features: torch.FloatTensor | None = None  # (B, h, w, Dt), the configured teacher layer
    # Every teacher layer on the grid, embeddings excluded, configured layer last: each (B, h, w, Dt).
    teacher_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    codebook_loss: torch.FloatTensor | None = None  # VQ-VAE's terms, from the quantizer's own tensors
    commitment_loss: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None  # fraction of the K entries hit in this batch
    perplexity: torch.FloatTensor | None = None


class DualCodebookResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_states)
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return residual + hidden_states


def cpu_channels_last(images: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) in channels-last memory on the CPU, where oneDNN's convolutions take it without
    reordering every layer's input and output (the demo tokenizer's encoder on 64 images: 24 against 34 ms on one
    core); the same values, and the same tensor elsewhere."""
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images


class DualCodebookPixelEncoder(nn.Module):
    """Convolutional encoder: (B, C, H, W) -> (B, Dp, H/f, W/f), one stride-2 conv between levels."""

    def __init__(self, config: DualCodebookConfig) -> None:
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.num_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(DualCodebookResnetBlock(in_width, width, config.norm_num_groups))
                in_width = width
            if level < len(widths) - 1:
                blocks.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, in_width)
        self.conv_out = nn.Conv2d(in_width, config.pixel_code_dim, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.blocks(self.conv_in(cpu_channels_last(pixel_values)))
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class DualCodebookPixelDecoder(nn.Module):
    """Decoder from both embeddings: (B, Ds + Dp, h, w) -> (B, C, h*f, w*f)."""

    def __init__(self, config: DualCodebookConfig) -> None:
        super().__init__()
        widths = [config.hidden_channels * m for m in reversed(config.channel_multipliers)]
        self.conv_in = nn.Conv2d(config.semantic_code_dim + config.pixel_code_dim, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(DualCodebookResnetBlock(in_width, width, config.norm_num_groups))
                in_width = width
            if level < len(widths) - 1:
                blocks.extend(
                    [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
                )
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, in_width)
        self.conv_out = nn.Conv2d(in_width, config.num_channels, 3, padding=1)

    def forward(self, code_maps: torch.Tensor) -> torch.Tensor:
        hidden_states = self.blocks(self.conv_in(cpu_channels_last(code_maps)))
        return self.conv_out(F.silu(self.norm_out(hidden_states))).contiguous()  # (B, C, H, W)


class DualCodebookSemanticDecoder(nn.Module):
    """Regresses the teacher's features from the semantic codes: (B, Ds, h, w) -> (B, Dt, h, w)."""

    def __init__(self, config: DualCodebookConfig, teacher_hidden_size: int) -> None:
        super().__init__()
        width = config.semantic_hidden_size
        self.conv_in = nn.Conv2d(config.semantic_code_dim, width, 1)
        self.block = DualCodebookResnetBlock(width, width, config.norm_num_groups)
        self.conv_out = nn.Conv2d(width, teacher_hidden_size, 1)

    def forward(self, semantic_maps: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.block(self.conv_in(semantic_maps))))


def shared_index_distances(
    semantic_codes: torch.Tensor,
    pixel_codes: torch.Tensor,
    semantic_codebook: torch.Tensor,
    pixel_codebook: torch.Tensor,
    semantic_weight: float,
    pixel_weight: float,
) -> torch.Tensor:
    """``w_sem * ||z_sem - E_sem[k]||^2 + w_pix * ||z_pix - E_pix[k]||^2`` for every code and entry: (N, K)."""

    def squared_distances(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return codes.pow(2).sum(-1, keepdim=True) - 2 * codes @ codebook.t() + codebook.pow(2).sum(-1)

    return semantic_weight * squared_distances(semantic_codes, semantic_codebook) + pixel_weight * (
        squared_distances(pixel_codes, pixel_codebook)
    )


# Positions searched at a time by `nearest_shared_index`: 1024 rows of distances to a 4096-entry codebook (16 MB in
# float32) stay in the CPU's cache for the argmin, where the whole (N, K) matrix of a batch would not.
NEAREST_CHUNK_ROWS = 1024


def nearest_shared_index(
    semantic_codes: torch.Tensor,
    pixel_codes: torch.Tensor,
    semantic_codebook: torch.Tensor,
    pixel_codebook: torch.Tensor,
    semantic_weight: float,
    pixel_weight: float,
) -> torch.Tensor:
    """``shared_index_distances(...).argmin(-1)`` (N,) without its whole (N, K) matrix: a code's own squared norm
    is the same for every entry and drops out, and the two products become one over the concatenated code,
    ``-2 [w_sem z_sem, w_pix z_pix] . [E_sem[k], E_pix[k]] + w_sem ||E_sem[k]||^2 + w_pix ||E_pix[k]||^2``, one
    ``addmm`` per chunk of rows."""
    codes = torch.cat([semantic_weight * semantic_codes, pixel_weight * pixel_codes], -1)  # (N, Ds + Dp)
    codebook = torch.cat([semantic_codebook, pixel_codebook], -1)  # (K, Ds + Dp)
    entry_norms = semantic_weight * semantic_codebook.pow(2).sum(-1) + pixel_weight * pixel_codebook.pow(
        2
    ).sum(-1)
    ids = [
        torch.addmm(entry_norms, chunk, codebook.t(), alpha=-2).argmin(-1)  # (n, K) -> (n,)
        for chunk in codes.split(NEAREST_CHUNK_ROWS)
    ]
    return torch.cat(ids) if ids else codes.new_zeros(0, dtype=torch.long)


class DualCodebookQuantizer(nn.Module):
    """K shared indices, each with a semantic and a pixel vector; cosine or EMA codebooks; dead-entry restart."""

    def __init__(self, config: DualCodebookConfig) -> None:
        super().__init__()
        self.config = config
        num_codes = config.codebook_size
        use_ema = config.codebook_update == "ema"
        self.semantic_codebook = nn.Parameter(
            torch.randn(num_codes, config.semantic_code_dim), requires_grad=not use_ema
        )
        self.pixel_codebook = nn.Parameter(
            torch.randn(num_codes, config.pixel_code_dim), requires_grad=not use_ema
        )
        # Expected hits per entry per batch (EMA); drives dead-entry restarts.
        self.register_buffer("usage", torch.ones(num_codes))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if use_ema:
            self.register_buffer("ema_counts", torch.ones(num_codes))
            self.register_buffer("ema_semantic_sum", self.semantic_codebook.detach().clone())
            self.register_buffer("ema_pixel_sum", self.pixel_codebook.detach().clone())

    def normalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=-1) if self.config.codebook_l2_normalize else vectors

    def codebook_vectors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries (K, Ds), (K, Dp) as the search compares them: in ``dtype`` (default: their own),
        l2-normalised if configured."""
        semantic, pixel = self.semantic_codebook, self.pixel_codebook
        if dtype is not None:
            semantic, pixel = semantic.to(dtype), pixel.to(dtype)
        return self.normalize(semantic), self.normalize(pixel)

    def select(self, semantic_codes: torch.Tensor, pixel_codes: torch.Tensor) -> torch.Tensor:
        """Shared index per position of flat, already normalised codes (N, Ds), (N, Dp) -> (N,).

        The search runs in float32 at least, whatever the codes' and the codebook's dtype: in bfloat16,
        distances tie and round, and about 1% of the demo tokenizer's ids flip."""
        dtype = torch.promote_types(semantic_codes.dtype, torch.float32)
        semantic_codebook, pixel_codebook = self.codebook_vectors(dtype)
        device = semantic_codebook.device
        return nearest_shared_index(
            semantic_codes.to(device, dtype),
            pixel_codes.to(device, dtype),
            semantic_codebook,
            pixel_codebook,
            self.config.semantic_distance_weight,
            self.config.pixel_distance_weight,
        )

    def nearest(self, semantic_codes: torch.Tensor, pixel_codes: torch.Tensor) -> torch.LongTensor:
        """Ids (B, h, w) of continuous codes (B, h, w, Ds) and (B, h, w, Dp), normalised in float32 at least."""
        dtype = torch.promote_types(semantic_codes.dtype, torch.float32)
        semantic_flat = semantic_codes.reshape(-1, semantic_codes.shape[-1]).to(dtype)  # (N, Ds)
        pixel_flat = pixel_codes.reshape(-1, pixel_codes.shape[-1]).to(dtype)  # (N, Dp)
        ids = self.select(self.normalize(semantic_flat), self.normalize(pixel_flat))  # (N,)
        return ids.view(semantic_codes.shape[:-1])

    def forward(self, semantic_codes: torch.Tensor, pixel_codes: torch.Tensor) -> DualCodebookQuantizerOutput:
        # Codebook statistics run in the codebook's dtype and the nearest-entry search in float32 at least,
        # outside autocast: bf16 distances would tie and flip argmins.
        with torch.autocast(device_type=semantic_codes.device.type, enabled=False):
            return self._quantize(
                semantic_codes.to(self.semantic_codebook.dtype), pixel_codes.to(self.pixel_codebook.dtype)
            )

    def _quantize(
        self, semantic_codes: torch.Tensor, pixel_codes: torch.Tensor
    ) -> DualCodebookQuantizerOutput:
        batch_size, height, width, _ = semantic_codes.shape
        semantic_flat = self.normalize(semantic_codes.reshape(-1, semantic_codes.shape[-1]))  # (N, Ds)
        pixel_flat = self.normalize(pixel_codes.reshape(-1, pixel_codes.shape[-1]))  # (N, Dp)
        if self.training and int(self.num_updates) == 0:
            self._initialize_from(semantic_flat.detach(), pixel_flat.detach())
        ids = self.select(semantic_flat.detach(), pixel_flat.detach())  # (N,)
        counts = torch.bincount(ids, minlength=self.config.codebook_size).to(semantic_flat.dtype)
        if self.training:
            self._update(semantic_flat.detach(), pixel_flat.detach(), ids, counts)
        semantic_codebook, pixel_codebook = self.codebook_vectors()
        semantic_quantized, pixel_quantized = semantic_codebook[ids], pixel_codebook[ids]
        semantic_cb, semantic_commit = losses.vector_quantization_losses(semantic_flat, semantic_quantized)
        pixel_cb, pixel_commit = losses.vector_quantization_losses(pixel_flat, pixel_quantized)
        codebook_loss = semantic_cb + pixel_cb
        if self.config.codebook_update == "ema":
            codebook_loss = codebook_loss.detach() * 0.0  # EMA codebooks get no gradient
        # Straight-through estimator: forward the codebook vector, backward into the encoder's code.
        semantic_quantized = semantic_flat + (semantic_quantized - semantic_flat).detach()
        pixel_quantized = pixel_flat + (pixel_quantized - pixel_flat).detach()
        return DualCodebookQuantizerOutput(
            image_token_ids=ids.view(batch_size, height, width),
            semantic_embeddings=semantic_quantized.view(batch_size, height, width, -1),  # (B, h, w, Ds)
            pixel_embeddings=pixel_quantized.view(batch_size, height, width, -1),  # (B, h, w, Dp)
            codebook_loss=codebook_loss,
            commitment_loss=semantic_commit + pixel_commit,
            codebook_usage=(counts > 0).float().mean(),
            perplexity=losses.codebook_perplexity(counts),
        )

    @torch.no_grad()
    def _initialize_from(self, semantic_flat: torch.Tensor, pixel_flat: torch.Tensor) -> None:
        """Data-dependent init: entries start at random encoder outputs of the first training batch."""
        rows = torch.randint(
            0, semantic_flat.shape[0], (self.config.codebook_size,), device=semantic_flat.device
        )
        self._set_entries(
            torch.arange(self.config.codebook_size, device=rows.device), semantic_flat, pixel_flat, rows
        )

    @torch.no_grad()
    def _set_entries(
        self, entries: torch.Tensor, semantic: torch.Tensor, pixel: torch.Tensor, rows: torch.Tensor
    ):
        # A little noise keeps entries seeded from the same vector apart.
        self.semantic_codebook.data[entries] = semantic[rows] + 1e-3 * torch.randn_like(semantic[rows])
        self.pixel_codebook.data[entries] = pixel[rows] + 1e-3 * torch.randn_like(pixel[rows])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each rank drew from its own batch: take rank 0's entries so data-parallel replicas agree.
            torch.distributed.broadcast(self.semantic_codebook.data, src=0)
            torch.distributed.broadcast(self.pixel_codebook.data, src=0)
        self.usage[entries] = self.usage.mean() if self.num_updates > 0 else 1.0
        if self.config.codebook_update == "ema":
            self.ema_counts[entries] = 1.0
            self.ema_semantic_sum[entries] = self.semantic_codebook.data[entries]
            self.ema_pixel_sum[entries] = self.pixel_codebook.data[entries]

    @torch.no_grad()
    def _update(
        self, semantic_flat: torch.Tensor, pixel_flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor
    ):
        decay = self.config.ema_decay
        semantic_sum = torch.zeros_like(self.semantic_codebook).index_add_(0, ids, semantic_flat)  # (K, Ds)
        pixel_sum = torch.zeros_like(self.pixel_codebook).index_add_(0, ids, pixel_flat)  # (K, Dp)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in (counts, semantic_sum, pixel_sum):
                torch.distributed.all_reduce(tensor)
        self.usage.mul_(decay).add_(counts, alpha=1 - decay)
        if self.config.codebook_update == "ema":
            self.ema_counts.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_semantic_sum.mul_(decay).add_(semantic_sum, alpha=1 - decay)
            self.ema_pixel_sum.mul_(decay).add_(pixel_sum, alpha=1 - decay)
            denominator = self.ema_counts.clamp(min=1e-5).unsqueeze(-1)
            self.semantic_codebook.data.copy_(self.ema_semantic_sum / denominator)
            self.pixel_codebook.data.copy_(self.ema_pixel_sum / denominator)
        self.num_updates += 1
        interval = self.config.dead_code_restart_interval
        if interval > 0 and int(self.num_updates) % interval == 0:
            # Dead: used less than `dead_code_threshold` times the average entry's (EMA) hits per batch.
            average = self.usage.sum() / self.config.codebook_size
            dead = (self.usage < self.config.dead_code_threshold * average).nonzero().squeeze(-1)
            if dead.numel():
                # Same rows on every rank (the dead set is the same: usage is all-reduced).
                generator = torch.Generator().manual_seed(int(self.num_updates))
                rows = torch.randint(0, semantic_flat.shape[0], (dead.numel(),), generator=generator)
                self._set_entries(dead, semantic_flat, pixel_flat, rows.to(semantic_flat.device))
                logger.debug("restarted %d dead codebook entries", dead.numel())


class DualCodebookPreTrainedModel(PreTrainedModel):
    config_class = DualCodebookConfig
    base_model_prefix = "dual_codebook"
    main_input_name = "pixel_values"
    _no_split_modules = ["DualCodebookResnetBlock"]
    # Checkpoints from before the loss left the model may hold the PatchGAN discriminator's weights.
    _keys_to_ignore_on_load_unexpected = [r"^discriminator\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
            module.reset_parameters()
        elif isinstance(module, DualCodebookQuantizer):
            module.semantic_codebook.normal_()
            module.pixel_codebook.normal_()


class DualCodebookTokenizer(DualCodebookPreTrainedModel):
    """Image -> (B, h, w) shared codebook ids -> image. See the module docstring for the design."""

    def __init__(self, config: DualCodebookConfig) -> None:
        super().__init__(config)
        if config.teacher_config is None:
            # First build from a named teacher: load its weights, then record its config so a saved
            # tokenizer rebuilds the teacher offline from config.json (weights come from the checkpoint).
            # It takes the dtype the tokenizer is built in (torch's default dtype here), not its checkpoint's.
            self.teacher = AutoModel.from_pretrained(
                config.teacher_name_or_path, dtype=torch.get_default_dtype()
            )
            config.teacher_config = teacher_config_without_dtype(self.teacher.config.to_dict())
        else:
            teacher_kwargs = dict(config.teacher_config)
            self.teacher = AutoModel.from_config(
                AutoConfig.for_model(teacher_kwargs.pop("model_type"), **teacher_kwargs)
            )
        teacher_config = self.teacher.config
        self.teacher_hidden_size = teacher_config.hidden_size
        self.teacher_patch_size = teacher_config.patch_size
        self.teacher_image_size = teacher_config.image_size
        self.teacher_num_channels = getattr(teacher_config, "num_channels", 3)
        if self.teacher_num_channels != config.num_channels and config.num_channels != 1:
            raise ValueError(
                f"teacher takes {self.teacher_num_channels} channels but num_channels={config.num_channels}; "
                "expected equal counts (or a 1-channel tokenizer, whose images are repeated)"
            )
        # Teachers that interpolate position embeddings read the image at grid * patch size (so their patch
        # grid is the token grid at any aspect ratio); the others read it at their native size.
        forward_parameters = inspect.signature(self.teacher.forward).parameters
        self._teacher_kwargs = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in forward_parameters else {}
        )
        self._teacher_interpolates = bool(self._teacher_kwargs) or teacher_config.model_type.startswith(
            "dinov2"
        )
        if config.freeze_teacher:
            self.teacher.requires_grad_(False)
        self.semantic_adapter = nn.Sequential(
            nn.Linear(self.teacher_hidden_size, config.semantic_hidden_size),
            nn.GELU(),
            nn.Linear(config.semantic_hidden_size, config.semantic_code_dim),
        )
        self.pixel_encoder = DualCodebookPixelEncoder(config)
        self.quantizer = DualCodebookQuantizer(config)
        self.pixel_decoder = DualCodebookPixelDecoder(config)
        self.semantic_decoder = DualCodebookSemanticDecoder(config, self.teacher_hidden_size)
        self.post_init()

    def train(self, mode: bool = True) -> DualCodebookTokenizer:
        super().train(mode)
        if self.config.freeze_teacher:
            self.teacher.eval()  # a frozen teacher keeps dropout/batch statistics off
        return self

    # ----- input checks -------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            kind = (
                pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            )
            raise ValueError(
                f"pixel_values: expected a float tensor in the processor's normalised range, got {kind}"
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (B, {self.config.num_channels}, H, W)"
            )
        factor = self.config.downsample_factor
        height, width = pixel_values.shape[-2:]
        if height % factor or width % factor or height == 0 or width == 0:
            raise ValueError(
                f"pixel_values of size {height}x{width}: expected height and width to be positive multiples of "
                f"downsample_factor={factor} (DualCodebookImageProcessor snaps images to the grid)"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")

    def _check_ids(self, image_token_ids: torch.Tensor) -> None:
        if not isinstance(image_token_ids, torch.Tensor) or image_token_ids.is_floating_point():
            raise ValueError("image_token_ids: expected an integer tensor of shape (B, h, w)")
        if image_token_ids.ndim != 3:
            raise ValueError(f"image_token_ids of shape {tuple(image_token_ids.shape)}: expected (B, h, w)")
        if image_token_ids.numel() and (
            image_token_ids.min() < 0 or image_token_ids.max() >= self.config.codebook_size
        ):
            raise ValueError(
                f"image_token_ids range [{int(image_token_ids.min())}, {int(image_token_ids.max())}]: expected ids "
                f"in [0, {self.config.codebook_size - 1}] (codebook_size={self.config.codebook_size})"
            )

    # ----- branches -----------------------------------------------------------------------------------
    def _teacher_inputs(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Re-normalise from the tokenizer's to the teacher's statistics and resize for the teacher."""
        config = self.config

        def stats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=pixel_values.device, dtype=pixel_values.dtype).view(
                1, -1, 1, 1
            )

        images = pixel_values * stats(config.image_std) + stats(config.image_mean)  # (B, C, H, W) in [0, 1]
        teacher_mean = config.teacher_image_mean or config.image_mean
        teacher_std = config.teacher_image_std or config.image_std
        if config.num_channels != self.teacher_num_channels:
            images = images.expand(-1, self.teacher_num_channels, -1, -1)
            teacher_mean, teacher_std = (
                teacher_mean * self.teacher_num_channels,
                teacher_std * self.teacher_num_channels,
            )
        images = (images - stats(teacher_mean[: self.teacher_num_channels])) / stats(
            teacher_std[: self.teacher_num_channels]
        )
        if self._teacher_interpolates:
            size = (grid[0] * self.teacher_patch_size, grid[1] * self.teacher_patch_size)
        else:
            size = (self.teacher_image_size, self.teacher_image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        # A teacher may keep its own dtype (e.g. cast back to float32 under a bfloat16 tokenizer): inputs follow it.
        return images.to(device=self.teacher.device, dtype=self.teacher.dtype)

    def teacher_features(
        self, pixel_values: torch.Tensor, grid: tuple[int, int], all_layers: bool = False
    ) -> list[torch.Tensor]:
        """Teacher features on the token grid, (B, h, w, Dt): the configured layer, or every layer
        (embeddings excluded) with the configured layer last when ``all_layers``."""
        teacher_inputs = self._teacher_inputs(pixel_values, grid)
        autocast_dtype = self.config.teacher_autocast_dtype
        with torch.autocast(
            teacher_inputs.device.type,
            dtype=getattr(torch, autocast_dtype or "bfloat16"),
            enabled=autocast_dtype is not None,
        ):
            outputs = self.teacher(
                pixel_values=teacher_inputs, output_hidden_states=True, **self._teacher_kwargs
            )
        layer = self.config.teacher_feature_layer
        selected = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        layers = [*outputs.hidden_states[1:-1], selected] if all_layers else [selected]
        # Features leave in the adapter's dtype (and on its device) whatever the teacher's or the autocast dtype.
        adapter_parameter = next(self.semantic_adapter.parameters())
        return [self._to_grid(hidden_states.to(adapter_parameter), grid) for hidden_states in layers]

    def _to_grid(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch_size, sequence_length, channels = hidden_states.shape
        if self._teacher_interpolates:
            patch_grid = grid
        else:
            side = self.teacher_image_size // self.teacher_patch_size
            patch_grid = (side, side)
        # Leading tokens beyond the patch grid are CLS / register tokens.
        num_prefix = sequence_length - patch_grid[0] * patch_grid[1]
        if num_prefix < 0:
            raise ValueError(
                f"teacher returned {sequence_length} tokens, fewer than its {patch_grid} patch grid"
            )
        maps = (
            hidden_states[:, num_prefix:].transpose(1, 2).reshape(batch_size, channels, *patch_grid)
        )  # (B, Dt, gh, gw)
        if patch_grid != grid:
            mode = "area" if patch_grid[0] >= grid[0] and patch_grid[1] >= grid[1] else "bilinear"
            maps = F.interpolate(maps, size=grid, mode=mode)
        return maps.permute(0, 2, 3, 1)  # (B, h, w, Dt)

    def _codes(
        self, pixel_values: torch.Tensor, all_layers: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Continuous semantic (B, h, w, Ds) and pixel (B, h, w, Dp) codes, plus the teacher's features."""
        grid = (
            pixel_values.shape[-2] // self.config.downsample_factor,
            pixel_values.shape[-1] // self.config.downsample_factor,
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_teacher):
            teacher_layers = self.teacher_features(pixel_values, grid, all_layers=all_layers)
        semantic_codes = self.semantic_adapter(teacher_layers[-1])  # (B, h, w, Ds)
        pixel_parameter = next(self.pixel_encoder.parameters())  # the teacher's dtype may differ
        pixel_maps = self.pixel_encoder(pixel_values.to(pixel_parameter))  # (B, Dp, h, w)
        pixel_codes = pixel_maps.permute(0, 2, 3, 1)  # (B, h, w, Dp)
        return semantic_codes, pixel_codes, teacher_layers

    def _decode_embeddings(
        self, semantic_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor
    ) -> torch.Tensor:
        code_maps = torch.cat([semantic_embeddings, pixel_embeddings], dim=-1).permute(
            0, 3, 1, 2
        )  # (B, Ds+Dp, h, w)
        return self.pixel_decoder(code_maps)

    # ----- public API ---------------------------------------------------------------------------------
    # Inputs may come in any float dtype and on any device: each branch takes them to its own. The public
    # methods other than `forward` first run an offload hook (diffusers' `enable_model_cpu_offload`), as
    # diffusers' autoencoders' `encode`/`decode` do.
    @apply_forward_hook
    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Shared codebook ids (B, h, w) of normalised images (B, C, H, W); H, W multiples of the factor."""
        self._check_pixel_values(pixel_values)
        semantic_codes, pixel_codes, _ = self._codes(pixel_values)
        return self.quantizer.nearest(semantic_codes, pixel_codes)

    @apply_forward_hook
    def embed(self, image_token_ids: torch.Tensor) -> DualCodebookEmbeddingOutput:
        """Codebook vectors of ids (B, h, w): semantic (B, h, w, Ds) and pixel (B, h, w, Dp)."""
        self._check_ids(image_token_ids)
        semantic_codebook, pixel_codebook = self.quantizer.codebook_vectors()
        image_token_ids = image_token_ids.to(semantic_codebook.device)
        return DualCodebookEmbeddingOutput(
            semantic_embeddings=semantic_codebook[image_token_ids],
            pixel_embeddings=pixel_codebook[image_token_ids],
        )

    @apply_forward_hook
    def decode(self, image_token_ids: torch.Tensor) -> torch.FloatTensor:
        """Images (B, C, h*f, w*f) in the processor's normalised range from ids (B, h, w)."""
        embeddings = self.embed(image_token_ids)
        reconstruction = self._decode_embeddings(embeddings.semantic_embeddings, embeddings.pixel_embeddings)
        low, high = self._normalized_range(reconstruction)
        return torch.maximum(torch.minimum(reconstruction, high), low)

    def get_codebook_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codebook as the quantizer uses it: semantic (K, Ds) and pixel (K, Dp), l2-normalised if configured."""
        semantic, pixel = self.quantizer.codebook_vectors()
        return semantic.detach(), pixel.detach()

    def _normalized_range(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.image_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.config.image_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_teacher_hidden_states: bool = False,
        return_dict: bool | None = None,
    ) -> DualCodebookTokenizerOutput | tuple:
        """Encode, quantise and decode normalised images (B, C, H, W), returning what a loss reads
        (`DualCodebookLoss`): the reconstruction, the quantizer's terms, the semantic decoder's prediction
        and the teacher's features. ``output_teacher_hidden_states`` adds every teacher layer (for the
        perceptual loss)."""
        self._check_pixel_values(pixel_values)
        semantic_codes, pixel_codes, teacher_layers = self._codes(
            pixel_values, all_layers=output_teacher_hidden_states
        )
        quantized = self.quantizer(semantic_codes, pixel_codes)
        reconstruction = self._decode_embeddings(quantized.semantic_embeddings, quantized.pixel_embeddings)
        semantic_maps = quantized.semantic_embeddings.permute(0, 3, 1, 2)  # (B, Ds, h, w)
        semantic_prediction = self.semantic_decoder(semantic_maps).permute(0, 2, 3, 1)  # (B, h, w, Dt)
        output = DualCodebookTokenizerOutput(
            image_token_ids=quantized.image_token_ids,
            reconstruction=reconstruction,
            semantic_embeddings=quantized.semantic_embeddings,
            pixel_embeddings=quantized.pixel_embeddings,
            semantic_prediction=semantic_prediction,
            teacher_features=teacher_layers[-1],
            teacher_hidden_states=tuple(teacher_layers) if output_teacher_hidden_states else None,
            codebook_loss=quantized.codebook_loss,
            commitment_loss=quantized.commitment_loss,
            codebook_usage=quantized.codebook_usage,
            perplexity=quantized.perplexity,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "DualCodebookEmbeddingOutput",
    "DualCodebookPreTrainedModel",
    "DualCodebookQuantizerOutput",
    "DualCodebookTokenizer",
    "DualCodebookTokenizerOutput",
    "nearest_shared_index",
    "shared_index_distances",
]
