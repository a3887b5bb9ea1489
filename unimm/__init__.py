"""unimm: unified multimodal autoregressive models.

One language model that understands images and generates them: a dual-codebook visual tokenizer
turns images into discrete tokens, any Hugging Face causal LM with an extended vocabulary models
interleaved image-text sequences, and a diffusion detokenizer turns generated tokens into pixels.

Importing ``unimm`` registers its configs and models with the transformers Auto classes (done by the
subpackages' ``__init__``); nothing else happens at import time.
"""

__version__ = "0.1.0.dev0"

from unimm.detokenizer import DetokenizerPipeline, TokenDiffusionDecoder
from unimm.llm import (
    ImageVocabulary,
    ModalitySampling,
    UniMMConfig,
    UniMMForCausalLM,
    UniMMProcessor,
    apply_lora,
    merge_lora,
)
from unimm.pipelines import UniMMPipeline
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer

__all__ = [
    "DetokenizerPipeline",
    "DualCodebookConfig",
    "DualCodebookImageProcessor",
    "DualCodebookTokenizer",
    "ImageVocabulary",
    "ModalitySampling",
    "TokenDiffusionDecoder",
    "UniMMConfig",
    "UniMMForCausalLM",
    "UniMMPipeline",
    "UniMMProcessor",
    "apply_lora",
    "merge_lora",
]
