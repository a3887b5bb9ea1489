"""Text replay: a pretrained chat LM's own answers to general questions, mixed into multimodal fine-tuning.

Fine-tuning a chat LM only on image chats with terse answers ("a sneaker.") teaches it to answer *every*
question that way; its text skills collapse. Replaying chats whose answers are the base model's own greedy
replies (self-distillation) costs no outside data and pulls the tuned model back to its own text behaviour.

The questions are templates over a fixed list of everyday topics. None of them asks what the 20 text
questions of :mod:`unimm.evaluation.text_questions` ask: the topics avoid their subjects, and
:func:`overlaps_evaluation` drops any question whose content words overlap one of them by half or more, so
the score before and after tuning stays a measurement, not a training target.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from unimm.data.schema import TEXT

logger = logging.getLogger(__name__)

QUESTION_TEMPLATES = (
    "What is {topic}?",
    "Explain {topic} in one sentence.",
    "Tell me one interesting fact about {topic}.",
    "Describe {topic} briefly.",
    # Questions that invite a short reply, like most everyday questions (the longer ones above are often cut).
    "In a few words, what is {topic}?",
    "Where would you usually find {topic}?",
    "Why do people care about {topic}?",
)
# Everyday subjects that stay clear of the evaluation questions' (capitals, arithmetic, calendar, spiders,
# the sky, water, planets, oceans, Shakespeare, freezing, continents, hot/cold, photosynthesis).
TOPICS = (
    "bicycles", "libraries", "volcanoes", "honeybees", "bread", "umbrellas", "trains", "pianos", "forests",
    "deserts", "rivers", "mountains", "glaciers", "earthquakes", "rainbows", "thunderstorms", "magnets",
    "batteries", "light bulbs", "telescopes", "microscopes", "vaccines", "bones", "muscles", "the heart",
    "lungs", "sleep", "dreams", "memory", "languages", "alphabets", "poetry", "novels", "newspapers",
    "museums", "castles", "pyramids", "bridges", "skyscrapers", "roads", "airplanes", "ships", "submarines",
    "rockets", "satellites", "computers", "the internet", "email", "smartphones", "robots", "cameras",
    "printing presses", "clocks", "calendars of ancient Egypt", "coins", "banks", "markets", "farming",
    "rice", "wheat", "coffee", "tea", "chocolate", "cheese", "honey", "apples", "bananas", "tomatoes",
    "potatoes", "salt", "sugar", "vitamins", "exercise", "football", "tennis", "chess", "swimming",
    "the Olympic Games", "marathons", "dinosaurs", "elephants", "whales", "dolphins", "penguins", "owls",
    "eagles", "butterflies", "ants", "frogs", "snakes", "horses", "dogs", "cats", "wolves", "tigers",
    "lions", "bamboo", "mushrooms", "cacti", "seeds", "flowers", "soil", "fossils", "diamonds", "gold",
    "iron", "copper", "glass", "paper", "cotton", "wool", "silk", "plastic", "recycling", "wind turbines",
    "solar panels", "electricity", "sound", "music", "guitars", "violins", "drums", "painting",
    "sculpture", "photography", "cinema", "theatre", "dance", "maps", "compasses", "lighthouses",
    "friendship", "teachers", "schools", "universities", "hospitals", "doctors", "firefighters",
    "recipes", "kitchens", "ovens", "refrigerators", "gardens", "parks", "zoos", "birthdays", "holidays",
    "letters", "stamps", "puzzles", "board games", "kites", "balloons", "snowflakes", "fog", "wind",
)  # fmt: skip
_STOPWORDS = frozenset((
    "a", "an", "the", "is", "are", "was", "were", "what", "which", "who", "whom", "how", "many", "much",
    "do", "does", "did", "of", "in", "on", "at", "to", "for", "from", "by", "and", "or", "there", "their",
    "our", "we", "you", "your", "it", "its", "this", "that", "these", "those", "one", "me", "tell", "why",
))  # fmt: skip


def content_words(text: str) -> set[str]:
    """Lower-case words of ``text`` without stop words."""
    return {word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in _STOPWORDS}


def overlaps_evaluation(question: str, evaluation_questions: Iterable[str], threshold: float = 0.5) -> bool:
    """Whether ``question`` shares at least ``threshold`` of its content words (Jaccard) with one of
    ``evaluation_questions``."""
    words = content_words(question)
    for other in evaluation_questions:
        other_words = content_words(other)
        union = words | other_words
        if union and len(words & other_words) / len(union) >= threshold:
            return True
    return False


def replay_questions(
    evaluation_questions: Sequence[str] = (),
    topics: Sequence[str] = TOPICS,
    templates: Sequence[str] = QUESTION_TEMPLATES,
) -> list[str]:
    """Every template over every topic, minus any question that overlaps an evaluation question."""
    questions = [template.format(topic=topic) for topic in topics for template in templates]
    kept = [q for q in questions if not overlaps_evaluation(q, evaluation_questions)]
    if len(kept) < len(questions):
        logger.info(
            "text replay: %d questions dropped for overlapping the evaluation", len(questions) - len(kept)
        )
    return kept


def save_text_replay(chats: Sequence[dict[str, str]], path: str | Path) -> None:
    """One JSON object per line; written to a temporary file first so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(
        "".join(json.dumps(chat, ensure_ascii=False) + "\n" for chat in chats), encoding="utf-8"
    )
    partial.replace(path)


def load_text_replay(path: str | Path) -> list[dict[str, str]]:
    """The chats of :func:`save_text_replay`; a malformed line raises ``ValueError`` naming it."""
    chats = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            chat = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(chat, dict) or not all(
            isinstance(chat.get(key), str) for key in ("question", "answer")
        ):
            raise ValueError(
                f"{path}:{number}: expected {{'question': str, 'answer': str}}, got {line[:80]!r}"
            )
        chats.append(chat)
    return chats


def text_chat_sample(question: str, answer: str) -> dict:
    """A text-only chat in the sample schema: the loss falls on the answer."""
    return {
        "segments": [
            {"type": TEXT, "role": "user", "text": question},
            {"type": TEXT, "role": "assistant", "text": answer},
        ]
    }
