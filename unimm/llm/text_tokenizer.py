"""A word-level text tokenizer learned offline from a corpus, for small from-scratch language models.

The demo model and the random test pipelines have no pretrained text tokenizer to start from (no Hub), and
their text is a few thousand distinct words: a word-level vocabulary keeps sequences short and answers
readable. Text is lower-cased; a word carries the space before it (`` sneaker``), punctuation is its own
token, so decoding is concatenation and ``decode(encode(text)) == text.lower()`` for known words.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORD_PATTERN = r"\s?\w+|\s?[^\w\s]|\s+"  # a word or one punctuation mark, each with its leading space
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHAT_ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *(f"<|{role}|>" for role in CHAT_ROLES), END_OF_TURN)
# Prefix-stable (rendering one more turn only appends), as UniMMProcessor's loss masks need; no spaces
# around the markers, so each piece of text between them is tokenized exactly as written.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_word_level_tokenizer(
    corpus: Iterable[str], min_frequency: int = 1, chat_template: str = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``corpus`` seen ``min_frequency``
    times: ids 0-3 are pad/BOS/EOS/unk, then the chat markers, then the words by frequency."""
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency, show_progress=False
    )
    # Every word with and without its leading space: a word may open a turn or continue a sentence.
    variants = (variant for text in corpus for variant in (" " + text, *text.split()))
    backend.train_from_iterator(variants, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[4:])})
    tokenizer.chat_template = chat_template
    return tokenizer


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_word_level_tokenizer"]
