"""Image processor of the dual-codebook tokenizer (PIL/numpy backend, no torchvision).

Images become `pixel_values` whose height and width are multiples of the tokenizer's downsampling
factor: either resized to a fixed `size`, or (with `size=None` or `{"shortest_edge": n}`) kept at their
own aspect ratio and snapped to the nearest grid multiple.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, get_image_size
from transformers.processing_utils import ImagesKwargs

from .configuration_dual_codebook import DualCodebookConfig


class DualCodebookImageProcessorKwargs(ImagesKwargs, total=False):
    """downsample_factor: height and width of the output are multiples of it."""

    downsample_factor: int


class DualCodebookImageProcessor(PilBackend):
    r"""Resize (or snap to the token grid), convert to RGB (L and RGBA too; alpha over white), rescale to [0, 1]
    and normalise. `postprocess` turns `pixel_values` (e.g. `DualCodebookTokenizer.decode` output) back
    into PIL images.

    `size` is `{"height": H, "width": W}` (multiples of `downsample_factor`), `{"shortest_edge": n}`
    (aspect ratio kept, then snapped), or `None` (each image's own size, snapped)."""

    valid_kwargs = DualCodebookImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 32, "width": 32}
    downsample_factor = 4
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def from_tokenizer_config(cls, config: DualCodebookConfig, **kwargs: Any) -> DualCodebookImageProcessor:
        """The processor matching a tokenizer config (its training size, grid and normalisation)."""
        defaults = {
            "size": {"height": config.image_size, "width": config.image_size},
            "downsample_factor": config.downsample_factor,
            "image_mean": list(config.image_mean),
            "image_std": list(config.image_std),
            "do_convert_rgb": config.num_channels == 3,
        }
        return cls(**{**defaults, **kwargs})

    def snapped_size(
        self, height: int, width: int, size: SizeDict | None, downsample_factor: int
    ) -> tuple[int, int]:
        """Output (height, width) of an input image: the target size, or its own aspect ratio snapped."""
        factor = downsample_factor
        if size is not None and size.height and size.width:
            if size.height % factor or size.width % factor:
                raise ValueError(
                    f"size {size.height}x{size.width}: expected multiples of downsample_factor={factor}"
                )
            return size.height, size.width
        if size is not None and size.shortest_edge:
            scale = size.shortest_edge / min(height, width)
            height, width = height * scale, width * scale

        def snap(value: float) -> int:
            return max(factor, int(round(value / factor)) * factor)

        return snap(height), snap(width)

    def _validate_preprocess_kwargs(
        self, size: SizeDict | None = None, do_resize: bool | None = None, **kwargs: Any
    ):
        # size=None is valid here: it means "keep each image's size, snapped to the grid".
        super()._validate_preprocess_kwargs(
            size=size, do_resize=bool(do_resize and size is not None), **kwargs
        )

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict | None,
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: str | None,
        downsample_factor: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        factor = downsample_factor or self.downsample_factor
        processed = []
        for image in images:
            height, width = get_image_size(image, channel_dim=ChannelDimension.FIRST)
            target = self.snapped_size(height, width, size if do_resize else None, factor)
            if target != (height, width):
                image = self.resize(image, SizeDict(height=target[0], width=target[1]), resample=resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.astype(np.float32))
        shapes = {image.shape for image in processed}
        if return_tensors and len(shapes) > 1:
            raise ValueError(
                f"images snapped to different sizes {sorted(shapes)} cannot be stacked into one tensor: pass a "
                "fixed size={'height': H, 'width': W}, or return_tensors=None and process them one by one"
            )
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def postprocess(
        self,
        pixel_values: torch.Tensor | np.ndarray,
        output_type: str = "pil",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
    ) -> list[PIL.Image.Image] | np.ndarray:
        """Normalised `pixel_values` (B, C, H, W) -> PIL images (`output_type="pil"`) or uint8 (B, H, W, C)."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type={output_type!r}: expected 'pil' or 'np'")
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().float().cpu().numpy()
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values of shape {pixel_values.shape}: expected (B, C, H, W)")
        mean = np.asarray(image_mean if image_mean is not None else self.image_mean, dtype=np.float32)
        std = np.asarray(image_std if image_std is not None else self.image_std, dtype=np.float32)
        images = pixel_values * std[None, :, None, None] + mean[None, :, None, None]  # (B, C, H, W) in [0, 1]
        images = (
            (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)
        )  # (B, H, W, C)
        if output_type == "np":
            return images
        return [PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in images]


__all__ = ["DualCodebookImageProcessor"]
