"""Free-text answers scored against reference answers or captions, as the understanding task does.

Both sides are normalised first (SQuAD's rule): lower case, punctuation deleted ("t-shirt" becomes
"tshirt" on both sides), the articles "a", "an" and "the" dropped, whitespace collapsed. Then

- **exact match**: the normalised answer equals a normalised reference;
- **contains**: one normalised side occurs in the other as whole words ("a red circle" contains
  "red circle", but "cat" does not contain "category"); an empty answer contains nothing;
- **F1**: SQuAD's per-word F1, the harmonic mean of the precision and recall of the answer's words
  against the reference's (a multiset overlap, so repeated words count as often as both sides have them).

With several references an answer gets the best score over them, each metric on its own.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

ARTICLES = re.compile(r"\b(a|an|the)\b")
# ASCII punctuation and every Unicode punctuation character (curly quotes, dashes) are removed.
_PUNCTUATION_CATEGORY = "P"


def normalize_answer(text: str) -> str:
    """Lower case, punctuation deleted, articles removed, whitespace collapsed (SQuAD's normalisation)."""
    text = text.lower()
    # Deleted, not spaced, as SQuAD does: "apple's" -> "apples", "t-shirt" -> "tshirt".
    text = "".join(
        char
        for char in text
        if char not in string.punctuation and not unicodedata.category(char).startswith(_PUNCTUATION_CATEGORY)
    )
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> bool:
    return normalize_answer(answer) == normalize_answer(reference)


def contains_match(answer: str, reference: str) -> bool:
    """Whether the normalised reference occurs in the normalised answer, or the answer in the reference,
    as whole words; false when either side is empty after normalisation."""
    answer, reference = normalize_answer(answer), normalize_answer(reference)
    if not answer or not reference:
        return False
    padded_answer, padded_reference = f" {answer} ", f" {reference} "  # spaces make matches whole words
    return padded_reference in padded_answer or padded_answer in padded_reference


def token_f1(answer: str, reference: str) -> float:
    """SQuAD per-word F1 of the normalised answer against the normalised reference; 1.0 when both are
    empty, 0.0 when only one is."""
    answer_words, reference_words = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not answer_words or not reference_words:
        return float(answer_words == reference_words)
    common = sum((Counter(answer_words) & Counter(reference_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def score_answer(answer: str, references: str | Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "contains", "f1"}`` of one answer, each the best over ``references``."""
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError("score_answer needs at least one reference")
    return {
        "exact_match": float(any(exact_match(answer, reference) for reference in references)),
        "contains": float(any(contains_match(answer, reference) for reference in references)),
        "f1": max(token_f1(answer, reference) for reference in references),
    }


__all__ = ["contains_match", "exact_match", "normalize_answer", "score_answer", "token_f1"]
