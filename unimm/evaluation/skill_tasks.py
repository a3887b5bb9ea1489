"""Evaluation tasks for the unified skills a model learns as data (:mod:`unimm.data.skills`): free-form prompt
wording, multi-turn chat, interleaved answers, image edits and wide or tall compositions (those two in
:mod:`unimm.evaluation.image_skill_tasks`), and naming what it was taught. Each task uses the public pipeline API only and judges images with a prompt judge
(:mod:`unimm.evaluation.prompt_judges`, default the Fashion-MNIST CNN)::

    from unimm.evaluation import TaskContext, run_tasks
    from unimm.evaluation.skill_tasks import EditTask, MultiTurnTask

    run_tasks(pipeline, [MultiTurnTask(limit=50), EditTask(limit=50)], TaskContext("outputs/eval-skills"))

The tasks speak about *classes*: ``classes`` lists them, each ``"name"`` or ``"name, other name, ..."`` (the
first is written in prompts; any counts when an answer names the class), and ``subject`` names one in a
sentence (``"{article} {label}"``). Wordings are templates of :class:`unimm.data.skills.PhraseTemplate`
(``{label}``, ``{article}``, ``{subject}``; ``_1``/``_2`` for two classes; ``[a|b]`` alternatives drawn by the
run's seed). The defaults are the demo recipe's vocabulary (``recipes/demo/prepare.yaml``: its Fashion-MNIST
label names, synonyms and skill templates), so pointing a task at another model means giving its classes, its
wordings and a judge that knows them.

A judge scores an image against the *subject* of the class it should show ("a sneaker"), never against the
prompt, so a wording's own words cannot change the verdict.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import PIL.Image

from .image_skill_tasks import CompositionTask, EditTask, halves, pixel_edit_metrics
from .prompt_judges import PromptJudge, load_prompt_judge
from .skill_base import (
    CLASS_FIELDS,
    DEFAULT_SKILL_LIMIT,
    GRID_PAIRS,
    PAIR_FIELDS,
    SkillDatasetTask,
    SkillTask,
    assistant,
    chat_answers,
    default_image_size,
    fill,
    first_image,
    images_of,
    letterboxed,
    phrase_template,
    records_of,
    reply_segments,
    save_grid,
    saved_paths,
    scores_of,
    share,
    user,
    verdict,
)
from .task_base import (
    GRID_IMAGES,
    NEUTRAL,
    EvalTask,
    TaskContext,
    TaskResult,
    annotated_grid,
    check_texts,
    generate_images,
    mean_or_nan,
    percent,
    write_outputs,
)
from .task_data import TaskExample
from .tasks import UnderstandingTask

DEMO_NAMING_DATASET = "emoji"  # what the demo model was taught to name
# Bare class names (a wording the recipe teaches) and paraphrases none of its templates writes.
DEFAULT_WORDINGS = (
    "{label}",
    "render {subject}",
    "I'd love a picture of {subject}",
    "generate {subject}",
    "can I see {subject}?",
    "draw me {subject} please",
    "I need {subject}",
    "how about {subject}?",
)
# The skill templates' plainest forms (unimm.data.skills DEFAULT_*).
DEFAULT_QUESTION = "What is this?"
DEFAULT_ANOTHER = "draw another one like it"
DEFAULT_DRAW = "draw {subject}"
DEFAULT_WHAT_DRAWN = "what did you draw?"
DEFAULT_DRAW_OTHER = "now draw {subject}"
DEFAULT_REQUEST = "Show me {subject_1} and {subject_2}."

# --- sizes and targets ------------------------------------------------------------------------------
DEFAULT_IMAGES_PER_PROMPT = 4  # per (wording, class): the lowest prompt's share moves in steps of 25%
DEFAULT_NUM_REQUESTS = 100  # drawn conversations, interleaved requests
DEFAULT_MAX_NEW_TOKENS = 16  # a text answer ("a pair of trousers.")
INTERLEAVED_TEXT_TOKENS = 64  # text around the two images of an interleaved answer
IMAGES_PER_INTERLEAVED_ANSWER = 2

# --- 1. prompt wording ------------------------------------------------------------------------------


def per_prompt_shares(scores: Sequence[bool], images_per_prompt: int) -> list[float]:
    """Share right per prompt, from scores listed prompt-major (``images_per_prompt`` each)."""
    return [
        float(np.mean(scores[start : start + images_per_prompt]))
        for start in range(0, len(scores), images_per_prompt)
    ]


@dataclass
class PromptWordingTask(SkillTask):
    """Every class asked for in every wording (bare names and paraphrases the model never saw), each prompt
    ``num_images_per_prompt`` times; judged class correctness per prompt, its mean and its minimum."""

    name: ClassVar[str] = "prompt_wording"
    wordings: list[str] = field(default_factory=lambda: list(DEFAULT_WORDINGS))
    num_images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {self.num_images_per_prompt}")
        self.templates = [
            phrase_template(text, f"wordings[{index}]", CLASS_FIELDS, CLASS_FIELDS)
            for index, text in enumerate(self.wordings or [])
        ]
        if not self.templates:
            raise ValueError("prompt_wording: expected at least one wording")

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        names, rng, count = self.class_names, self.rng(context), self.num_images_per_prompt
        # 1. One prompt per (wording, class), wording-major.
        keys = [(wording, index) for wording in range(len(self.templates)) for index in range(len(names))]
        prompts = [fill(self.templates[wording], names.fields(index), rng) for wording, index in keys]
        check_texts(pipeline, prompts, "prompts", context, warnings)
        # 2. Generate each prompt's images; judge them against their class's subject.
        images = generate_images(pipeline, [p for p in prompts for _ in range(count)], context, self.name)
        subjects = [names.fields(index)["subject"] for _, index in keys for _ in range(count)]
        scores = scores_of(load_prompt_judge(self.judge), images, subjects)
        shares = per_prompt_shares(scores, count)
        # 3. Records, and a grid of each prompt's first image, the worst prompts first.
        paths = saved_paths(context, self.key, "images", images)
        records = [
            {
                "index": index,
                "prompt": prompts[index // count],
                "wording": self.wordings[keys[index // count][0]],
            }
            | {"class": names.labels[keys[index // count][1]], "image": path, "right": right}
            for index, (path, right) in enumerate(zip(paths, scores))
        ]
        order = sorted(range(len(prompts)), key=lambda prompt: (shares[prompt], prompt))[:GRID_IMAGES]
        captions = [
            [(prompts[p], NEUTRAL), verdict(shares[p] >= 0.5, f"{percent(shares[p])} right")] for p in order
        ]
        grid = annotated_grid([images[p * count] for p in order], captions)
        files = write_outputs(context, self.key, records, grid)
        metrics = self._metrics(keys, prompts, shares)
        return replace(self._result(metrics, len(images)), files=files, warnings=warnings)

    def _metrics(
        self, keys: list[tuple[int, int]], prompts: list[str], shares: list[float]
    ) -> dict[str, Any]:
        lowest = min(range(len(shares)), key=lambda prompt: (shares[prompt], prompt))
        per_wording = {
            wording: mean_or_nan([s for (w, _), s in zip(keys, shares) if w == index])
            for index, wording in enumerate(self.wordings)
        }
        per_class = {
            label: mean_or_nan([s for (_, c), s in zip(keys, shares) if c == index])
            for index, label in enumerate(self.class_names.labels)
        }
        return {
            "mean": mean_or_nan(shares),
            "min": shares[lowest],
            "lowest_prompt": prompts[lowest],
            "per_wording": per_wording,
            "per_class": per_class,
            "per_prompt": dict(zip(prompts, shares)),
            "num_prompts": len(prompts),
            "num_images_per_prompt": self.num_images_per_prompt,
            "judge": self.judge,
        }

    def _result(self, metrics: dict[str, Any], num_images: int) -> TaskResult:
        per_prompt = str(self.num_images_per_prompt)
        per_wording = str(len(self.class_names) * self.num_images_per_prompt)
        table = [
            ("judged right, mean over prompts", percent(metrics["mean"]), str(num_images)),
            (
                f'judged right, lowest prompt ("{metrics["lowest_prompt"]}")',
                percent(metrics["min"]),
                per_prompt,
            ),
            *(
                (f'wording "{wording}"', percent(value), per_wording)
                for wording, value in metrics["per_wording"].items()
            ),
        ]
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{metrics['num_prompts']} prompts ({len(self.wordings)} wordings x {len(self.class_names)} "
            f"classes), {self.num_images_per_prompt} images each; judge: {self.judge}",
            metrics=metrics,
            table=table,
            notes=[
                "A prompt is one wording of one class; its figure is the share of its images the judge puts in "
                "that class (judged against the class's subject, not the prompt's words).",
                "The default wordings are a bare class name and paraphrases no template of the demo recipe writes.",
            ],
            summary=f"judged right: mean {percent(metrics['mean'])}, lowest {percent(metrics['min'])} "
            f'over prompts ("{metrics["lowest_prompt"]}"; {num_images} images)',
        )


# --- 2. multi-turn chat -----------------------------------------------------------------------------


@dataclass
class MultiTurnTask(SkillDatasetTask):
    """Conversations whose answer depends on an earlier turn.

    - *another*: a held-out image asked ``question``; after the model's own answer, ``another`` ("draw another
      one like it"): is the drawn image of the shown image's class?
    - *what drawn*: ``draw`` ("draw a bag") for ``num_drawn`` classes in turn; with the drawn image in the
      assistant turn, ``what_drawn`` ("what did you draw?"): does the answer name the class the judge sees in
      the image, and the class asked for?
    - *draw other*: after the same drawing, ``draw_other`` ("now draw a coat") for another class: judged right?
    """

    name: ClassVar[str] = "multi_turn"
    question: str = DEFAULT_QUESTION
    another: str = DEFAULT_ANOTHER
    draw: str = DEFAULT_DRAW
    what_drawn: str = DEFAULT_WHAT_DRAWN
    draw_other: str = DEFAULT_DRAW_OTHER
    num_drawn: int = DEFAULT_NUM_REQUESTS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_drawn < 1:
            raise ValueError(f"num_drawn must be at least 1, got {self.num_drawn}")
        self.templates = {
            "question": phrase_template(self.question, "question", ()),
            "another": phrase_template(self.another, "another", ()),
            "draw": phrase_template(self.draw, "draw", CLASS_FIELDS, CLASS_FIELDS),
            "what_drawn": phrase_template(self.what_drawn, "what_drawn", ()),
            "draw_other": phrase_template(self.draw_other, "draw_other", CLASS_FIELDS, CLASS_FIELDS),
        }

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        examples, description = self.examples(pipeline, context, warnings)
        judge, rng = load_prompt_judge(self.judge), self.rng(context)
        another = self._another(pipeline, context, examples, judge, rng, warnings)
        drawn = self._drawn(pipeline, context, judge, rng, warnings)
        records = [{"part": "another"} | record for record in another.pop("records")]
        records += [{"part": "what_drawn"} | record for record in drawn.pop("records")]
        files = write_outputs(context, self.key, records, another.pop("grid"))
        files["what drawn"] = save_grid(context, self.key, "what_drawn_grid.png", drawn.pop("grid"))
        return replace(self._result(another | drawn, description), files=files, warnings=warnings)

    def _another(
        self,
        pipeline: Any,
        context: TaskContext,
        examples: list[TaskExample],
        judge: PromptJudge,
        rng: random.Random,
        warnings: list[str],
    ) -> dict[str, Any]:
        # 1. The shown image asked the question; then "draw another one like it" after the model's own answer.
        questions = [fill(self.templates["question"], {}, rng) for _ in examples]
        requests = [fill(self.templates["another"], {}, rng) for _ in examples]
        check_texts(pipeline, questions + requests, "questions and requests", context, warnings)
        openings = [[user(q, example.image)] for q, example in zip(questions, examples)]
        answers = chat_answers(pipeline, openings, context, self.max_new_tokens, "multi-turn question")
        conversations = [
            [*opening, assistant(answer), user(request)]
            for opening, answer, request in zip(openings, answers, requests)
        ]
        size = default_image_size(pipeline)
        replies = reply_segments(pipeline, conversations, context, "image", "multi-turn another")
        drawn = [first_image(segments, size) for segments in replies]
        # 2. Same class as the shown image (the judge reads its caption); the first answer as a text check.
        same = scores_of(judge, drawn, [example.reference for example in examples])
        names = self.class_names
        shown = [names.named(example.reference) for example in examples]
        first_right = [None if c is None else names.named(a) == c for a, c in zip(answers, shown)]
        paths = saved_paths(context, self.key, "another", drawn)
        records = records_of(
            index=[example.index for example in examples],
            caption=[example.reference for example in examples],
            question=questions,
            answer=answers,
            answer_right=first_right,
            request=requests,
            image=paths,
            same_class=same,
        )
        tiles, captions = [], []
        for example, answer, image, right in list(zip(examples, answers, drawn, same))[:GRID_PAIRS]:
            tiles += [example.image, image]
            captions += [
                [(f"shown: {example.reference}", NEUTRAL), (f"A: {answer}", NEUTRAL)],
                [verdict(right, "another one like it")],
            ]
        return {
            "another_same_class": share(same),
            "first_answer_right": share(first_right),
            "num_shown": len(examples),
            "records": records,
            "grid": annotated_grid(tiles, captions),
        }

    def _drawn(
        self, pipeline: Any, context: TaskContext, judge: PromptJudge, rng: random.Random, warnings: list[str]
    ) -> dict[str, Any]:
        names = self.class_names
        # 1. "draw X" for the classes in turn; the image drawn is the assistant's turn.
        asked = [index % len(names) for index in range(self.num_drawn)]
        others = [names.other(index, rng) for index in asked]
        prompts = [fill(self.templates["draw"], names.fields(index), rng) for index in asked]
        follow_ups = [fill(self.templates["what_drawn"], {}, rng) for _ in asked]
        nexts = [fill(self.templates["draw_other"], names.fields(index), rng) for index in others]
        check_texts(pipeline, prompts + follow_ups + nexts, "requests", context, warnings)
        images = generate_images(pipeline, prompts, context, "multi-turn draw")
        history = [[user(prompt), assistant(image)] for prompt, image in zip(prompts, images)]
        # 2. "what did you draw?" and "now draw Y", each after the drawing.
        conversations = [[*turns, user(text)] for turns, text in zip(history, follow_ups)]
        answers = chat_answers(pipeline, conversations, context, self.max_new_tokens, "multi-turn what drawn")
        conversations = [[*turns, user(text)] for turns, text in zip(history, nexts)]
        size = default_image_size(pipeline)
        replies = reply_segments(pipeline, conversations, context, "image", "multi-turn draw other")
        second = [first_image(segments, size) for segments in replies]
        # 3. Judged: the drawing; the answer against the drawing (the judge reads the answer); the next drawing.
        drawn_right = scores_of(judge, images, [names.fields(index)["subject"] for index in asked])
        names_judged = scores_of(judge, images, answers)
        names_asked = [names.named(answer) == index for answer, index in zip(answers, asked)]
        other_right = scores_of(judge, second, [names.fields(index)["subject"] for index in others])
        records = records_of(
            index=list(range(len(asked))),
            prompt=prompts,
            image=saved_paths(context, self.key, "drawn", images),
            drawn_right=drawn_right,
            follow_up=follow_ups,
            answer=answers,
            answer_names_judged_class=names_judged,
            answer_names_asked_class=names_asked,
            next_request=nexts,
            next_image=saved_paths(context, self.key, "drawn_next", second),
            next_right=other_right,
        )
        tiles, captions = [], []
        for prompt, image, answer, judged, next_request, next_image, next_right in list(
            zip(prompts, images, answers, names_judged, nexts, second, other_right)
        )[:GRID_PAIRS]:
            tiles += [image, next_image]
            captions += [
                [(prompt, NEUTRAL), verdict(judged, f"A: {answer}")],
                [verdict(next_right, next_request)],
            ]
        return {
            "what_drawn_names_judged_class": share(names_judged),
            "what_drawn_names_asked_class": share(names_asked),
            "drawn_right": share(drawn_right),
            "draw_other_right": share(other_right),
            "num_drawn": len(asked),
            "records": records,
            "grid": annotated_grid(tiles, captions),
        }

    def _result(self, metrics: dict[str, Any], description: str) -> TaskResult:
        shown, drawn = str(metrics["num_shown"]), str(metrics["num_drawn"])
        table = [
            (
                f'"{self.another}": same class as the shown image (judged)',
                percent(metrics["another_same_class"]),
                shown,
            ),
            (
                f'first answer ("{self.question}") names the shown class',
                percent(metrics["first_answer_right"]),
                shown,
            ),
            (
                f'"{self.what_drawn}": names the class the judge sees',
                percent(metrics["what_drawn_names_judged_class"]),
                drawn,
            ),
            (
                f'"{self.what_drawn}": names the class asked for',
                percent(metrics["what_drawn_names_asked_class"]),
                drawn,
            ),
            (f'"{self.draw}": judged right', percent(metrics["drawn_right"]), drawn),
            (f'"{self.draw_other}" after it: judged right', percent(metrics["draw_other_right"]), drawn),
        ]
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f"{description}; {metrics['num_drawn']} drawn conversations; judge: {self.judge}",
            metrics=metrics | {"judge": self.judge},
            table=table,
            notes=[
                "The conversations carry the model's own answers and images (decoded, then encoded again as any "
                "image given to the pipeline), as a user's conversation would.",
                "The first answer and the asked class are checked as text: the answer must name that class and no "
                "other (names of `classes`, plurals included); the shown image's class is the one its caption names.",
            ],
            summary=f"another one like it {percent(metrics['another_same_class'])} ({shown}), what did you draw "
            f"{percent(metrics['what_drawn_names_judged_class'])} ({drawn})",
        )


# --- 3. interleaved answers -------------------------------------------------------------------------


def interleaved_verdict(num_images: int, first_right: bool | None, second_right: bool | None) -> bool:
    """Right: exactly two images, the first of the first class asked for and the second of the second."""
    return num_images == IMAGES_PER_INTERLEAVED_ANSWER and bool(first_right) and bool(second_right)


@dataclass
class InterleavedTask(SkillTask):
    """``num_requests`` requests for two classes ("Show me a sneaker and a bag."), answered with
    ``output="interleaved"``: the model writes the text, the images and their size tokens. Right when the answer
    holds exactly two images, judged of the classes asked for, in the order asked.

    ``token_budget``: the answers' ``max_new_tokens`` (default: two default-size images and
    ``INTERLEAVED_TEXT_TOKENS`` of text, within the model's context). Not ``max_new_tokens``, which
    ``unimm eval --max-new-tokens`` sets for the text answers of every task."""

    name: ClassVar[str] = "interleaved"
    request: str = DEFAULT_REQUEST
    num_requests: int = DEFAULT_NUM_REQUESTS
    token_budget: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be at least 1, got {self.token_budget}")
        first, second = ([f"{name}_{index}" for name in CLASS_FIELDS] for index in (1, 2))
        self.template = phrase_template(self.request, "request", PAIR_FIELDS, first, second)

    def run(self, pipeline: Any, context: TaskContext) -> TaskResult:
        warnings: list[str] = []
        names, rng = self.class_names, self.rng(context)
        # 1. Ordered pairs of two classes; the requests and the token budget.
        pairs = [
            (index % len(names), names.other(index % len(names), rng)) for index in range(self.num_requests)
        ]
        requests = [fill(self.template, names.pair_fields(*pair), rng) for pair in pairs]
        check_texts(pipeline, requests, "requests", context, warnings)
        budget = self._budget(pipeline, requests, context, warnings)
        # 2. Interleaved answers; each answer's first two images judged against the classes asked for.
        conversations = [[user(request)] for request in requests]
        replies = reply_segments(
            pipeline, conversations, context, "interleaved", self.name, max_new_tokens=budget
        )
        images = [images_of(segments) for segments in replies]
        firsts, seconds = self._verdicts(load_prompt_judge(self.judge), images, pairs)
        rights = [interleaved_verdict(len(found), *places) for found, *places in zip(images, firsts, seconds)]
        # 3. Records (texts and image paths in order) and a grid of the first two images of each answer.
        records = []
        for index, (request, segments) in enumerate(zip(requests, replies)):
            paths = saved_paths(context, self.key, f"images/{index:05d}", images_of(segments))
            found = iter(paths)
            pieces = [segment if isinstance(segment, str) else {"image": next(found)} for segment in segments]
            records.append(
                {"index": index, "request": request, "answer": pieces, "num_images": len(paths)}
                | {"first_right": firsts[index], "second_right": seconds[index], "right": rights[index]}
            )
        blank = PIL.Image.new("RGB", default_image_size(pipeline))
        tiles, captions = [], []
        for request, found, first, second in list(zip(requests, images, firsts, seconds))[:GRID_PAIRS]:
            tiles += [
                letterboxed(found[0]) if found else blank,
                letterboxed(found[1]) if len(found) > 1 else blank,
            ]
            captions += [
                [(request, NEUTRAL), verdict(first, "1st")],
                [verdict(second, f"2nd; {len(found)} images")],
            ]
        files = write_outputs(context, self.key, records, annotated_grid(tiles, captions))
        metrics = {
            "right": share(rights),
            "two_images": share([len(found) == IMAGES_PER_INTERLEAVED_ANSWER for found in images]),
            "first_right": share([bool(value) for value in firsts]),
            "second_right": share([bool(value) for value in seconds]),
            "with_text": share([any(isinstance(s, str) for s in segments) for segments in replies]),
            "mean_images": mean_or_nan([len(found) for found in images]),
            "num_requests": len(requests),
            "token_budget": budget,
            "judge": self.judge,
        }
        return replace(self._result(metrics), files=files, warnings=warnings)

    def _verdicts(
        self, judge: PromptJudge, images: list[list[PIL.Image.Image]], pairs: list[tuple[int, int]]
    ) -> tuple[list[bool | None], list[bool | None]]:
        """Per answer, the judge's verdict on its first and on its second image (``None`` where it has none)."""
        places = [
            (answer, place) for answer, found in enumerate(images) for place in range(min(len(found), 2))
        ]
        subjects = [self.class_names.fields(pairs[answer][place])["subject"] for answer, place in places]
        judged = dict(zip(places, scores_of(judge, [images[a][p] for a, p in places], subjects)))
        return [judged.get((answer, 0)) for answer in range(len(images))], [
            judged.get((answer, 1)) for answer in range(len(images))
        ]

    def _budget(self, pipeline: Any, requests: list[str], context: TaskContext, warnings: list[str]) -> int:
        """``token_budget``, by default room for two default-size images and some text, within the context."""
        if self.token_budget is not None:
            return self.token_budget
        grid = pipeline.image_grid()
        needed = IMAGES_PER_INTERLEAVED_ANSWER * pipeline.llm.vocabulary.image_sequence_length(*grid)
        needed += INTERLEAVED_TEXT_TOKENS
        limit = getattr(pipeline.llm.config.text_config, "max_position_embeddings", None)
        if limit is None:
            return needed
        conditional, _ = pipeline.image_prompt_ids(requests)
        room = limit - max(len(ids) for ids in conditional)
        if room < needed:
            context.warn(
                warnings,
                f"interleaved: the model's context of {limit} positions leaves {room} new tokens after the longest "
                f"request, fewer than the {needed} two images and their text need: answers may be cut",
            )
        return max(1, min(needed, room))

    def _result(self, metrics: dict[str, Any]) -> TaskResult:
        count = str(metrics["num_requests"])
        return TaskResult(
            task=self.name,
            label=self.key,
            description=f'{count} requests worded "{self.request}" over ordered pairs of {len(self.class_names)} '
            f"classes, answered in interleaved mode (at most {metrics['token_budget']} new tokens); judge: "
            f"{self.judge}",
            metrics=metrics,
            table=[
                ("both images judged right, in the order asked", percent(metrics["right"]), count),
                ("answers with exactly two images", percent(metrics["two_images"]), count),
                ("first image judged right", percent(metrics["first_right"]), count),
                ("second image judged right", percent(metrics["second_right"]), count),
                ("answers with text", percent(metrics["with_text"]), count),
            ],
            notes=[
                "The model writes each image's size tokens; an image of another size is judged resized.",
                "An answer with more or fewer than two images is wrong.",
            ],
            summary=f"both images right and in order {percent(metrics['right'])} ({count} requests)",
        )


# --- 4. naming what the model was taught ------------------------------------------------------------


@dataclass
class NamingTask(UnderstandingTask):
    """Images of the split the model trained on (default: the demo's emoji train split) asked what they are:
    can the model name what it was taught? Held-out names it cannot know; a name is right when the answer
    equals the reference (after normalisation: exact match)."""

    name: ClassVar[str] = "naming"
    dataset: Any = DEMO_NAMING_DATASET
    split: str | None = "train"
    limit: int | None = DEFAULT_SKILL_LIMIT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def _result(self, data: Any, metrics: dict[str, Any]) -> TaskResult:
        result = super()._result(data, metrics)
        named = percent(metrics["exact_match"])
        return replace(
            result,
            table=[
                ("named (answer equals the reference name: exact match)", named, str(metrics["num_examples"]))
            ]
            + result.table[1:],
            notes=[
                "The rows are of the split the model trained on, on purpose: the task asks whether it can name what "
                "it was taught (held-out names are unknown to it).",
                *result.notes,
            ],
            summary=f"named {named} of {metrics['num_examples']} {self.split or 'test'}-split images (exact match)",
        )


SKILL_TASKS: dict[str, type[EvalTask]] = {
    task.name: task
    for task in (PromptWordingTask, MultiTurnTask, InterleavedTask, EditTask, CompositionTask, NamingTask)
}


__all__ = [
    "SKILL_TASKS",
    "CompositionTask",
    "EditTask",
    "InterleavedTask",
    "MultiTurnTask",
    "NamingTask",
    "PromptWordingTask",
    "halves",
    "interleaved_verdict",
    "pixel_edit_metrics",
]
