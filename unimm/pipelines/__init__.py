"""Pipelines over the three components: chat, image generation, interleaved output, reconstruction."""

from .pipeline_unimm import (
    UniMMChatOutput,
    UniMMImageOutput,
    UniMMInterleavedOutput,
    UniMMPipeline,
    UniMMReconstructionOutput,
)

__all__ = [
    "UniMMChatOutput",
    "UniMMImageOutput",
    "UniMMInterleavedOutput",
    "UniMMPipeline",
    "UniMMReconstructionOutput",
]
