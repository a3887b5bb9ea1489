"""Pipelines over the three components: chat, image generation, interleaved output, reconstruction."""

from .pipeline_unimm import (
    ImagePreviewStreamer,
    UniMMChatOutput,
    UniMMImageOutput,
    UniMMInterleavedOutput,
    UniMMPipeline,
    UniMMReconstructionOutput,
)

__all__ = [
    "ImagePreviewStreamer",
    "UniMMChatOutput",
    "UniMMImageOutput",
    "UniMMInterleavedOutput",
    "UniMMPipeline",
    "UniMMReconstructionOutput",
]
