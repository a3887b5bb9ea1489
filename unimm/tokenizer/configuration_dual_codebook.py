"""Configuration of the dual-codebook visual tokenizer (TokenFlow-style shared indices)."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

CODEBOOK_UPDATES = ("gradient", "ema")
TEACHER_AUTOCAST_DTYPES = (None, "bfloat16", "float16")

# Loss settings that configs written before the loss left the model still carry; they are now arguments of
# `unimm.tokenizer.losses.DualCodebookLoss` (the `tokenizer` training stage's fields) and are dropped here.
TRAINING_ONLY_KEYS = (
    "reconstruction_loss",
    "reconstruction_weight",
    "perceptual_weight",
    "codebook_weight",
    "commitment_weight",
    "semantic_weight",
    "adversarial_weight",
    "adversarial_start_step",
    "discriminator_channels",
    "discriminator_layers",
)

# The built-in semantic teacher when no pretrained one is given: a small ViT whose patch equals the
# tokenizer's downsampling factor, so its patch grid is the token grid (sizes scaled per config).
DEFAULT_TEACHER_CONFIG: dict[str, Any] = {
    "model_type": "vit",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

# The teacher is part of the tokenizer: it takes the dtype the tokenizer is built or loaded in, as `.to(dtype)`
# casts it. A dtype recorded in its config would pin it (a teacher saved as "float32" stayed float32 under
# `from_pretrained(dtype=torch.bfloat16)`), so none is kept.
TEACHER_DTYPE_KEYS = ("dtype", "torch_dtype")


def teacher_config_without_dtype(teacher_config: dict[str, Any]) -> dict[str, Any]:
    """The teacher's architecture: its config dict without a dtype."""
    return {key: value for key, value in teacher_config.items() if key not in TEACHER_DTYPE_KEYS}


class DualCodebookConfig(PretrainedConfig):
    r"""Configuration of [`DualCodebookTokenizer`].

    Args:
        codebook_size (`int`): K, the number of shared indices; entry k owns a semantic and a pixel vector.
        semantic_code_dim (`int`): Ds, the size of a semantic codebook vector.
        pixel_code_dim (`int`): Dp, the size of a pixel codebook vector.
        downsample_factor (`int`): pixels per grid cell along each side (a power of two); grid = size / factor.
        num_channels (`int`): image channels.
        image_size (`int`): default (square) training size; any multiple of `downsample_factor` works.
        image_mean, image_std (`list[float]`): normalisation of `pixel_values` (the image processor's).
        hidden_channels (`int`): base width of the convolutional pixel encoder/decoder.
        channel_multipliers (`list[int]`): width multiplier per resolution level; there are
            `log2(downsample_factor) + 1` levels (one downsampling between consecutive levels).
        num_res_blocks (`int`): residual blocks per level.
        norm_num_groups (`int`): GroupNorm groups (small for tiny test models).
        semantic_hidden_size (`int`): width of the semantic adapter and semantic decoder.
        teacher_name_or_path (`str`, *optional*): a transformers vision model (SigLIP, CLIP, DINOv2, ViT, ...)
            loaded with `AutoModel.from_pretrained` when the tokenizer is first built.
        teacher_config (`dict`, *optional*): the teacher's config as a dict; filled from the loaded teacher,
            so a saved tokenizer rebuilds its teacher offline. Defaults to a small built-in ViT. A dtype in it
            is dropped: the teacher takes the tokenizer's dtype.
        teacher_feature_layer (`int`): which of the teacher's `hidden_states` the semantic branch reads.
        teacher_image_mean, teacher_image_std (`list[float]`, *optional*): the teacher's own input
            normalisation (default: the tokenizer's).
        freeze_teacher (`bool`): keep the teacher's weights fixed.
        teacher_autocast_dtype (`str`, *optional*): run the teacher under autocast to this dtype
            (`"bfloat16"` or `"float16"`): a large pretrained teacher is most of a step's time.
        codebook_update (`str`): `"gradient"` (codebook loss) or `"ema"` (exponential moving averages).
        codebook_l2_normalize (`bool`): compare codes and codebook entries by cosine distance.
        semantic_distance_weight, pixel_distance_weight (`float`): weights of the two distances in
            the shared-index selection `argmin_k w_sem d_sem + w_pix d_pix`.
        ema_decay (`float`): decay of the EMA codebook and of the per-entry usage statistics.
        dead_code_threshold (`float`): entries whose EMA usage (hits per batch) falls below this fraction
            of the average entry's are restarted from random encoder outputs of the current batch.
        dead_code_restart_interval (`int`): training forwards between restarts (0 disables).

    Loss weights and the PatchGAN discriminator are training settings, not architecture: see
    `unimm.tokenizer.losses.DualCodebookLoss`. Their keys in older config.json files are ignored.
    """

    model_type = "unimm_dual_codebook"

    def __init__(
        self,
        codebook_size: int = 1024,
        semantic_code_dim: int = 32,
        pixel_code_dim: int = 8,
        downsample_factor: int = 4,
        num_channels: int = 3,
        image_size: int = 32,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        hidden_channels: int = 64,
        channel_multipliers: list[int] | None = None,
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        semantic_hidden_size: int = 128,
        teacher_name_or_path: str | None = None,
        teacher_config: dict[str, Any] | None = None,
        teacher_feature_layer: int = -1,
        teacher_image_mean: list[float] | None = None,
        teacher_image_std: list[float] | None = None,
        freeze_teacher: bool = True,
        teacher_autocast_dtype: str | None = None,
        codebook_update: str = "gradient",
        codebook_l2_normalize: bool = True,
        semantic_distance_weight: float = 1.0,
        pixel_distance_weight: float = 1.0,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.1,
        dead_code_restart_interval: int = 50,
        **kwargs: Any,
    ) -> None:
        dropped = [key for key in TRAINING_ONLY_KEYS if kwargs.pop(key, None) is not None]
        if dropped:
            logger.info(
                "DualCodebookConfig: ignoring the training-only keys %s (DualCodebookLoss's now)", dropped
            )
        self.codebook_size = codebook_size
        self.semantic_code_dim = semantic_code_dim
        self.pixel_code_dim = pixel_code_dim
        self.downsample_factor = downsample_factor
        self.num_channels = num_channels
        self.image_size = image_size
        self.image_mean = list(image_mean) if image_mean is not None else [0.5] * num_channels
        self.image_std = list(image_std) if image_std is not None else [0.5] * num_channels
        self.hidden_channels = hidden_channels
        num_levels = int(math.log2(downsample_factor)) + 1 if downsample_factor > 0 else 0
        self.channel_multipliers = (
            list(channel_multipliers)
            if channel_multipliers is not None
            else [min(2**i, 4) for i in range(num_levels)]
        )
        self.num_res_blocks = num_res_blocks
        self.norm_num_groups = norm_num_groups
        self.semantic_hidden_size = semantic_hidden_size
        self.teacher_name_or_path = teacher_name_or_path
        if teacher_config is None and teacher_name_or_path is None:
            teacher_config = {
                **DEFAULT_TEACHER_CONFIG,
                "image_size": image_size,
                "num_channels": num_channels,
            }
            teacher_config["patch_size"] = downsample_factor
        self.teacher_config = (
            teacher_config_without_dtype(teacher_config) if teacher_config is not None else None
        )
        self.teacher_feature_layer = teacher_feature_layer
        self.teacher_image_mean = list(teacher_image_mean) if teacher_image_mean is not None else None
        self.teacher_image_std = list(teacher_image_std) if teacher_image_std is not None else None
        self.freeze_teacher = freeze_teacher
        self.teacher_autocast_dtype = teacher_autocast_dtype
        self.codebook_update = codebook_update
        self.codebook_l2_normalize = codebook_l2_normalize
        self.semantic_distance_weight = semantic_distance_weight
        self.pixel_distance_weight = pixel_distance_weight
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_restart_interval = dead_code_restart_interval
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ValueError(f"DualCodebookConfig.{field}={getattr(self, field)!r}: expected {expected}")

        for field in (
            "codebook_size",
            "semantic_code_dim",
            "pixel_code_dim",
            "num_channels",
            "hidden_channels",
        ):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, "a positive integer")
        if self.codebook_size < 2:
            fail("codebook_size", "at least 2 entries")
        factor = self.downsample_factor
        if not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            fail("downsample_factor", "a power of two (1, 2, 4, 8, ...)")
        if len(self.channel_multipliers) != int(math.log2(factor)) + 1:
            fail("channel_multipliers", f"{int(math.log2(factor)) + 1} levels for downsample_factor={factor}")
        for width in [self.hidden_channels * m for m in self.channel_multipliers]:
            if width % self.norm_num_groups:
                fail("norm_num_groups", f"a divisor of every level's width (got width {width})")
        if self.image_size % factor:
            fail("image_size", f"a multiple of downsample_factor={factor}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            fail("image_mean", f"image_mean and image_std with num_channels={self.num_channels} values")
        if self.teacher_autocast_dtype not in TEACHER_AUTOCAST_DTYPES:
            fail("teacher_autocast_dtype", f"one of {TEACHER_AUTOCAST_DTYPES}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            fail("codebook_update", f"one of {CODEBOOK_UPDATES}")
        if not 0.0 < self.ema_decay < 1.0:
            fail("ema_decay", "a value in (0, 1)")
        if self.semantic_distance_weight < 0 or self.pixel_distance_weight < 0:
            fail("semantic_distance_weight", "non-negative distance weights")

    @property
    def grid_size(self) -> int:
        """Side of the token grid at the default `image_size`."""
        return self.image_size // self.downsample_factor

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> DualCodebookConfig:
        """A config from the registry of named sizes (:data:`NAMED_CONFIGS`), with field overrides."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown tokenizer config {name!r}: expected one of {sorted(NAMED_CONFIGS)}")
        kwargs = {**NAMED_CONFIGS[name], **overrides}
        if "image_size" in overrides and "teacher_config" not in overrides and kwargs.get("teacher_config"):
            # The built-in teacher follows the image size.
            kwargs["teacher_config"] = {**kwargs["teacher_config"], "image_size": overrides["image_size"]}
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> DualCodebookConfig:
        """The tiny config for unit tests everywhere: 16 codes (Ds 8, Dp 4), 16 px images, downsample 4
        (4x4 grid), encoder width 16, a 2-layer ViT teacher of hidden size 32. A forward takes milliseconds."""
        return cls.named("tiny", **overrides)


_TINY_TEACHER = {
    **DEFAULT_TEACHER_CONFIG,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 16,
    "patch_size": 4,
}

# Named sizes: `tiny` for tests, `demo` for 32 px demo data on a CPU (8x8 grid), `base` for 256 px
# photographs with a pretrained DINOv2 teacher from the Hub (16x16 grid).
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "codebook_size": 16,
        "semantic_code_dim": 8,
        "pixel_code_dim": 4,
        "downsample_factor": 4,
        "image_size": 16,
        "hidden_channels": 16,
        "channel_multipliers": [1, 2, 2],
        "norm_num_groups": 4,
        "semantic_hidden_size": 32,
        "teacher_config": _TINY_TEACHER,
    },
    "demo": {
        "codebook_size": 1024,
        "semantic_code_dim": 32,
        "pixel_code_dim": 8,
        "downsample_factor": 4,
        "image_size": 32,
        "hidden_channels": 16,
        "channel_multipliers": [1, 2, 4],
        "norm_num_groups": 8,
        "semantic_hidden_size": 64,
        "teacher_config": {**DEFAULT_TEACHER_CONFIG},
    },
    "base": {
        "codebook_size": 16384,
        "semantic_code_dim": 32,
        "pixel_code_dim": 8,
        "downsample_factor": 16,
        "image_size": 256,
        "hidden_channels": 128,
        "channel_multipliers": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "norm_num_groups": 32,
        "semantic_hidden_size": 512,
        "teacher_name_or_path": "facebook/dinov2-small",
        "teacher_config": None,
        "teacher_image_mean": [0.485, 0.456, 0.406],
        "teacher_image_std": [0.229, 0.224, 0.225],
    },
}


__all__ = ["DEFAULT_TEACHER_CONFIG", "NAMED_CONFIGS", "DualCodebookConfig", "teacher_config_without_dtype"]
