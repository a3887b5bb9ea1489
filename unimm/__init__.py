"""unimm: unified multimodal autoregressive models.

One language model that understands images and generates them: a dual-codebook visual tokenizer
turns images into discrete tokens, any Hugging Face causal LM with an extended vocabulary models
interleaved image-text sequences, and a diffusion detokenizer turns generated tokens into pixels.

Importing ``unimm`` registers its configs and models with the transformers Auto classes: the ``unimm.llm``
and ``unimm.tokenizer`` subpackages do it when imported, and ``import unimm`` imports them as soon as
transformers' Auto classes are imported (at once if they already are). So ``import unimm`` itself loads neither
torch nor transformers, and every public name is imported on first use.
"""

from __future__ import annotations

import importlib

from unimm.lazy import lazy_exports, when_imported


def _register_auto_classes() -> None:
    # Imported for their side effect: they register UniMMConfig, UniMMForCausalLM, UniMMProcessor,
    # DualCodebookConfig and DualCodebookTokenizer with the Auto classes.
    for subpackage in ("llm", "tokenizer"):
        importlib.import_module(f".{subpackage}", __name__)


when_imported("transformers.models.auto", _register_auto_classes)

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
