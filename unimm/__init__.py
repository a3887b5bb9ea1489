"""unimm: unified multimodal autoregressive models.

One language model that understands images and generates them: a dual-codebook visual tokenizer
turns images into discrete tokens, any Hugging Face causal LM with an extended vocabulary models
interleaved image-text sequences, and a diffusion detokenizer turns generated tokens into pixels.

Importing ``unimm`` registers its configs and models with the transformers Auto classes (the
``unimm.llm`` and ``unimm.tokenizer`` subpackages do it when imported, so both are imported here); every
other public name is imported on first use, so the diffusion stack, peft and the data libraries load
only when a program needs them.
"""

from __future__ import annotations

from unimm.lazy import lazy_exports

# Imported for their side effect: they register UniMMConfig, UniMMForCausalLM, UniMMProcessor,
# DualCodebookConfig and DualCodebookTokenizer with the Auto classes.
from . import llm, tokenizer  # noqa: F401

__version__ = "0.1.0.dev0"

# public name -> the subpackage that defines it
_EXPORTS = {
    "DetokenizerPipeline": "detokenizer",
    "TokenDiffusionDecoder": "detokenizer",
    "DualCodebookConfig": "tokenizer",
    "DualCodebookImageProcessor": "tokenizer",
    "DualCodebookTokenizer": "tokenizer",
    "ImageVocabulary": "llm",
    "ModalitySampling": "llm",
    "UniMMConfig": "llm",
    "UniMMForCausalLM": "llm",
    "UniMMProcessor": "llm",
    "apply_lora": "llm",
    "merge_lora": "llm",
    "UniMMPipeline": "pipelines",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
