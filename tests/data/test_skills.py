"""Skills as data (unimm.data.skills) and several sources (unimm.data.sources): templates, settings, the plans
of every skill on made-up rows, the exact pixel edits, and labels read from a column."""

from __future__ import annotations

import random
from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest

from unimm.data.schema import image_segment, sample_features, text_segment
from unimm.data.skills import (
    ASSISTANT,
    COMPOSITION,
    DARKER,
    EDIT,
    INTERLEAVED,
    INVERT,
    MIRROR,
    MULTI_TURN,
    RELABEL,
    TALL,
    USER,
    WIDE,
    ImageRef,
    PhraseTemplate,
    SkillPlanner,
    SkillSettings,
    Thing,
    Wording,
    compose,
    draw_count,
    edit_pixels,
    subject_template,
    thing_fields,
)
from unimm.data.sources import SourceSpec, parse_sources, read_labels

# Two sources: garments (three classes, three rows each) and one emoji (a class of one row).
GARMENTS = ("sneaker", "bag", "ankle boot")
ROWS_PER_CLASS = 3
DRAWN = "what did you draw?"
ANOTHER = "draw another one like it"


def _things() -> list[Thing]:
    garment, emoji = (
        subject_template("{article} {label}", "s0"),
        subject_template("an emoji of {label}", "s1"),
    )
    things = [
        Thing(row, 0, label, thing_fields(f"a photo of {label}", label, garment))
        for row, label in enumerate(label for label in GARMENTS for _ in range(ROWS_PER_CLASS))
    ]
    return [*things, Thing(len(things), 1, "red heart", thing_fields("x", "red heart", emoji))]


def _wording(**values) -> Wording:
    return Wording.from_values(["[draw|show me] {subject}"], ["What is this?"], "{subject}.", **values)


def _planner(skills: dict, things: list[Thing] | None = None) -> SkillPlanner:
    settings = SkillSettings.from_value(skills)
    return SkillPlanner(things if things is not None else _things(), settings, _wording())


def _chats(skill: str, settings: dict | None = None, count: int = 300) -> tuple[SkillPlanner, list]:
    planner = _planner({skill: {"share": 1, **(settings or {})}})
    # Every row anchors several chats.
    return planner, planner.plan([index % len(planner.things) for index in range(count)], seed="test")


def _texts(chat) -> list[str]:
    return [content for _, content in chat.segments if isinstance(content, str)]


# --- templates --------------------------------------------------------------------------------------


def test_a_template_draws_each_alternative() -> None:
    template = PhraseTemplate("[please |][draw|show me] {subject}[.|!|]", "prompt", ("subject",))
    rng = random.Random(0)
    drawn = Counter(template.sample(rng, {"subject": "a bag"}) for _ in range(2000))
    assert set(drawn) == {
        f"{please}{verb} a bag{end}"
        for please in ("please ", "")
        for verb in ("draw", "show me")
        for end in (".", "!", "")
    }
    assert min(drawn.values()) > 2000 / 12 / 2  # roughly uniform


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[draw {subject}", "unbalanced or nested"),
        ("[draw [a|b]] {subject}", "unbalanced or nested"),
        ("draw {subjet}", "uses {subjet} (did you mean {subject}?)"),
        ("draw {0}", "uses {0}"),
        ("", "expected a non-empty template"),
    ],
)
def test_bad_templates_are_errors_that_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^prompt_templates") as error:
        Wording.from_values([text], ["What?"], "{subject}.")
    assert message in str(error.value)


def test_required_fields_must_be_in_every_drawn_text() -> None:
    template = PhraseTemplate("[draw {subject}|{label}]", "prompt", ("subject", "label"))
    assert not template.always(["subject"]) and template.always(["subject", "label"])
    with pytest.raises(ValueError, match=r"prompt: .* must always contain \{subject\} or \{label\}"):
        PhraseTemplate("[draw {subject}|draw it]", "prompt", ("subject", "label")).require(
            ("subject", "label")
        )
    template.require(("subject", "label"))  # one of the two in each alternative is enough


def test_a_subject_names_each_row_one_way() -> None:
    with pytest.raises(ValueError, match=r"sources\[0\]\.subject: .* may not offer \[alternatives\]"):
        subject_template("[a|the] {label}", "sources[0].subject")
    fields = thing_fields(
        " a photo of an ankle boot ", "ankle boot", subject_template("{article} {label}", "s")
    )
    assert fields == {
        "label": "ankle boot", "article": "an", "caption": "a photo of an ankle boot", "subject": "an ankle boot",
    }  # fmt: skip
    # Without a label the caption is the label.
    assert thing_fields("a red circle", None, subject_template("{caption}", "s"))["label"] == "a red circle"


def test_user_turns_change_case_by_share_and_answers_keep_one_full_stop() -> None:
    wording = _wording(upper_case_share=0.25, capitalize_share=0.25)
    rng = random.Random(0)
    prompts = Counter(wording.prompt({"subject": "a bag"}, rng) for _ in range(4000))
    upper = sum(count for prompt, count in prompts.items() if prompt.isupper())
    capital = sum(count for prompt, count in prompts.items() if prompt[0].isupper() and not prompt.isupper())
    assert abs(upper / 4000 - 0.25) < 0.03 and abs(capital / 4000 - 0.25) < 0.03
    assert wording.name({"subject": "A red circle."}, rng) == "A red circle."
    with pytest.raises(ValueError, match=r"upper_case_share must be in \[0, 1\]"):
        _wording(upper_case_share=1.5)


# --- settings ---------------------------------------------------------------------------------------


def test_a_share_alone_is_a_skill_with_its_default_templates() -> None:
    settings = SkillSettings.from_value({"edit": 0.25, "composition": {"share": 2, "layouts": [WIDE]}})
    assert [name for name, _ in settings.active()] == [EDIT, COMPOSITION]
    assert settings.edit.share == 0.25 and settings.edit.ops == [MIRROR, DARKER, INVERT, RELABEL]
    assert list(settings.composition.compiled) == [WIDE]
    assert "side by side" in "".join(settings.fragments())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"edits": 0.1}, "skills: unknown skill 'edits' (did you mean 'edit'?)"),
        ({"edit": {"shares": 0.1}}, "skills.edit: unknown key 'shares' (did you mean 'share'?)"),
        ({"edit": {"share": -1}}, "skills.edit.share must be a number >= 0"),
        ({"edit": {"share": 1, "ops": ["blur"]}}, "skills.edit.ops: unknown 'blur'"),
        ({"edit": {"share": 1, "darker_factor": 1.5}}, "skills.edit.darker_factor must be in (0, 1)"),
        ({"edit": {"share": 1, "relabel": ["turn it into something"]}}, "skills.edit.relabel[0]"),
        ({"multi_turn": {"share": 1, "min_turns": 1}}, "need 2 <= min_turns <= max_turns"),
        ({"composition": {"share": 1, "wide": ["{subject_1} alone"]}}, "must always contain {subject_2}"),
        (
            {"composition": {"share": 1, "layouts": ["square"]}},
            "skills.composition.layouts: unknown 'square'",
        ),
        ({"interleaved": {"share": 1, "answers": ["{image_2} then {image_1}"]}}, "{image_1} then {image_2}"),
        ({"interleaved": {"share": 1, "answers": ["{image_1}"]}}, "{image_1} then {image_2}, once each"),
        ({"interleaved": {"share": 1, "answers": ["[{image_1}|x]{image_2}"]}}, "outside [alternatives]"),
        ([0.1], "skills: expected a mapping"),
    ],
)
def test_bad_skill_settings_are_errors_that_name_the_field(value, message: str) -> None:
    with pytest.raises(ValueError) as error:
        SkillSettings.from_value(value)
    assert message in str(error.value)


def test_draw_count_averages_the_share() -> None:
    rng = random.Random(0)
    assert sum(draw_count(0.3, rng) for _ in range(10000)) == pytest.approx(3000, rel=0.05)
    assert {draw_count(2.0, rng) for _ in range(100)} == {2}
    assert {draw_count(0.0, rng) for _ in range(100)} == {0}


# --- plans ------------------------------------------------------------------------------------------


def test_shares_set_how_many_chats_each_anchor_draws() -> None:
    things = _things()[:-1]  # the garments: every anchor can be composed with another row
    planner = _planner({"edit": {"share": 0.5, "ops": [MIRROR]}, "composition": 1.0}, things)
    anchors = [index % len(things) for index in range(1000)]
    plan = planner.plan(anchors, seed="a")
    kinds = Counter(chat.kind for chat in plan.chats)
    assert kinds[COMPOSITION] == 1000 and abs(kinds[EDIT] - 500) < 60
    assert planner.plan(anchors, seed="a").chats == plan.chats  # the same seed, the same plan
    assert (
        _planner({"edit": {"share": 0.5, "ops": [MIRROR]}, "composition": 1.0}, things)
        .plan(anchors, seed="b")
        .chats
        != plan.chats
    )
    # A derived image is planned once, however many chats show it.
    assert len(plan.derived) == len(set(plan.derived)) < kinds[EDIT] + kinds[COMPOSITION]


def test_multi_turn_answers_depend_on_the_earlier_turns() -> None:
    planner, plan = _chats(MULTI_TURN, {"another": [ANOTHER], "what_drawn": [DRAWN]})
    things = planner.things
    turns = Counter()
    for chat in plan.chats:
        roles = [role for role, _ in chat.segments]
        # user turns (an image and a question, or a text) each followed by one assistant answer
        assert roles[-1] == ASSISTANT and roles.count(ASSISTANT) == int(chat.variant.split()[0])
        turns[chat.variant] += 1
        last_image: int | None = None
        drawn = None
        for index, (role, content) in enumerate(chat.segments):
            if role == USER and isinstance(content, ImageRef):
                last_image, drawn = content.index, None
            if role != ASSISTANT:
                continue
            request = chat.segments[index - 1][1]
            if isinstance(content, ImageRef):
                thing = things[content.index]
                if request == ANOTHER:  # same class, another row
                    assert thing.key == things[last_image].key and content.index != last_image
                elif last_image is not None:  # "now draw <another class>": named, and of another class
                    assert thing.fields["subject"] in request and thing.key != things[last_image].key
                else:  # the opening request
                    assert thing.fields["subject"] in request
                last_image, drawn = content.index, content.index
            elif request == DRAWN:
                assert drawn is not None and content == things[drawn].fields["subject"] + "."
                drawn = None
            else:  # the opening question about a shown image
                assert content == things[last_image].fields["subject"] + "."
    assert set(turns) == {"2 turns", "3 turns", "4 turns"}


def test_interleaved_answers_show_two_classes_in_the_order_asked() -> None:
    planner, plan = _chats(INTERLEAVED, {"requests": ["show me {subject_1} and {subject_2}"]})
    assert plan.chats
    for chat in plan.chats:
        (role, request), *answer = chat.segments
        images = [content.index for _, content in answer if isinstance(content, ImageRef)]
        first, second = (planner.things[index] for index in images)
        assert role == USER and request == f"show me {first.fields['subject']} and {second.fields['subject']}"
        assert first.key != second.key and first.source == second.source
        assert {role for role, _ in answer} == {ASSISTANT}
        # text, image, text, image: each image named before it, in order
        texts = _texts(chat)[1:]
        assert first.fields["subject"] in texts[0] and second.fields["subject"] in texts[1]
        assert [isinstance(content, ImageRef) for _, content in answer] == [False, True, False, True]
    # The emoji has no other class in its source: it is never in a two-class chat.
    shown = {
        planner.things[c.index].source
        for chat in plan.chats
        for _, c in chat.segments
        if isinstance(c, ImageRef)
    }
    assert shown == {0}


def test_edits_are_derived_from_the_shown_image_or_another_class() -> None:
    instructions = {MIRROR: ["mirror it"], DARKER: ["make it darker"], INVERT: ["invert"],
                    RELABEL: ["turn it into {subject}"]}  # fmt: skip
    planner, plan = _chats(EDIT, instructions)
    ops = Counter()
    for chat in plan.chats:
        (_, shown), (_, instruction), (role, result) = chat.segments
        assert isinstance(shown, ImageRef) and not shown.derived and role == ASSISTANT
        ops[chat.variant] += 1
        if chat.variant == RELABEL:
            target = planner.things[result.index]
            assert not result.derived and instruction == f"turn it into {target.fields['subject']}"
            assert target.key != planner.things[shown.index].key
        else:
            assert instruction == instructions[chat.variant][0]
            assert plan.derived[result.index] == (chat.variant, (shown.index,))
    assert set(ops) == {MIRROR, DARKER, INVERT, RELABEL}


def test_compositions_name_both_images_in_their_order() -> None:
    planner, plan = _chats(
        COMPOSITION, {"wide": ["{subject_1} left of {subject_2}"], "tall": ["{subject_1} above {subject_2}"]}
    )
    layouts = Counter()
    for chat in plan.chats:
        (_, prompt), (role, image) = chat.segments
        op, (first, second) = plan.derived[image.index]
        assert role == ASSISTANT and image.derived and op == chat.variant
        word = "left of" if op == WIDE else "above"
        assert (
            prompt
            == f"{planner.things[first].fields['subject']} {word} {planner.things[second].fields['subject']}"
        )
        assert first != second and planner.things[first].source == planner.things[second].source
        layouts[op] += 1
    assert set(layouts) == {WIDE, TALL}


def test_a_source_of_one_row_plans_what_it_can() -> None:
    (emoji,) = [thing for thing in _things() if thing.source == 1]
    planner = _planner({"interleaved": 1, "composition": 1, "edit": 1, "multi_turn": 1}, [emoji])
    plan = planner.plan([0] * 50, seed="one")
    kinds = Counter(chat.kind for chat in plan.chats)
    # No second class or row: no interleaved answer, no composition, no relabel; a conversation only when it
    # opens with a drawing ("what did you draw?" follows).
    assert set(kinds) == {EDIT, MULTI_TURN} and RELABEL not in {chat.variant for chat in plan.chats}
    assert all(chat.variant == "2 turns" for chat in plan.chats if chat.kind == MULTI_TURN)


# --- pixels -----------------------------------------------------------------------------------------


def test_pixel_edits_are_exact() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # (H, W, C)
    assert (edit_pixels(pixels, MIRROR) == pixels[:, ::-1]).all()
    assert (edit_pixels(pixels, INVERT) == 255 - pixels).all()
    darker = edit_pixels(pixels, DARKER, 0.5)
    assert darker.dtype == np.uint8 and (darker == np.rint(pixels / 2)).all()
    with pytest.raises(ValueError, match="unknown edit 'blur'"):
        edit_pixels(pixels, "blur")
    with pytest.raises(ValueError, match=r"expected \(H, W, C\) uint8"):
        edit_pixels(pixels.astype(np.float32), MIRROR)


def test_compositions_put_the_first_image_left_or_on_top() -> None:
    first, second = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    wide, tall = compose([first, second], WIDE), compose([first, second], TALL)
    assert wide.shape == (4, 8, 3) and (wide[:, :4] == 0).all() and (wide[:, 4:] == 255).all()
    assert tall.shape == (8, 4, 3) and (tall[:4] == 0).all() and (tall[4:] == 255).all()
    with pytest.raises(ValueError, match="equal height"):
        compose([first, np.zeros((2, 4, 3), np.uint8)], WIDE)


# --- sources ----------------------------------------------------------------------------------------


def test_sources_parse_with_their_defaults() -> None:
    fashion, emoji, folder = parse_sources(
        [
            {
                "dataset": "fashion_mnist",
                "label_column": "label",
                "label_names": ["t-shirt", "pair of trousers"],
            },
            {"dataset": "emoji", "label_column": "name", "subject": "an emoji of {label}", "repeats": 16},
            {"dataset": {"path": "data/pictures"}},
        ]
    )
    assert fashion == SourceSpec(
        dataset="fashion_mnist", name="fashion_mnist", label_column="label",
        label_names=("t-shirt", "pair of trousers"), subject="{article} {label}",
    )  # fmt: skip
    assert (emoji.repeats, emoji.subject) == (16, "an emoji of {label}")
    assert (folder.name, folder.subject, folder.label_column) == ("pictures", "{caption}", None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "sources: expected a non-empty list"),
        ([{"dataset": "emoji", "repeat": 2}], "sources[0]: unknown key 'repeat' (did you mean 'repeats'?)"),
        ([{"name": "x"}], "sources[0]: missing `dataset`"),
        ([{"dataset": "emoji", "repeats": 0}], "sources[0].repeats must be a whole number >= 1"),
        ([{"dataset": "emoji", "label_names": ["a"]}], "sources[0].label_names needs label_column"),
        ([{"dataset": "emoji", "subject": "{label}"}], "uses {label}: set label_column"),
        ([{"dataset": "emoji"}, {"dataset": "emoji"}], "the name 'emoji' is given to two sources"),
        ([{"dataset": {"paht": "x"}}], "sources[0].dataset: unknown key 'paht'"),
    ],
)
def test_bad_sources_are_errors_that_name_the_field(value, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_sources(value)
    assert message in str(error.value)


def _labelled_rows(labels, feature) -> datasets.Dataset:
    rows = {
        "segments": [
            [image_segment(PIL.Image.new("RGB", (2, 2))), text_segment(f"c{i}")] for i in range(len(labels))
        ],
        "label": labels,
    }
    return datasets.Dataset.from_dict(rows, features=sample_features(label=feature))


def test_labels_are_read_as_names() -> None:
    names = datasets.ClassLabel(names=["t_shirt", "ankle_boot"])
    rows = _labelled_rows([0, 1, -1], names)
    source = SourceSpec(dataset="x", name="x", label_column="label")
    assert read_labels(rows, source, "sources[0]") == ["t shirt", "ankle boot", None]  # -1: no label
    renamed = SourceSpec(dataset="x", name="x", label_column="label", label_names=("top", "boot"))
    assert read_labels(rows, renamed, "sources[0]") == ["top", "boot", None]
    texts = _labelled_rows(["red_heart", None], datasets.Value("string"))
    assert read_labels(texts, source, "sources[0]") == ["red heart", None]
    numbers = _labelled_rows([0, 2], datasets.Value("int64"))
    with pytest.raises(
        ValueError, match=r"sources\[0\]\.label_column 'label' holds integers: give label_names"
    ):
        read_labels(numbers, source, "sources[0]")
    with pytest.raises(ValueError, match=r"sources\[0\]\.label_names: 2 names, but the column holds label 2"):
        read_labels(numbers, renamed, "sources[0]")
    missing = SourceSpec(dataset="x", name="x", label_column="class")
    with pytest.raises(ValueError, match=r"label_column 'class': no such column"):
        read_labels(rows, missing, "sources[0]")
