"""Diffusion detokenizer: image token ids → images with a diffusers denoiser and pipeline."""

from .modeling_token_diffusion import (
    TokenDiffusionCondition,
    TokenDiffusionDecoder,
    TokenDiffusionDecoderOutput,
)
from .pipeline_detokenizer import DetokenizerPipeline, DetokenizerPipelineOutput

__all__ = [
    "DetokenizerPipeline",
    "DetokenizerPipelineOutput",
    "TokenDiffusionCondition",
    "TokenDiffusionDecoder",
    "TokenDiffusionDecoderOutput",
]
