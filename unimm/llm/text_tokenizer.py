"""A word-level text tokenizer learned offline from a corpus, for small from-scratch language models.

The demo model and the random test pipelines have no pretrained text tokenizer to start from (no Hub), and
their text is a few thousand distinct words: a word-level vocabulary keeps sequences short and answers
readable. Text is lower-cased; a word carries the space before it (`` sneaker``), punctuation is its own
token, so decoding is concatenation and ``decode(encode(text)) == text.lower()`` for known words.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

UNKNOWN_EXAMPLES = 10  # words kept as examples of unknown tokens
UNKNOWN_BATCH_TEXTS = 1000  # texts tokenized at once when counting unknown tokens
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


def build_bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int, min_frequency: int = 1, chat_template: str = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learned from ``corpus``: no text is ever unknown (any byte is a token),
    case is kept, and ``decode(encode(text)) == text``. Same special tokens and chat template as
    :func:`~unimm.llm.text_tokenizer.build_word_level_tokenizer`, less its unknown token.

    Every piece of text between special tokens gets a leading space before it is split (and decoding drops
    the first one), so a word that opens a turn (``<|user|>sneaker``) is the same token as in mid-sentence
    (`` sneaker``): without it a bare class name is a token the model never saw after a chat marker."""
    specials = [token for token in SPECIAL_TOKENS if token != UNK]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
    tokenizer.chat_template = chat_template
    return tokenizer


@dataclass
class UnknownTokens:
    """How many text tokens of a corpus are the tokenizer's unknown token, with the words behind some."""

    count: int = 0
    total: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.count / self.total if self.total else 0.0

    def add(self, word: str) -> None:
        self.count += 1
        if word not in self.examples and len(self.examples) < UNKNOWN_EXAMPLES:
            self.examples.append(word)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total, "rate": self.rate, "examples": self.examples}


def measure_unknown_tokens(
    tokenizer: Any, texts: Iterable[str], batch_size: int = UNKNOWN_BATCH_TEXTS
) -> UnknownTokens:
    """Unknown tokens among the tokens of ``texts`` (none for a tokenizer without an unknown token)."""
    result, texts = UnknownTokens(), list(texts)
    for start in tqdm(range(0, len(texts), batch_size), desc="unknown text tokens", leave=False):
        _count_unknown(tokenizer, texts[start : start + batch_size], result)
    return result


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token; ``None`` when it has none or when that token doubles as
    BOS/EOS/padding (GPT-2-style byte-level tokenizers, which never produce it for text)."""
    unknown_id = tokenizer.unk_token_id
    others = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return None if unknown_id in others else unknown_id


def _count_unknown(tokenizer: Any, texts: list[str], result: UnknownTokens) -> None:
    unknown_id = unknown_token_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=unknown_id is not None)
    result.total += sum(map(len, encoded["input_ids"]))
    if unknown_id is None:
        return
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"]):
        for token, (start, end) in zip(ids, offsets):
            if token == unknown_id:
                result.add(text[start:end].strip())
