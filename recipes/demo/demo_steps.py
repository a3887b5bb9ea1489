"""The demo model's own steps, which the library does not need: its LLM data (Fashion-MNIST answers from the
labels, emoji repeated) and its report with the model card's figures. The whole build is a multi-step recipe:

    unimm build recipes/demo/build.yaml                  # or `make demo-model`; resumes where it stopped
    unimm build recipes/demo/build.yaml --steps llm --force

whose steps are: ``tokenizer`` (``unimm train recipes/demo/tokenizer.yaml``, teacher classifier first),
``llm_data`` (``python recipes/demo/demo_steps.py llm_data``: the LLM's initial weights, a small Llama +
image vocabulary with code rows from the codebook, its word-level text tokenizer, and chat sequences for
both directions from ``recipes/demo/llm_data.yaml``: "caption → image", text dropped 10% of the time for
guidance, and "image + question → answer"), ``detokenizer`` and ``llm`` side by side (one core each),
``assemble`` (``unimm assemble`` into ``unimm/demo_checkpoint``, linked as ``checkpoints/demo``) and
``eval`` (``python recipes/demo/demo_steps.py eval``: the quality report, whose headline figures go into
the checkpoint's model card).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from unimm.data.demo_datasets import (
    FASHION_MNIST_TEMPLATES,
    fashion_mnist_caption,
    load_emoji,
    load_fashion_mnist,
)
from unimm.data.schema import IMAGE, drop_text
from unimm.data.templates import DEFAULT_QUESTIONS, generation_sample, understanding_sample
from unimm.data.text_replay import (
    text_chat_sample,
)
from unimm.evaluation.text_questions import (
    DEFAULT_MAX_NEW_TOKENS,
    evaluate_text_questions,
    judge_replies,
    load_text_questions,
)
from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.processing_unimm import IGNORE_INDEX
from unimm.llm.text_tokenizer import build_word_level_tokenizer
from unimm.pipelines.assembly import assemble_pipeline, stop_at_end_of_turn
from unimm.tokenizer import DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.prepare import replay_chats

logger = logging.getLogger(__name__)

DEMO_RECIPES = Path(__file__).resolve().parent  # this folder: recipes/demo
PLAIN_TEMPLATE = FASHION_MNIST_TEMPLATES.index("{article} {name}")  # "a sneaker"
STEPS = ("llm_data", "eval")  # the demo-specific steps; recipes/demo/build.yaml runs all of them
TRAINING_DATA = (
    "Fashion-MNIST (60,000 train images; Debian dataset-fashion-mnist) with templated captions",
    "Noto Color Emoji (1,696 train glyphs; Debian fonts-noto-color-emoji) captioned with their names",
)


@dataclass
class DemoLlmDataArguments:
    """``recipes/demo/llm_data.yaml``: the initial LLM and its training sequences."""

    tokenizer_path: str = field(metadata={"help": "the trained visual tokenizer (exported folder)"})
    output_dir: str = field(metadata={"help": "writes init/ (model + processor), train/ and eval/ tables"})
    backbone: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "a text LM trained from scratch: its config ({model_type: llama, ...})"},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "or a pretrained chat LM (folder or Hub id), extended with the image vocabulary"},
    )
    image_size: int = 32
    emoji_repeats: int = field(default=8, metadata={"help": "passes over the emoji per Fashion-MNIST pass"})
    condition_dropout: float = field(default=0.1, metadata={"help": "share of generation rows with no text"})
    questions: list[str] = field(default_factory=lambda: list(DEFAULT_QUESTIONS))
    image_loss_weight: float = field(
        default=1.0, metadata={"help": "loss weight of image tokens relative to text (UniMMConfig)"}
    )
    max_grid: int = field(
        default=16, metadata={"help": "largest grid (codes per side) the size tokens write"}
    )
    text_vocab_multiple: int = field(default=64, metadata={"help": "round the text vocabulary up to this"})
    text_replay_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of train sequences that are text-only chats answered by the pretrained text model "
            "itself (unimm.data.text_replay), which keeps its text skills; needs text_model_name_or_path"
        },
    )
    text_replay_max_new_tokens: int = field(
        default=64, metadata={"help": "longest replayed answer; longer replies are left out"}
    )
    max_train_images: int | None = field(default=None, metadata={"help": "per source (smoke runs)"})
    max_eval_images: int | None = 1000
    encode_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.backbone is None) == (self.text_model_name_or_path is None):
            raise ValueError("set exactly one of backbone (train from scratch) and text_model_name_or_path")
        if self.text_model_name_or_path and self.text_model_name_or_path.startswith("~"):
            self.text_model_name_or_path = os.path.expanduser(self.text_model_name_or_path)
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if not self.questions:
            raise ValueError("questions must not be empty")
        if not 0.0 <= self.text_replay_fraction < 1.0:
            raise ValueError(f"text_replay_fraction must be in [0, 1), got {self.text_replay_fraction}")
        if self.text_replay_fraction and self.text_model_name_or_path is None:
            raise ValueError(
                "text_replay_fraction needs text_model_name_or_path: it replays a pretrained model"
            )


def fashion_mnist_answer(label: int) -> str:
    return fashion_mnist_caption(label, template_index=PLAIN_TEMPLATE) + "."


@torch.no_grad()
def encode_images(
    vq_model: DualCodebookTokenizer,
    image_processor: DualCodebookImageProcessor,
    images: Sequence,
    batch_size: int,
) -> torch.Tensor:
    """``(N, h, w)`` code grids of PIL images, in batches."""
    grids = []
    for start in tqdm(range(0, len(images), batch_size), desc="encode images", leave=False):
        pixel_values = image_processor(
            list(images[start : start + batch_size]), return_tensors="pt"
        ).pixel_values
        grids.append(vq_model.encode(pixel_values))
    return torch.cat(grids)


class SequenceBuilder:
    """Chat samples → ``{"input_ids", "labels"}`` through :class:`UniMMProcessor`, fast.

    The texts repeat (50 Fashion-MNIST captions, a few questions), the grid is fixed: the processor runs
    once per distinct text with a placeholder grid, and each image's tokens are put in its place."""

    def __init__(self, processor: UniMMProcessor, grid: tuple[int, int]) -> None:
        self.processor, self.grid = processor, grid
        self.vocabulary = processor.vocabulary
        self.image_length = len(self.vocabulary.image_to_token_ids(torch.zeros(grid, dtype=torch.long)))
        self.templates: dict[tuple, tuple[list[int], list[int], int]] = {}

    def __call__(self, sample: dict, key: tuple, codes: torch.Tensor) -> dict[str, list[int]]:
        if key not in self.templates:
            placeholder = {
                "segments": [
                    {
                        **segment,
                        "image_token_ids": [0] * (self.grid[0] * self.grid[1]),
                        "image_grid": list(self.grid),
                    }
                    if segment["type"] == IMAGE
                    else segment
                    for segment in sample["segments"]
                ]
            }
            tokens = self.processor.tokenize_sample(placeholder)
            start = tokens["input_ids"].index(self.vocabulary.boi_token_id)
            self.templates[key] = (tokens["input_ids"], tokens["labels"], start)
        input_ids, labels, start = self.templates[key]
        image_ids = self.vocabulary.image_to_token_ids(codes).tolist()
        end = start + self.image_length
        trained = labels[start] != IGNORE_INDEX
        return {
            "input_ids": input_ids[:start] + image_ids + input_ids[end:],
            "labels": labels[:start]
            + (image_ids if trained else [IGNORE_INDEX] * self.image_length)
            + labels[end:],
        }


def build_llm_data(args: DemoLlmDataArguments) -> None:
    """Write ``init/`` (UniMMForCausalLM + processor) and the ``train``/``eval`` token tables."""
    output_dir = Path(args.output_dir)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    # 1. The frozen visual tokenizer and every image's codes.
    vq_model = DualCodebookTokenizer.from_pretrained(args.tokenizer_path).eval()
    image_processor = DualCodebookImageProcessor.from_pretrained(args.tokenizer_path)
    fashion = load_fashion_mnist(args.image_size, mode="RGB")
    emoji = load_emoji(args.image_size)
    splits: dict[
        str, list[tuple[torch.Tensor, str, str, int]]
    ] = {}  # split -> (codes, caption, answer, repeats)
    for split, limit in (("train", args.max_train_images), ("test", args.max_eval_images)):
        rows = []
        for dataset, repeats in (
            (fashion[split], 1),
            (emoji[split], args.emoji_repeats if split == "train" else 1),
        ):
            if limit is not None:
                dataset = dataset.select(range(min(limit, len(dataset))))
            images = [segments[0]["image"] for segments in dataset["segments"]]
            codes = encode_images(vq_model, image_processor, images, args.encode_batch_size)  # (N, h, w)
            labels = dataset["label"] if "label" in dataset.column_names else [None] * len(dataset)
            for grid, caption, label in zip(codes, dataset["caption"], labels):
                answer = fashion_mnist_answer(label) if label is not None else caption + "."
                rows.append((grid, caption, answer, repeats))
        splits[split] = rows
        logger.info("%s: %d images encoded", split, len(rows))
    grid = tuple(splits["train"][0][0].shape)
    # 2. The text model and its tokenizer: pretrained, or from scratch with a word-level tokenizer learned
    # from every text the model will see. Then the unified model and its processor.
    replay: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    if args.text_model_name_or_path is not None:
        text_tokenizer = AutoTokenizer.from_pretrained(args.text_model_name_or_path)
        text_model = AutoModelForCausalLM.from_pretrained(args.text_model_name_or_path)
        if args.text_replay_fraction:
            # before the vocabulary is extended: the replies are the untouched model's own
            replay = text_replay_chats(args, text_model.eval(), text_tokenizer)
    else:
        corpus = [
            *args.questions,
            *(
                text
                for rows in splits.values()
                for _, caption, answer, _ in rows
                for text in (caption, answer)
            ),
        ]
        text_tokenizer = build_word_level_tokenizer(corpus)
        backbone = dict(args.backbone)
        text_config = AutoConfig.for_model(
            backbone.pop("model_type"),
            vocab_size=-(-len(text_tokenizer) // args.text_vocab_multiple) * args.text_vocab_multiple,
            pad_token_id=text_tokenizer.pad_token_id,
            bos_token_id=text_tokenizer.bos_token_id,
            eos_token_id=text_tokenizer.eos_token_id,
            **backbone,
        )
        text_model = AutoModelForCausalLM.from_config(text_config)
    text_vocab_size = text_model.get_input_embeddings().num_embeddings
    llm = UniMMForCausalLM.from_text_model(
        text_model,
        codebook_size=vq_model.config.codebook_size,
        max_grid_height=args.max_grid,
        max_grid_width=args.max_grid,
        default_grid_height=grid[0],
        default_grid_width=grid[1],
        image_loss_weight=args.image_loss_weight,
        codebook_vectors=vq_model.get_codebook_vectors(),
        seed=args.seed,
    )
    processor = UniMMProcessor.from_config(llm.config, text_tokenizer, image_processor)
    stop_at_end_of_turn(llm, text_tokenizer)
    init_dir = output_dir / "init"
    llm.save_pretrained(init_dir)
    processor.save_pretrained(init_dir)
    logger.info(
        "init model: %.2fM parameters, text vocabulary %d (%d words)",
        llm.num_parameters() / 1e6,
        text_vocab_size,
        len(text_tokenizer),
    )
    # 3. Both directions per image: caption → image (sometimes without text), image + question → answer.
    builder = SequenceBuilder(processor, grid)
    for split, rows in splits.items():
        table: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for codes, caption, answer, repeats in tqdm(rows, desc=f"{split} sequences", leave=False):
            for _ in range(repeats):
                dropped = split == "train" and rng.random() < args.condition_dropout
                sample = generation_sample(caption)
                sample, key = (
                    (drop_text(sample), ("generate",)) if dropped else (sample, ("generate", caption))
                )
                question = rng.choice(args.questions)
                for row in (
                    builder(sample, key, codes),
                    builder(understanding_sample(question, answer), ("answer", question, answer), codes),
                ):
                    table["input_ids"].append(row["input_ids"])
                    table["labels"].append(row["labels"])
        if replay[split]:
            rows = [
                processor.tokenize_sample(text_chat_sample(chat["question"], chat["answer"]))
                for chat in replay[split]
            ]
            # train: fraction f of the final table, f / (1 - f) replay rows per multimodal row, cycling the
            # chats; eval: each held-out chat once
            fraction = args.text_replay_fraction
            count = (
                round(len(table["input_ids"]) * fraction / (1 - fraction)) if split == "train" else len(rows)
            )
            for index in range(count):
                table["input_ids"].append(rows[index % len(rows)]["input_ids"])
                table["labels"].append(rows[index % len(rows)]["labels"])
            logger.info("%s: %d text replay sequences from %d chats", split, count, len(rows))
        unknown = (
            sum(ids.count(text_tokenizer.unk_token_id) for ids in table["input_ids"])
            if args.backbone is not None  # a pretrained byte-level tokenizer has no unknown words
            else 0
        )
        if unknown:
            raise RuntimeError(
                f"{split}: {unknown} unknown text tokens: the text tokenizer misses words of the data"
            )
        folder = output_dir / ("train" if split == "train" else "eval")
        datasets.Dataset.from_dict(table).shuffle(seed=args.seed).flatten_indices().save_to_disk(str(folder))
        logger.info(
            "%s: %d sequences, longest %d tokens -> %s",
            split,
            len(table["input_ids"]),
            max(map(len, table["input_ids"])),
            folder,
        )


def text_replay_chats(
    args: DemoLlmDataArguments, text_model: Any, text_tokenizer: Any
) -> dict[str, list[dict[str, str]]]:
    """The pretrained model's own answers to the replay questions (cached in ``text_replay.jsonl``: the
    generation takes minutes), split 95/5 into train and eval chats."""
    path = Path(args.output_dir) / "text_replay.jsonl"
    chats = replay_chats(text_model, text_tokenizer, path, args.text_replay_max_new_tokens)
    chats = random.Random(args.seed).sample(chats, len(chats))
    held_out = max(1, len(chats) // 20)
    return {"train": chats[held_out:], "test": chats[:held_out]}


def assemble(
    output: Path, tokenizer_dir: Path, llm_init_dir: Path, llm_dir: Path, detokenizer_dir: Path | None
) -> None:
    """The pipeline folder from the trained parts; the LM stored in bf16 to keep the folder small."""
    assemble_pipeline(
        llm_dir,
        tokenizer_dir,
        output,
        processor=llm_init_dir,
        detokenizer=detokenizer_dir,
        dtype=torch.bfloat16,
        training_data=list(TRAINING_DATA),
    )


def compare_text_skills(pipeline: Any, text_model_name_or_path: str, output_dir: Path) -> dict[str, Any]:
    """The 20 general text questions asked to the pretrained text model and to the trained unified model;
    writes ``text_questions.json`` (scores and every reply) and returns it.

    "after" asks the unified model the way a user does, ``pipeline.chat`` (text mode: no image token can
    start outside an image); "after_unconstrained" with plain ``generate``, which may wander into image
    tokens (decoded to nothing) and is kept for comparison."""
    before_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path).eval()
    before = evaluate_text_questions(before_model, AutoTokenizer.from_pretrained(text_model_name_or_path))
    questions = load_text_questions()
    replies = pipeline.chat([q.question for q in questions], max_new_tokens=DEFAULT_MAX_NEW_TOKENS).texts
    after = judge_replies(questions, replies)
    unconstrained = evaluate_text_questions(pipeline.llm, pipeline.processor.tokenizer)
    result = {
        "text_model": text_model_name_or_path,
        **{
            name: {"correct": report.correct, "total": report.total, "results": report.results}
            for name, report in (("before", before), ("after", after), ("after_unconstrained", unconstrained))
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "text_questions.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "text questions: %d/%d before, %d/%d after (pipeline.chat), %d/%d after with plain generate",
        before.correct, before.total, after.correct, after.total, unconstrained.correct, unconstrained.total,
    )  # fmt: skip
    return result


def evaluate_and_card(
    checkpoint: Path,
    output_dir: Path,
    text_model_name_or_path: str | None = None,
    skills: bool = False,
    **report_options: Any,
) -> None:
    """Write the quality report (``report_options`` go to ``evaluate_pipeline``) and put its headline
    figures into the checkpoint's model card. With ``text_model_name_or_path`` (the pretrained LM the
    unified model started from) the text questions are asked before and after, see
    :func:`compare_text_skills`; with ``skills``, the unified skills' tasks too (:func:`skill_metrics`)."""
    from unimm.evaluation.report import evaluate_pipeline
    from unimm.pipelines import UniMMPipeline
    from unimm.pipelines.model_card import build_model_card

    pipeline = UniMMPipeline.from_pretrained(checkpoint)
    text_skills = (
        compare_text_skills(pipeline, text_model_name_or_path, output_dir)
        if text_model_name_or_path
        else None
    )
    report = evaluate_pipeline(pipeline, output_dir, checkpoint_name=str(checkpoint), **report_options)
    metrics = {
        f"understanding accuracy (Fashion-MNIST test, {report.understanding_total} images)": (
            f"{report.understanding_accuracy:.1%}"
        ),
        f"generation correctness (judge; its real-image accuracy {report.judge_real_accuracy:.1%})": (
            f"{report.generation_accuracy:.1%}"
        ),
    }
    for name, scores in report.reconstruction.items():  # e.g. "fashion_mnist/pixel"
        metrics[f"reconstruction PSNR / SSIM ({name})"] = f"{scores['psnr']:.2f} dB / {scores['ssim']:.3f}"
    if text_skills is not None:
        metrics["general text questions correct (before → after multimodal training)"] = (
            f"{text_skills['before']['correct']}/{text_skills['before']['total']} → "
            f"{text_skills['after']['correct']}/{text_skills['after']['total']}"
        )
        unconstrained = text_skills["after_unconstrained"]
        metrics["general text questions correct after, plain generate() without the text-mode constraint"] = (
            f"{unconstrained['correct']}/{unconstrained['total']}"
        )
    if skills:
        metrics.update(skill_metrics(pipeline, checkpoint, output_dir / "skills"))
    build_model_card(pipeline, list(TRAINING_DATA), metrics).save(checkpoint / "README.md")


def skill_metrics(pipeline: Any, checkpoint: Path, output_dir: Path) -> dict[str, str]:
    """The unified skills' tasks (``unimm eval --task skills``: their report goes to ``output_dir``), as the
    model card's rows: "<skill>: <metric>" -> value."""
    from unimm.evaluation import TaskContext, run_tasks
    from unimm.evaluation.skill_tasks import SKILL_TASKS

    tasks = [task_class() for task_class in SKILL_TASKS.values()]
    run = run_tasks(pipeline, tasks, TaskContext(output_dir=output_dir, checkpoint=str(checkpoint)))
    return {f"{result.label}: {metric}": value for result in run.results for metric, value, _ in result.table}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=STEPS, help="llm_data (from RECIPES/llm_data.yaml) or eval")
    parser.add_argument(
        "--recipes",
        default=str(DEMO_RECIPES),
        help="the recipe folder holding llm_data.yaml (default: recipes/demo; recipes/smollm2 for SmolLM2)",
    )
    parser.add_argument("--checkpoint", default="unimm/demo_checkpoint", help="eval: the checkpoint folder")
    parser.add_argument(
        "--skills", action="store_true", help="eval: the unified skills' tasks too (unimm eval --task skills)"
    )
    parser.add_argument("--output-dir", default="outputs/demo/eval", help="eval: the report's folder")
    parser.add_argument(
        "--num-understanding", type=int, default=None, help="eval: test images asked (default: the report's)"
    )
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=None,
        help="eval: images generated per class (default: the report's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (data_args,) = HfArgumentParser(DemoLlmDataArguments).parse_yaml_file(
        str(Path(args.recipes) / "llm_data.yaml")
    )
    if args.step == "llm_data":
        build_llm_data(data_args)
        return 0
    report_options = {
        name: value
        for name, value in (
            ("num_understanding", args.num_understanding),
            ("images_per_class", args.images_per_class),
        )
        if value is not None
    }
    evaluate_and_card(
        Path(args.checkpoint),
        Path(args.output_dir),
        text_model_name_or_path=data_args.text_model_name_or_path,
        skills=args.skills,
        **report_options,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
