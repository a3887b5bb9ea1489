"""LoRA fine-tuning of the unified LLM with ``peft``, the image-token rows trainable, and merging back."""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model

from .modeling_unimm import UniMMForCausalLM

logger = logging.getLogger(__name__)


def _module_name(model: UniMMForCausalLM, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of the model.")


def apply_lora(
    model: UniMMForCausalLM,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
    train_new_token_rows: bool = True,
    **lora_kwargs,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters on its linear layers (``target_modules``, peft's syntax).

    With ``train_new_token_rows`` the rows of the image vocabulary (markers, size tokens, codes) in the input
    embedding and, when untied, in the output head are trained in full through peft's
    ``trainable_token_indices``, so a text LM learns to read and write images while its text rows stay
    frozen. ``lora_kwargs`` go to ``peft.LoraConfig``. The result trains like any peft model; see
    :func:`merge_lora` to fold it back into a plain :class:`UniMMForCausalLM`."""
    if not isinstance(model, UniMMForCausalLM):
        raise ValueError(f"`model` must be a UniMMForCausalLM, got {type(model).__name__}.")
    if r < 1:
        raise ValueError(f"`r` must be a positive int, got {r}.")
    trainable_token_indices = None
    if train_new_token_rows:
        vocabulary = model.vocabulary
        new_rows = list(range(vocabulary.text_vocab_size, vocabulary.vocab_size))
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        trainable_token_indices = {_module_name(model, embedding): new_rows}
        if head is not None and head.weight is not embedding.weight:
            trainable_token_indices[_module_name(model, head)] = new_rows
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        trainable_token_indices=trainable_token_indices,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d: %d of %d parameters trainable (%.2f%%)", r, trainable, total, 100 * trainable / total
    )
    return peft_model


def merge_lora(peft_model: PeftModel) -> UniMMForCausalLM:
    """Fold the adapters and trained token rows into the weights; returns the plain model."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"`peft_model` must be a peft PeftModel, got {type(peft_model).__name__}.")
    return peft_model.merge_and_unload()
