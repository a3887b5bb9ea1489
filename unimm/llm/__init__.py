"""The unified LLM: any Hugging Face causal LM with an image vocabulary, its processor and generation.

Importing this package registers :class:`UniMMConfig` and :class:`UniMMForCausalLM` with
``AutoConfig`` / ``AutoModelForCausalLM`` (and the processor with ``AutoProcessor``), so saved models load
with the standard Auto classes and no ``trust_remote_code``.

Typical use::

    model = UniMMForCausalLM.from_text_model("path/to/lm", codebook_size=tokenizer.config.codebook_size,
                                             codebook_vectors=tokenizer.get_codebook_vectors())
    processor = UniMMProcessor.from_config(model.config, text_tokenizer, image_processor, vq_model=tokenizer)
    batch = processor(messages=[{"role": "user", "content": "draw a cat"}], add_generation_prompt=True,
                      return_unconditional=True, padding_side="left")
    output = model.generate_multimodal(
        batch["input_ids"], attention_mask=batch["attention_mask"], mode="image", image_grid=(16, 16),
        guidance_scale=3.0, unconditional_input_ids=batch["unconditional_input_ids"],
        unconditional_attention_mask=batch["unconditional_attention_mask"], seed=0)
    pixels = tokenizer.decode(output.image_token_ids[0][0][None])

Training: ``model(input_ids, attention_mask, labels)`` returns ``loss`` plus ``text_loss`` / ``image_loss``;
:func:`apply_lora` / :func:`merge_lora` wrap and fold LoRA with the image-token rows trainable.
"""

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from .configuration_unimm import UniMMConfig
from .generation import UniMMGenerationOutput
from .modeling_unimm import UniMMCausalLMOutput, UniMMForCausalLM, UniMMPreTrainedModel
from .processing_unimm import UniMMProcessor
from .sampling import ModalitySampling
from .vocabulary import ImageVocabulary

AutoConfig.register(UniMMConfig.model_type, UniMMConfig, exist_ok=True)
AutoModelForCausalLM.register(UniMMConfig, UniMMForCausalLM, exist_ok=True)
AutoProcessor.register(UniMMConfig, UniMMProcessor, exist_ok=True)

__all__ = [
    "ImageVocabulary",
    "ModalitySampling",
    "UniMMCausalLMOutput",
    "UniMMConfig",
    "UniMMForCausalLM",
    "UniMMGenerationOutput",
    "UniMMPreTrainedModel",
    "UniMMProcessor",
    "apply_lora",
    "merge_lora",
]


def __getattr__(name: str) -> Any:
    # LoRA needs peft, which only training and LoRA users should pay for at import.
    if name in ("apply_lora", "merge_lora"):
        from . import lora

        return getattr(lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
