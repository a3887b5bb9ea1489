"""Configuration of the unified LLM: any Hugging Face causal LM plus an image vocabulary."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .vocabulary import ImageVocabulary


class UniMMConfig(PreTrainedConfig):
    r"""Configuration of :class:`~unimm.llm.UniMMForCausalLM`.

    Args:
        text_config: the config of the underlying causal LM (any ``AutoConfig`` model type). Its
            ``vocab_size`` is set to the extended size (text + image tokens), so the saved config rebuilds
            the extended model directly.
        text_vocab_size: number of text tokens; image tokens start at this id. Defaults to
            ``text_config.vocab_size`` when the text config has not been extended yet.
        codebook_size: entries of the visual tokenizer's codebook (one token each).
        max_grid_height, max_grid_width: largest image grid (in codes) the size tokens can write.
        default_grid_height, default_grid_width: grid used by image generation when none is requested.
        image_loss_weight: weight of the loss on image tokens relative to text tokens.

    Example::

        >>> from transformers import LlamaConfig
        >>> config = UniMMConfig(text_config=LlamaConfig(vocab_size=100), codebook_size=16)
        >>> config.text_config.vocab_size  # 100 text + 3 markers + size tokens + 16 codes
        183
    """

    model_type = "unimm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    text_vocab_size: int | None = None
    codebook_size: int = 16384
    max_grid_height: int = 32
    max_grid_width: int = 32
    default_grid_height: int = 16
    default_grid_width: int = 16
    image_loss_weight: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text_vocab = self.text_config.vocab_size
        if self.text_vocab_size is None:
            self.text_vocab_size = text_vocab
        vocabulary = ImageVocabulary.from_config(self)
        if text_vocab not in (self.text_vocab_size, vocabulary.vocab_size):
            raise ValueError(
                f"UniMMConfig: `text_config.vocab_size`={text_vocab} must be either the text vocabulary size "
                f"(`text_vocab_size`={self.text_vocab_size}) or the extended size {vocabulary.vocab_size}."
            )
        self.text_config.vocab_size = vocabulary.vocab_size
        vocabulary.check_grid(self.default_grid_height, self.default_grid_width, "default_grid_height/width")
        if self.image_loss_weight < 0:
            raise ValueError(f"UniMMConfig: `image_loss_weight` must be >= 0, got {self.image_loss_weight}.")
        # Tying lives in the text model; mirror it so tools reading the top-level flag see the truth.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def image_vocabulary(self) -> ImageVocabulary:
        return ImageVocabulary.from_config(self)


__all__ = ["UniMMConfig"]
