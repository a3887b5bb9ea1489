"""Unified skills as data: the chats that teach multi-turn conversation, interleaved answers, image edits and
compositions at other aspect ratios, planned from labelled image-caption rows.

``unimm prepare`` turns each captioned image into its two pair chats (``unimm.data.templates``); on top of
those a recipe's ``skills`` mapping asks for a share of extra chats per row, each worded by templates:

- ``multi_turn``: 2-4 turns mixing a question about a shown image, "draw <thing>", "draw another one like it"
  (answered by another image of the same class), "what did you draw?" (answered with the last drawn image's
  name) and "now draw <another class>"; every assistant turn is trained, and each answer depends on earlier
  turns;
- ``interleaved``: "Show me X and Y." answered by text and two images, in the order asked;
- ``edit``: image in, image out: ``mirror``, ``darker`` and ``invert`` are exact transforms of the pixels the
  model sees, ``relabel`` ("turn it into Y") is answered by an image of class Y;
- ``composition``: two images side by side (``wide``) or stacked (``tall``) drawn from a prompt that names
  both in order; the assistant writes the wide or tall grid's size tokens.

A row's *class* is its label (a source's ``label_column``) or, without one, its caption. Templates name a
row by ``{subject}`` (its source's naming, e.g. "an emoji of red heart"), ``{label}``, ``{article}`` ("a"/"an"
for the label) and ``{caption}``; templates about two rows add ``_1`` / ``_2`` to these names. A template may
offer alternatives in square brackets, one drawn per use: ``"[please |][draw|show me|make] {subject}[.|!|]"``.

Planning (:class:`SkillPlanner`) is pure Python over row descriptions (:class:`Thing`): images are
references to rows (:class:`ImageRef`) or to images derived from rows' pixels (:class:`DerivedImage`), which
the caller computes (:func:`edit_pixels`, :func:`compose`), encodes and puts in place.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

# Skills, in the order a row draws them.
MULTI_TURN, INTERLEAVED, EDIT, COMPOSITION = "multi_turn", "interleaved", "edit", "composition"
SKILLS = (MULTI_TURN, INTERLEAVED, EDIT, COMPOSITION)
# Edits: exact transforms of the pixels, and a class change.
MIRROR, DARKER, INVERT, RELABEL = "mirror", "darker", "invert", "relabel"
PIXEL_EDITS = (MIRROR, DARKER, INVERT)
EDITS = (*PIXEL_EDITS, RELABEL)
# Compositions: the first image on the left (wide) or on top (tall).
WIDE, TALL = "wide", "tall"
LAYOUTS = (WIDE, TALL)
# Multi-turn moves.
ASK, DRAW, ANOTHER, WHAT_DRAWN, DRAW_OTHER = "ask", "draw", "another", "what_drawn", "draw_other"
USER, ASSISTANT = "user", "assistant"

# What a template may say about one row, and about two (``subject_1`` ... ``caption_2``).
THING_FIELDS = ("subject", "label", "article", "caption")
PAIR_FIELDS = tuple(f"{name}_{index}" for index in (1, 2) for name in THING_FIELDS)
IMAGE_FIELDS = ("image_1", "image_2")
SUBJECT_FIELDS = ("label", "article", "caption")  # what a source's subject template may use
ALTERNATIVES = re.compile(r"\[([^\[\]]*)\]")
IMAGE_MARK = "\x00"  # stands for an image while an answer template is split into text and images

DEFAULT_ANOTHER = (
    "[draw|make|show me] another one[ like it| like that|][.|!|]",
    "[one more|another one][, please|][.|!|]",
)
DEFAULT_WHAT_DRAWN = ("[what did you draw|what is it|what is that|what did you make][?|]",)
DEFAULT_DRAW_OTHER = (
    "[now |and now |][draw|make|show me] {subject}[.|!|]",
    "[now |]{subject}[, please|][.|]",
)
DEFAULT_REQUESTS = (
    "[show me|draw|give me|make] {subject_1} and {subject_2}[.|!|]",
    "{subject_1} and {subject_2}[, please|][.|]",
)
DEFAULT_INTERLEAVED_ANSWERS = (
    "Here is {subject_1}:{image_1}and here is {subject_2}:{image_2}",
    "{subject_1}:{image_1}{subject_2}:{image_2}",
)
DEFAULT_EDIT_INSTRUCTIONS = {
    MIRROR: ("[mirror it|flip it horizontally|mirror the image|make it face the other way][.|]",),
    DARKER: ("[make it darker|darken it|make the image darker][.|]",),
    INVERT: ("[invert the colours|invert the colors|invert it|make it a negative][.|]",),
    RELABEL: ("[turn it into|change it into|make it into] {subject}[.|]",),
}
DEFAULT_COMPOSITION_PROMPTS = {
    WIDE: (
        "[draw |show me |]{subject_1} next to {subject_2}[.|]",
        "[draw |]{subject_1} and {subject_2} side by side[.|]",
        "{subject_1} on the left and {subject_2} on the right[.|]",
    ),
    TALL: (
        "[draw |show me |]{subject_1} above {subject_2}[.|]",
        "[draw |]{subject_1} on top of {subject_2}[.|]",
        "{subject_1} over {subject_2}[.|]",
    ),
}
DEFAULT_DARKER_FACTOR = 0.5  # "darker": every channel of every pixel times this, rounded


# --- templates --------------------------------------------------------------------------------------


class PhraseTemplate:
    """A ``str.format`` template whose ``[a|b|c]`` groups offer alternatives, one drawn per use (``[a|]``:
    optional). ``where`` names the recipe field in errors; ``fields`` are the names it may use."""

    def __init__(self, text: str, where: str, fields: Collection[str]) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: expected a non-empty template string, got {text!r}")
        self.text, self.where = text, where
        self.pieces: list[str | tuple[str, ...]] = []
        position = 0
        for match in ALTERNATIVES.finditer(text):
            self.pieces.append(text[position : match.start()])
            self.pieces.append(tuple(match.group(1).split("|")))
            position = match.end()
        self.pieces.append(text[position:])
        if any("[" in piece or "]" in piece for piece in self.pieces if isinstance(piece, str)):
            raise ValueError(f"{where}: {text!r} has an unbalanced or nested '[' ... ']' group")
        used: set[str] = set()
        for fragment in self.fragments():
            used |= self._fields_of(fragment, fields)
        self.fields = frozenset(used)

    def _fields_of(self, fragment: str, allowed: Collection[str]) -> set[str]:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(fragment) if name is not None}
        except ValueError as error:
            raise ValueError(
                f"{self.where}: {self.text!r}: {error} (write {{{{ for a literal brace)"
            ) from None
        for name in names:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {{{close[0]}}}?)" if close else ""
                raise ValueError(
                    f"{self.where}: {self.text!r} uses {{{name}}}{hint}; it may use {sorted(allowed)}"
                )
        return names

    def fragments(self) -> list[str]:
        """Every literal piece and every alternative (the words the template can write)."""
        return [text for piece in self.pieces for text in ((piece,) if isinstance(piece, str) else piece)]

    def always(self, group: Collection[str]) -> bool:
        """Whether every drawn text holds a field of ``group``: a literal piece does, or every alternative
        of one ``[...]`` group does."""
        wanted = set(group)
        for piece in self.pieces:
            options = [piece] if isinstance(piece, str) else list(piece)
            if all(wanted & _field_names(text) for text in options):
                return True
        return False

    @property
    def has_alternatives(self) -> bool:
        return any(not isinstance(piece, str) for piece in self.pieces)

    def require(self, *groups: Collection[str]) -> PhraseTemplate:
        """Refuse the template unless every text it draws holds one field of each group."""
        for group in groups:
            if not self.always(group):
                shown = " or ".join(f"{{{name}}}" for name in group)
                raise ValueError(f"{self.where}: {self.text!r} must always contain {shown}")
        return self

    def sample(self, rng: random.Random, values: Mapping[str, str]) -> str:
        chosen = "".join(piece if isinstance(piece, str) else rng.choice(piece) for piece in self.pieces)
        return chosen.format_map(values)


def _field_names(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def templates(
    values: str | Sequence[str], where: str, fields: Collection[str], *required: Collection[str]
) -> list[PhraseTemplate]:
    """A recipe's list of templates (a single string is a list of one), each checked."""
    items = [values] if isinstance(values, str) else list(values)
    if not items:
        raise ValueError(f"{where}: expected at least one template")
    return [PhraseTemplate(text, f"{where}[{i}]", fields).require(*required) for i, text in enumerate(items)]


def one_line(text: str) -> str:
    """Whitespace as one space, none at the ends (alternatives such as ``[please |]`` leave doubles)."""
    return " ".join(text.split())


def article(word: str) -> str:
    """ "an" before a vowel letter, else "a" (spelling, not sound: "a unicorn" reads "an unicorn")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


# --- rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thing:
    """One labelled image-caption row as skills see it: ``key`` is its class within its ``source``."""

    row: int  # the row's position in its split's encoded table
    source: int
    key: str
    fields: Mapping[str, str]  # THING_FIELDS


def thing_fields(caption: str, label: str | None, subject: PhraseTemplate) -> dict[str, str]:
    """The template fields of a row: its label (the caption when it has none), article and subject."""
    caption = caption.strip()
    name = label.strip() if label else caption
    values = {"label": name, "article": article(name), "caption": caption}
    return {**values, "subject": one_line(subject.sample(random.Random(0), values))}


def subject_template(text: str, where: str) -> PhraseTemplate:
    """A source's naming of its rows ("{article} {label}"): one name per row, so no alternatives."""
    template = PhraseTemplate(text, where, SUBJECT_FIELDS).require(SUBJECT_FIELDS)
    if template.has_alternatives:
        raise ValueError(f"{where}: {text!r} may not offer [alternatives]: each row has one name")
    return template


def numbered(fields: Mapping[str, str], index: int) -> dict[str, str]:
    return {f"{name}_{index}": value for name, value in fields.items()}


# --- settings ---------------------------------------------------------------------------------------


@dataclass
class Wording:
    """How user turns and answers read, shared by the pair chats and every skill.

    ``prompts`` ask for an image (fields of one row), ``questions`` ask about a shown image, ``answer`` names
    a row (its fields with any final "." removed, so "{caption}." never doubles it). A user turn is upper-cased
    with probability ``upper_case_share``, else capitalised with ``capitalize_share``."""

    prompts: list[PhraseTemplate]
    questions: list[PhraseTemplate]
    answer: PhraseTemplate
    upper_case_share: float = 0.0
    capitalize_share: float = 0.0

    @classmethod
    def from_values(
        cls,
        prompts: Sequence[str],
        questions: Sequence[str],
        answer: str,
        upper_case_share: float = 0.0,
        capitalize_share: float = 0.0,
    ) -> Wording:
        for name, share in (("upper_case_share", upper_case_share), ("capitalize_share", capitalize_share)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        return cls(
            prompts=templates(prompts, "prompt_templates", THING_FIELDS, THING_FIELDS),
            questions=templates(questions, "questions", ()),
            answer=PhraseTemplate(answer, "answer_template", THING_FIELDS).require(THING_FIELDS),
            upper_case_share=upper_case_share,
            capitalize_share=capitalize_share,
        )

    def user(self, template: PhraseTemplate, rng: random.Random, values: Mapping[str, str]) -> str:
        text = one_line(template.sample(rng, values))
        draw = rng.random()
        if draw < self.upper_case_share:
            return text.upper()
        if draw < self.upper_case_share + self.capitalize_share:
            return text[:1].upper() + text[1:]
        return text

    def prompt(self, fields: Mapping[str, str], rng: random.Random) -> str:
        return self.user(rng.choice(self.prompts), rng, fields)

    def question(self, rng: random.Random) -> str:
        return self.user(rng.choice(self.questions), rng, {})

    def name(self, fields: Mapping[str, str], rng: random.Random) -> str:
        """The answer naming a row."""
        return one_line(self.answer.sample(rng, {key: value.rstrip(".") for key, value in fields.items()}))

    def fragments(self) -> list[str]:
        return [
            text
            for group in (self.prompts, self.questions, [self.answer])
            for t in group
            for text in t.fragments()
        ]


@dataclass
class MultiTurnSkill:
    """Conversations of ``min_turns`` to ``max_turns`` turns (a user message and its answer each)."""

    share: float = 0.0
    min_turns: int = 2
    max_turns: int = 4
    open_with_question: float = 0.5  # else the first turn asks for an image
    another: list[str] = field(default_factory=lambda: list(DEFAULT_ANOTHER))
    what_drawn: list[str] = field(default_factory=lambda: list(DEFAULT_WHAT_DRAWN))
    draw_other: list[str] = field(default_factory=lambda: list(DEFAULT_DRAW_OTHER))

    compiled: dict[str, list[PhraseTemplate]] = field(default_factory=dict, init=False, repr=False)

    def check(self, where: str) -> None:
        if not 2 <= self.min_turns <= self.max_turns:
            raise ValueError(
                f"{where}: need 2 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}"
            )
        if not 0.0 <= self.open_with_question <= 1.0:
            raise ValueError(f"{where}.open_with_question must be in [0, 1], got {self.open_with_question}")
        self.compiled = {
            ANOTHER: templates(self.another, f"{where}.another", ()),
            WHAT_DRAWN: templates(self.what_drawn, f"{where}.what_drawn", ()),
            DRAW_OTHER: templates(self.draw_other, f"{where}.draw_other", THING_FIELDS, THING_FIELDS),
        }


@dataclass
class InterleavedSkill:
    """A request for two things answered by text and their two images, in the order asked."""

    share: float = 0.0
    requests: list[str] = field(default_factory=lambda: list(DEFAULT_REQUESTS))
    answers: list[str] = field(default_factory=lambda: list(DEFAULT_INTERLEAVED_ANSWERS))

    compiled: dict[str, list[PhraseTemplate]] = field(default_factory=dict, init=False, repr=False)

    def check(self, where: str) -> None:
        first, second = ([f"{name}_{i}" for name in THING_FIELDS] for i in (1, 2))
        self.compiled = {
            "requests": templates(self.requests, f"{where}.requests", PAIR_FIELDS, first, second)
        }
        answers = templates(self.answers, f"{where}.answers", (*PAIR_FIELDS, *IMAGE_FIELDS))
        for template in answers:
            literal = "".join(piece for piece in template.pieces if isinstance(piece, str))
            in_groups = [
                f
                for piece in template.pieces
                if not isinstance(piece, str)
                for f in IMAGE_FIELDS
                if f"{{{f}}}" in "".join(piece)
            ]
            positions = [literal.find(f"{{{name}}}") for name in IMAGE_FIELDS]
            counts = [literal.count(f"{{{name}}}") for name in IMAGE_FIELDS]
            if in_groups or counts != [1, 1] or positions[0] > positions[1]:
                raise ValueError(
                    f"{template.where}: {template.text!r} must hold {{image_1}} then {{image_2}}, once each and "
                    "outside [alternatives]"
                )
        self.compiled["answers"] = answers


@dataclass
class EditSkill:
    """An image and an instruction answered by the edited image (see the module docstring)."""

    share: float = 0.0
    ops: list[str] = field(default_factory=lambda: list(EDITS))
    darker_factor: float = DEFAULT_DARKER_FACTOR
    mirror: list[str] = field(default_factory=lambda: list(DEFAULT_EDIT_INSTRUCTIONS[MIRROR]))
    darker: list[str] = field(default_factory=lambda: list(DEFAULT_EDIT_INSTRUCTIONS[DARKER]))
    invert: list[str] = field(default_factory=lambda: list(DEFAULT_EDIT_INSTRUCTIONS[INVERT]))
    relabel: list[str] = field(default_factory=lambda: list(DEFAULT_EDIT_INSTRUCTIONS[RELABEL]))

    compiled: dict[str, list[PhraseTemplate]] = field(default_factory=dict, init=False, repr=False)

    def check(self, where: str) -> None:
        _check_choices(self.ops, EDITS, f"{where}.ops")
        if not 0.0 < self.darker_factor < 1.0:
            raise ValueError(f"{where}.darker_factor must be in (0, 1), got {self.darker_factor}")
        self.compiled = {
            op: templates(getattr(self, op), f"{where}.{op}", ()) for op in PIXEL_EDITS if op in self.ops
        }
        if RELABEL in self.ops:  # names the class it turns into
            self.compiled[RELABEL] = templates(self.relabel, f"{where}.relabel", THING_FIELDS, THING_FIELDS)


@dataclass
class CompositionSkill:
    """Two rows' images in one, side by side (``wide``) or stacked (``tall``), from a prompt naming both."""

    share: float = 0.0
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    wide: list[str] = field(default_factory=lambda: list(DEFAULT_COMPOSITION_PROMPTS[WIDE]))
    tall: list[str] = field(default_factory=lambda: list(DEFAULT_COMPOSITION_PROMPTS[TALL]))

    compiled: dict[str, list[PhraseTemplate]] = field(default_factory=dict, init=False, repr=False)

    def check(self, where: str) -> None:
        _check_choices(self.layouts, LAYOUTS, f"{where}.layouts")
        first, second = ([f"{name}_{i}" for name in THING_FIELDS] for i in (1, 2))
        self.compiled = {
            layout: templates(getattr(self, layout), f"{where}.{layout}", PAIR_FIELDS, first, second)
            for layout in self.layouts
        }


SKILL_CLASSES = {
    MULTI_TURN: MultiTurnSkill,
    INTERLEAVED: InterleavedSkill,
    EDIT: EditSkill,
    COMPOSITION: CompositionSkill,
}


def _check_choices(values: Sequence[str], allowed: Sequence[str], where: str) -> None:
    if not values:
        raise ValueError(f"{where}: expected some of {list(allowed)}")
    for value in values:
        if value not in allowed:
            raise ValueError(f"{where}: unknown {value!r}; expected some of {list(allowed)}")


@dataclass
class SkillSettings:
    """A recipe's ``skills`` mapping: per skill its ``share`` (extra chats per row: 0.25 is one for every
    fourth row, 2 is two per row) and its templates. ``{edit: 0.1}`` is short for ``{edit: {share: 0.1}}``."""

    multi_turn: MultiTurnSkill = field(default_factory=MultiTurnSkill)
    interleaved: InterleavedSkill = field(default_factory=InterleavedSkill)
    edit: EditSkill = field(default_factory=EditSkill)
    composition: CompositionSkill = field(default_factory=CompositionSkill)

    @classmethod
    def from_value(cls, value: Mapping[str, Any] | None, where: str = "skills") -> SkillSettings:
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping of skill: share or settings, got {value!r}")
        settings = {}
        for name, item in value.items():
            if name not in SKILL_CLASSES:
                close = difflib.get_close_matches(str(name), SKILLS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}: unknown skill {name!r}{hint}; expected some of {list(SKILLS)}")
            settings[name] = _parse_skill(SKILL_CLASSES[name], item, f"{where}.{name}")
        return cls(**settings)

    def active(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in SKILLS if getattr(self, name).share > 0]

    def fragments(self) -> list[str]:
        return [
            text
            for _, skill in self.active()
            for group in skill.compiled.values()
            for template in group
            for text in template.fragments()
        ]


def _parse_skill(skill_class: type, value: Any, where: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"share": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a share or a mapping of settings, got {value!r}")
    known = [item.name for item in dataclasses.fields(skill_class)]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; expected some of {known}")
    skill = skill_class(**value)
    if not isinstance(skill.share, (int, float)) or isinstance(skill.share, bool) or skill.share < 0:
        raise ValueError(f"{where}.share must be a number >= 0, got {skill.share!r}")
    skill.check(where)
    return skill


# --- plans ------------------------------------------------------------------------------------------


class ImageRef(NamedTuple):
    """An image of a planned chat: a row's own (``derived=False``, ``index`` a :class:`Thing`'s) or a
    derived one (``index`` into :attr:`SkillPlan.derived`)."""

    index: int
    derived: bool = False


class DerivedImage(NamedTuple):
    """An image computed from rows' pixels: ``op`` one of ``PIXEL_EDITS`` (one thing) or ``LAYOUTS`` (two)."""

    op: str
    things: tuple[int, ...]


class PlannedChat(NamedTuple):
    """A chat of one skill: ``(role, text or ImageRef)`` segments; ``variant`` says which form it took."""

    kind: str
    variant: str
    segments: tuple[tuple[str, str | ImageRef], ...]

    def texts(self) -> list[str]:
        return [content for _, content in self.segments if isinstance(content, str)]


@dataclass
class SkillPlan:
    chats: list[PlannedChat] = field(default_factory=list)
    derived: list[DerivedImage] = field(default_factory=list)

    def variants(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter] = defaultdict(Counter)
        for chat in self.chats:
            counts[chat.kind][chat.variant] += 1
        return {kind: dict(sorted(counts[kind].items())) for kind in sorted(counts)}


def draw_count(share: float, rng: random.Random) -> int:
    """``share`` on average: its whole part, plus one with the probability of its fraction."""
    whole = int(share)
    return whole + (rng.random() < share - whole)


class SkillPlanner:
    """Plans the skill chats of one split's labelled rows (``things``)."""

    def __init__(self, things: Sequence[Thing], settings: SkillSettings, wording: Wording) -> None:
        self.things, self.settings, self.wording = things, settings, wording
        self.by_class: dict[tuple[int, str], list[int]] = defaultdict(list)
        for index, thing in enumerate(things):
            self.by_class[(thing.source, thing.key)].append(index)
        classes: dict[int, set[str]] = defaultdict(set)
        for source, key in self.by_class:
            classes[source].add(key)
        self.classes = {source: sorted(keys) for source, keys in classes.items()}
        self.source_rows: dict[int, list[int]] = defaultdict(list)
        for index, thing in enumerate(things):
            self.source_rows[thing.source].append(index)
        self._derived: dict[DerivedImage, int] = {}

    def plan(self, anchors: Iterable[int], seed: str) -> SkillPlan:
        """Each anchor (an index of ``things``; repeated rows appear repeatedly) draws its chats from its own
        generator (``seed`` and its position), so a plan does not depend on how it is computed."""
        builders = {MULTI_TURN: self.multi_turn, INTERLEAVED: self.interleaved, EDIT: self.edit,
                    COMPOSITION: self.composition}  # fmt: skip
        active = self.settings.active()
        chats = []
        for position, anchor in enumerate(anchors):
            rng = random.Random(f"{seed}:{position}")
            for name, skill in active:
                for _ in range(draw_count(skill.share, rng)):
                    chat = builders[name](anchor, rng)
                    if chat is not None:
                        chats.append(chat)
        return SkillPlan(chats, list(self._derived))

    # -- picking rows ------------------------------------------------------------------------------

    def another_of_class(self, index: int, rng: random.Random) -> int | None:
        """Another row of the same class (not ``index`` itself), if there is one."""
        thing = self.things[index]
        rows = self.by_class[(thing.source, thing.key)]
        if len(rows) < 2:
            return None
        choice = rng.randrange(len(rows) - 1)
        return rows[choice] if rows[choice] != index else rows[-1]

    def of_other_class(self, index: int, rng: random.Random) -> int | None:
        """A row of another class of the same source, if the source has another class."""
        thing = self.things[index]
        keys = self.classes[thing.source]
        if len(keys) < 2:
            return None
        key = keys[rng.randrange(len(keys) - 1)]
        if key == thing.key:
            key = keys[-1]
        return rng.choice(self.by_class[(thing.source, key)])

    def derived(self, op: str, things: tuple[int, ...]) -> ImageRef:
        image = DerivedImage(op, things)
        return ImageRef(self._derived.setdefault(image, len(self._derived)), derived=True)

    def fields(self, index: int) -> Mapping[str, str]:
        return self.things[index].fields

    # -- skills ------------------------------------------------------------------------------------

    def multi_turn(self, anchor: int, rng: random.Random) -> PlannedChat | None:
        skill, wording = self.settings.multi_turn, self.wording
        turns = rng.randint(skill.min_turns, skill.max_turns)
        if rng.random() < skill.open_with_question:
            segments = [(USER, ImageRef(anchor)), (USER, wording.question(rng)),
                        (ASSISTANT, wording.name(self.fields(anchor), rng))]  # fmt: skip
            drawn = False
        else:
            segments = [(USER, wording.prompt(self.fields(anchor), rng)), (ASSISTANT, ImageRef(anchor))]
            drawn = True
        last, done = anchor, 1
        while done < turns:
            moves = {ANOTHER: self.another_of_class(last, rng), DRAW_OTHER: self.of_other_class(last, rng)}
            options = [move for move in (ANOTHER, DRAW_OTHER) if moves[move] is not None]
            options += [WHAT_DRAWN] if drawn else []
            if not options:
                break
            move = rng.choice(options)
            template = rng.choice(skill.compiled[move])
            if move == WHAT_DRAWN:
                segments += [(USER, wording.user(template, rng, {})),
                             (ASSISTANT, wording.name(self.fields(last), rng))]  # fmt: skip
                drawn = False
            else:
                last = moves[move]
                values = self.fields(last) if move == DRAW_OTHER else {}
                segments += [(USER, wording.user(template, rng, values)), (ASSISTANT, ImageRef(last))]
                drawn = True
            done += 1
        if done < 2:
            return None
        return PlannedChat(MULTI_TURN, f"{done} turns", tuple(segments))

    def interleaved(self, anchor: int, rng: random.Random) -> PlannedChat | None:
        other = self.of_other_class(anchor, rng)
        if other is None:
            return None
        skill, wording = self.settings.interleaved, self.wording
        values = {**numbered(self.fields(anchor), 1), **numbered(self.fields(other), 2)}
        request = wording.user(rng.choice(skill.compiled["requests"]), rng, values)
        marks = {name: f"{IMAGE_MARK}{name}{IMAGE_MARK}" for name in IMAGE_FIELDS}
        answer = rng.choice(skill.compiled["answers"]).sample(rng, {**values, **marks})
        images = {"image_1": ImageRef(anchor), "image_2": ImageRef(other)}
        segments: list[tuple[str, str | ImageRef]] = [(USER, request)]
        for index, piece in enumerate(answer.split(IMAGE_MARK)):
            content = images[piece] if index % 2 else one_line(piece)
            if content:
                segments.append((ASSISTANT, content))
        return PlannedChat(INTERLEAVED, "two images", tuple(segments))

    def edit(self, anchor: int, rng: random.Random) -> PlannedChat | None:
        skill = self.settings.edit
        target = self.of_other_class(anchor, rng) if RELABEL in skill.ops else None
        ops = [op for op in skill.ops if op != RELABEL or target is not None]
        if not ops:
            return None
        op = rng.choice(ops)
        values = self.fields(target) if op == RELABEL else {}
        instruction = self.wording.user(rng.choice(skill.compiled[op]), rng, values)
        result = ImageRef(target) if op == RELABEL else self.derived(op, (anchor,))
        segments = ((USER, ImageRef(anchor)), (USER, instruction), (ASSISTANT, result))
        return PlannedChat(EDIT, op, segments)

    def composition(self, anchor: int, rng: random.Random) -> PlannedChat | None:
        other = self.of_other_class(anchor, rng)
        if other is None:  # one class: any other row of the source
            rows = self.source_rows[self.things[anchor].source]
            if len(rows) < 2:
                return None
            other = rows[rng.randrange(len(rows) - 1)]
            other = rows[-1] if other == anchor else other
        skill = self.settings.composition
        layout = rng.choice(skill.layouts)
        values = {**numbered(self.fields(anchor), 1), **numbered(self.fields(other), 2)}
        prompt = self.wording.user(rng.choice(skill.compiled[layout]), rng, values)
        image = self.derived(layout, (anchor, other))
        return PlannedChat(COMPOSITION, layout, ((USER, prompt), (ASSISTANT, image)))


# --- pixels -----------------------------------------------------------------------------------------


def edit_pixels(pixels: np.ndarray, op: str, darker_factor: float = DEFAULT_DARKER_FACTOR) -> np.ndarray:
    """The exact result of an edit on ``(H, W, C)`` uint8 pixels: mirrored left-right, every value times
    ``darker_factor`` (rounded), or inverted (``255 - value``)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"edit_pixels: expected (H, W, C) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if op == MIRROR:
        return np.ascontiguousarray(pixels[:, ::-1])
    if op == DARKER:
        return np.rint(pixels.astype(np.float64) * darker_factor).astype(np.uint8)
    if op == INVERT:
        return 255 - pixels
    raise ValueError(f"edit_pixels: unknown edit {op!r}; expected one of {PIXEL_EDITS}")


def compose(parts: Sequence[np.ndarray], layout: str) -> np.ndarray:
    """``(H, W, C)`` images side by side (``wide``: equal heights) or stacked (``tall``: equal widths), the
    first on the left or on top."""
    if layout not in LAYOUTS:
        raise ValueError(f"compose: unknown layout {layout!r}; expected one of {LAYOUTS}")
    axis = 1 if layout == WIDE else 0
    shapes = [np.shape(part) for part in parts]
    if len({shape[1 - axis] for shape in shapes}) != 1 or len({shape[2] for shape in shapes}) != 1:
        raise ValueError(
            f"compose: {layout} needs parts of equal {'height' if axis else 'width'}, got {shapes}"
        )
    return np.concatenate(parts, axis=axis)


__all__ = [
    "SKILLS",
    "DerivedImage",
    "ImageRef",
    "PhraseTemplate",
    "PlannedChat",
    "SkillPlan",
    "SkillPlanner",
    "SkillSettings",
    "Thing",
    "Wording",
    "compose",
    "edit_pixels",
    "subject_template",
    "thing_fields",
]
