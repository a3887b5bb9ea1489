"""The unified LLM: any Hugging Face causal LM whose vocabulary is extended with image tokens.

The language model is built with ``AutoModelForCausalLM.from_config`` (or taken pretrained in
:meth:`UniMMForCausalLM.from_text_model`), so every backbone transformers knows fits. Image tokens live
after the text vocabulary, as laid out by :class:`~unimm.llm.vocabulary.ImageVocabulary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_unimm import UniMMConfig
from .generation import UniMMGenerationMixin, _cache_keywords
from .generation_request import resolve_eos_token_ids
from .vocabulary import ImageVocabulary

IGNORE_INDEX = -100


class _SharedPrefixCache(DynamicCache):
    """The KV cache of a shared prefix, for decoder layers compiled by region (one graph that every layer
    runs). Traced, the cache update guards on its layer's entry, so each layer would compile its own graph,
    past dynamo's recompile limit (8), after which the layers run eager: the update runs outside the graph,
    and :func:`_any_layer_index` keeps the layer index it is handed from being a guard."""

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _any_layer_index() -> Any:
    """Dynamo reads ``int`` attributes of modules (a layer's ``layer_idx``) as dynamic values, not as constants
    it guards on, for the calls made under this context."""
    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


@dataclass
class UniMMCausalLMOutput(CausalLMOutputWithPast):
    """Output of :meth:`UniMMForCausalLM.forward`: transformers' causal-LM output (``loss``, ``logits``, the
    KV cache, ``hidden_states``, ``attentions``; the cache field carries the installed transformers' name,
    so ``GenerationMixin.generate`` reads it) plus the loss per modality.

    Attributes:
        loss: weighted next-token loss ``(text_sum + image_loss_weight * image_sum) / n_tokens``.
        text_loss: mean loss on text targets (for logging; ``nan`` when there are none).
        image_loss: mean loss on image-vocabulary targets (for logging; ``nan`` when there are none).
        logits: ``(B, T, V)`` next-token logits over the extended vocabulary.
    """

    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None


class UniMMPreTrainedModel(PreTrainedModel):
    config_class = UniMMConfig
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Tying is declared by the wrapped language model; an (empty) dict here tells tools that collect the
    # nested declarations (peft's tied-adapter detection) to look inside.
    _tied_weights_keys: dict[str, str] = {}


class UniMMForCausalLM(UniMMGenerationMixin, UniMMPreTrainedModel, GenerationMixin):
    """A causal LM over interleaved text and image tokens.

    ``forward`` is the language model's forward with the loss split per modality; plain ``generate`` works
    for text; :meth:`generate_multimodal` is the constrained engine for text, images and interleaved output.
    """

    def __init__(self, config: UniMMConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self.vocabulary = ImageVocabulary.from_config(config)
        self.post_init()

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> PreTrainedModel:
        """The language model without its head (``LlamaModel``, ``GPT2Model``, ...)."""
        return self.language_model.base_model

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end a text answer when :meth:`generate_multimodal` is given none: the generation
        config's ``eos_token_id``, else the text config's (empty when neither has one)."""
        return resolve_eos_token_ids(self, None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_text_model(
        cls,
        text_model: str | PreTrainedModel,
        codebook_size: int,
        max_grid_height: int = 32,
        max_grid_width: int = 32,
        default_grid_height: int = 16,
        default_grid_width: int = 16,
        image_loss_weight: float = 1.0,
        codebook_vectors: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        seed: int = 0,
        **from_pretrained_kwargs,
    ) -> UniMMForCausalLM:
        """Extend a (pretrained) causal LM with the image vocabulary.

        ``text_model`` is a path/repo id (loaded with ``AutoModelForCausalLM.from_pretrained`` and
        ``from_pretrained_kwargs``) or a model instance, which is reused, not copied. New rows are
        mean-initialised (transformers' ``mean_resizing``); with ``codebook_vectors`` (a ``(K, D)`` tensor
        or the tokenizer's ``(semantic, pixel)`` pair) the code rows are then set from them, see
        :meth:`init_code_embeddings`."""
        if isinstance(text_model, str):
            text_model = AutoModelForCausalLM.from_pretrained(text_model, **from_pretrained_kwargs)
        elif from_pretrained_kwargs:
            raise ValueError(
                f"from_text_model: loading kwargs {sorted(from_pretrained_kwargs)} only apply when "
                "`text_model` is a path, not a model instance."
            )
        text_vocab_size = text_model.get_input_embeddings().num_embeddings
        config = UniMMConfig(
            text_config=text_model.config.to_dict(),
            text_vocab_size=text_vocab_size,
            codebook_size=codebook_size,
            max_grid_height=max_grid_height,
            max_grid_width=max_grid_width,
            default_grid_height=default_grid_height,
            default_grid_width=default_grid_width,
            image_loss_weight=image_loss_weight,
        )
        text_model.resize_token_embeddings(config.vocab_size, mean_resizing=True)
        config.text_config = text_model.config
        model = cls(config, language_model=text_model)
        if codebook_vectors is not None:
            model.init_code_embeddings(codebook_vectors, seed=seed)
        return model

    @torch.no_grad()
    def init_code_embeddings(
        self, codebook_vectors: torch.Tensor | tuple[torch.Tensor, ...], seed: int = 0
    ) -> None:
        """Initialise the code rows of the embedding (and untied head) from the codebook vectors.

        The standardised vectors go through a fixed random Gaussian projection to the hidden size, which
        keeps their pairwise geometry (Johnson-Lindenstrauss), so codes that look alike start close; the
        result is rescaled to the per-dimension mean and std of the text rows so it sits in-distribution."""
        if isinstance(codebook_vectors, (tuple, list)):
            codebook_vectors = torch.cat([torch.as_tensor(v) for v in codebook_vectors], dim=-1)
        vocabulary = self.vocabulary
        if codebook_vectors.ndim != 2 or codebook_vectors.shape[0] != vocabulary.codebook_size:
            raise ValueError(
                f"`codebook_vectors` must be ({vocabulary.codebook_size}, D) (one row per codebook entry), "
                f"got shape {tuple(codebook_vectors.shape)}."
            )
        vectors = codebook_vectors.detach().float().cpu()
        vectors = (vectors - vectors.mean(0)) / vectors.std(0).clamp_min(1e-6)  # (K, Dc)
        generator = torch.Generator().manual_seed(seed)
        matrices = [self.get_input_embeddings().weight]
        head = self.get_output_embeddings()
        if head is not None and head.weight is not matrices[0]:
            matrices.append(head.weight)
        hidden_size = matrices[0].shape[1]
        projection = torch.randn(vectors.shape[1], hidden_size, generator=generator) / math.sqrt(
            vectors.shape[1]
        )
        rows = vectors @ projection  # (K, D), about unit variance per dimension
        for matrix in matrices:
            text_rows = matrix[: vocabulary.text_vocab_size].float()
            init = text_rows.mean(0) + rows * text_rows.std(0)
            matrix[vocabulary.code_token_offset : vocabulary.vocab_size] = init.to(matrix)

    # ------------------------------------------------------------------ forward
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = True,
        shared_prefix_length: int = 0,
        **kwargs,
    ) -> UniMMCausalLMOutput:
        """Next-token prediction over the extended vocabulary.

        ``labels`` are aligned with ``input_ids`` (shifted here) and ``-100`` where no loss is taken.
        ``num_items_in_batch`` (transformers' gradient-accumulation convention) replaces the local token
        count as the loss denominator. ``return_logits=False`` (training, with ``labels``) runs the head only
        at positions that have a target: a chat sample trains on a few answer tokens, and the vocabulary
        projection and its cross-entropy over every position are a large share of a step. There,
        ``shared_prefix_length`` > 0 says that every row starts with the same so many tokens and has no target
        before the token after them (a chat template's system prompt): the prefix runs once, as one row whose
        keys and values every row attends to, for the same loss (see :meth:`_shared_prefix_forward`).
        The KV cache is passed on under the name the installed transformers' backbone takes."""
        cache_argument, _ = _cache_keywords(self.language_model)
        model_inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{cache_argument: cache},
            **kwargs,
        )
        if not return_logits and labels is not None:
            if 0 < shared_prefix_length < labels.shape[1] and len(labels) > 1:
                outputs = self._shared_prefix_forward(model_inputs, shared_prefix_length, cache_argument)
                labels = labels[:, shared_prefix_length:]  # the prefix holds no target
            else:
                outputs = self.language_model.get_decoder()(**model_inputs)
            shift_labels = labels[:, 1:].to(outputs.last_hidden_state.device)  # (B, T - 1)
            valid = shift_labels != IGNORE_INDEX
            hidden_states = outputs.last_hidden_state[:, :-1][valid]  # (N, D): positions with a target
            loss, text_loss, image_loss = self._modality_losses(
                self.compute_logits(hidden_states), shift_labels[valid], num_items_in_batch
            )
            # The shared prefix's cache is the step's own, not one the caller asked for.
            dropped = {"last_hidden_state", cache_argument} if shared_prefix_length else {"last_hidden_state"}
            passed = {name: value for name, value in outputs.items() if name not in dropped}
            return UniMMCausalLMOutput(loss=loss, text_loss=text_loss, image_loss=image_loss, **passed)
        outputs = self.language_model(**model_inputs, logits_to_keep=logits_to_keep)
        loss = text_loss = image_loss = None
        if labels is not None:
            loss, text_loss, image_loss = self.loss_per_modality(outputs.logits, labels, num_items_in_batch)
        # The language model's own fields (logits, cache, hidden_states, attentions) pass through by name.
        passed = {name: value for name, value in outputs.items() if name != "loss"}
        return UniMMCausalLMOutput(loss=loss, text_loss=text_loss, image_loss=image_loss, **passed)

    def _shared_prefix_forward(self, model_inputs: dict, prefix_length: int, cache_argument: str) -> Any:
        """The decoder's outputs for the tokens after a prefix that all rows share: the prefix runs as one
        row, its keys and values are expanded (a view) to every row, the rest attends to them as to a KV
        cache. Gradients flow back through the cache, summed over the rows, so the loss and its gradients
        are those of the full batch; the prefix's work is done once instead of once per row."""
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        if input_ids is None or model_inputs["position_ids"] is not None:
            raise ValueError("shared_prefix_length needs input_ids and no position_ids (unpacked rows)")
        decoder = self.language_model.get_decoder()
        extra = {
            key: value
            for key, value in model_inputs.items()
            if key not in ("input_ids", "attention_mask", "position_ids", "use_cache", cache_argument)
        }
        cache = _SharedPrefixCache(config=self.config.text_config)
        with _any_layer_index():
            prefix = decoder(
                input_ids=input_ids[:1, :prefix_length], use_cache=True, **{cache_argument: cache}, **extra
            )
        if getattr(prefix, cache_argument, None) is not cache or not cache.get_seq_length():
            # e.g. gradient checkpointing, under which transformers turns the cache off
            raise ValueError("shared_prefix_length needs the decoder's KV cache (no gradient checkpointing)")
        batch_size, length = input_ids.shape
        for layer in cache.layers:
            layer.keys = layer.keys.expand(batch_size, -1, -1, -1)  # (B, H, P, Dh), no copy
            layer.values = layer.values.expand(batch_size, -1, -1, -1)
        positions = torch.arange(prefix_length, length, device=input_ids.device).expand(batch_size, -1)
        with _any_layer_index():
            return decoder(
                input_ids=input_ids[:, prefix_length:],
                attention_mask=attention_mask,  # (B, T): the prefix's columns included
                position_ids=positions,  # (B, T - P)
                use_cache=True,
                **{cache_argument: cache},
                **extra,
            )

    def loss_per_modality(
        self,
        logits: torch.Tensor,
        labels: torch.LongTensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, text_loss, image_loss)`` of ``(B, T, V)`` logits against ``(B, T)`` unshifted labels."""
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"`labels` must have the shape of `input_ids` {tuple(logits.shape[:2])}, got {tuple(labels.shape)}."
            )
        shift_logits = logits[:, :-1].flatten(0, 1)  # (B * (T - 1), V)
        shift_labels = labels[:, 1:].flatten().to(logits.device)  # (B * (T - 1),)
        return self._modality_losses(shift_logits, shift_labels, num_items_in_batch)

    def _modality_losses(
        self,
        logits: torch.Tensor,
        targets: torch.LongTensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weighted loss and the per-modality means of ``(N, V)`` logits against ``(N,)`` targets."""
        token_loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
        valid = targets != IGNORE_INDEX
        is_image = self.vocabulary.is_image_token(targets) & valid
        is_text = valid & ~is_image
        text_sum = (token_loss * is_text).sum()
        image_sum = (token_loss * is_image).sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp_min(1)
        loss = (text_sum + self.config.image_loss_weight * image_sum) / denominator
        # Per-modality means are for logging; nan marks "no such targets in this batch".
        text_loss = (text_sum / is_text.sum()).detach()
        image_loss = (image_sum / is_image.sum()).detach()
        return loss, text_loss, image_loss

    # ------------------------------------------------------------------ logits for the decode loop
    def compute_logits(
        self, hidden_states: torch.Tensor, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Logits of the vocabulary slice ``[start, end)`` from final hidden states ``(..., D)``.

        The decode loop asks for the image slice only while every row is inside an image, which skips the
        text rows of the head. Final-logit soft-capping and logit scaling of the backbone are applied."""
        head = self.get_output_embeddings()
        # An offloaded head (accelerate's hook; device maps with "cpu"/"disk") holds meta weights between
        # calls: its hook loads them, and moves the inputs, only around a call, and this is not `head(...)`.
        hook = getattr(head, "_hf_hook", None)
        if hook is not None:
            (hidden_states,), _ = hook.pre_forward(head, hidden_states)
        weight = head.weight[start:end]
        bias = head.bias[start:end] if getattr(head, "bias", None) is not None else None
        logits = F.linear(hidden_states, weight, bias)
        if hook is not None:
            logits = hook.post_forward(head, logits)
        text_config = self.config.text_config
        if getattr(text_config, "logit_scale", None) is not None:
            logits = logits * text_config.logit_scale
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            cap = text_config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


__all__ = ["UniMMCausalLMOutput", "UniMMForCausalLM", "UniMMPreTrainedModel"]
