"""The dual-codebook visual tokenizer (shared indices, semantic + pixel codebooks), and its training loss.

Importing this package registers `DualCodebookConfig`, `DualCodebookTokenizer` and
`DualCodebookImageProcessor` with `AutoConfig`, `AutoModel` and `AutoImageProcessor`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_dual_codebook import DualCodebookConfig
from .image_processing_dual_codebook import DualCodebookImageProcessor
from .losses import DualCodebookLoss, DualCodebookLossOutput
from .modeling_dual_codebook import (
    DualCodebookEmbeddingOutput,
    DualCodebookPreTrainedModel,
    DualCodebookTokenizer,
    DualCodebookTokenizerOutput,
)

AutoConfig.register(DualCodebookConfig.model_type, DualCodebookConfig, exist_ok=True)
AutoModel.register(DualCodebookConfig, DualCodebookTokenizer, exist_ok=True)
AutoImageProcessor.register(
    DualCodebookConfig, slow_image_processor_class=DualCodebookImageProcessor, exist_ok=True
)

__all__ = [
    "DualCodebookConfig",
    "DualCodebookEmbeddingOutput",
    "DualCodebookImageProcessor",
    "DualCodebookLoss",
    "DualCodebookLossOutput",
    "DualCodebookPreTrainedModel",
    "DualCodebookTokenizer",
    "DualCodebookTokenizerOutput",
]
