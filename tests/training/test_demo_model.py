"""The demo model's build on a tiny tokenizer: its data through ``unimm prepare recipes/demo/prepare.yaml``,
the LLM stage's sample grids drawn with the prepared model, ``unimm assemble``, and the eval step of
recipes/demo/demo_steps.py (outside the package), which writes the report and the model card's figures."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import datasets
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from unimm.cli import main as cli_main
from unimm.data.skills import MIRROR, WIDE
from unimm.evaluation.skill_base import DEMO_CLASSES
from unimm.evaluation.skill_tasks import (
    SKILL_TASKS,
    CompositionTask,
    EditTask,
    InterleavedTask,
    MultiTurnTask,
    NamingTask,
    PromptWordingTask,
)
from unimm.evaluation.task_data import training_data_lines
from unimm.llm import UniMMForCausalLM, UniMMProcessor
from unimm.llm.lora import apply_lora
from unimm.llm.text_tokenizer import build_word_level_tokenizer
from unimm.pipelines import UniMMPipeline
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer
from unimm.training.build import load_build_recipe
from unimm.training.stages.llm import LlmArguments, LlmSftStage

REPOSITORY = Path(__file__).resolve().parents[2]
DEMO_RECIPES = REPOSITORY / "recipes" / "demo"
SMOLLM2_TEXT_MODEL = "~/.cache/unimm/models/smollm2-135m-instruct"  # recipes/smollm2/build.yaml's eval step


def _load_script(path: Path) -> ModuleType:
    """A Python file of the recipes as a module (registered first: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


demo_steps = _load_script(DEMO_RECIPES / "demo_steps.py")
# The demo recipe's Llama at a test's size; 512 positions as the recipe's (a 4-turn chat with 3 images fits).
TINY_BACKBONE = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip
TRAIN_IMAGES, EVAL_IMAGES = 6, 4  # per source (Fashion-MNIST, emoji)
# The tiny tokenizer at the demo data's side: 8x8 grids as the demo's, and the evaluation tasks load
# Fashion-MNIST at the tokenizer's size (padded from 28 px, so never smaller).
TOKENIZER_CONFIG = DualCodebookConfig.tiny(image_size=32)
SAMPLE_PROMPTS = ["a photo of a bag", "an emoji of red heart"]
SAMPLES_PER_PROMPT = 3
TRAINING_DATA = [
    "Fashion-MNIST (6 train images) with templated captions",
    "Noto Color Emoji (6 train glyphs)",
]
# The report at a test's size (evaluate_pipeline's counts), and every skill task with a handful of examples.
REPORT_COUNTS = dict(
    num_understanding=4, images_per_class=1, num_judge_real=20, num_reconstruction=2,
    num_diffusion_reconstruction=0, num_emoji=2,
)  # fmt: skip
SKILL_LIMIT = 2


def _tiny_skill_tasks() -> list:
    return [
        PromptWordingTask(wordings=["{label}"], num_images_per_prompt=1),
        MultiTurnTask(limit=SKILL_LIMIT, num_drawn=SKILL_LIMIT),
        InterleavedTask(num_requests=SKILL_LIMIT),
        EditTask(limit=SKILL_LIMIT, ops=[MIRROR]),
        CompositionTask(num_per_layout=1, layouts=[WIDE]),
        NamingTask(limit=SKILL_LIMIT),
    ]


# --- the eval step's command line, as the build recipes call it ---------------------------------------


def _eval_step(build_recipe: Path):
    (step,) = [step for step in load_build_recipe(build_recipe).steps if step.name == "eval"]
    return step


def test_the_builds_run_the_eval_step_with_their_text_model() -> None:
    """The demo (trained from scratch) asks no text questions; SmolLM2's eval step names its base LM."""
    demo = _eval_step(DEMO_RECIPES / "build.yaml")
    smollm2 = _eval_step(REPOSITORY / "recipes" / "smollm2" / "build.yaml")
    for step in (demo, smollm2):
        assert Path(step.script).resolve() == (DEMO_RECIPES / "demo_steps.py").resolve()
    demo_args = demo_steps.build_parser().parse_args(demo.args)
    assert demo_args.step == "eval" and demo_args.text_model is None and demo_args.skills
    smollm2_args = demo_steps.build_parser().parse_args(smollm2.args)
    assert smollm2_args.text_model == SMOLLM2_TEXT_MODEL and not smollm2_args.skills
    assert (smollm2_args.num_understanding, smollm2_args.images_per_class) == (500, 20)


def test_main_passes_the_expanded_text_model_and_only_the_counts_given(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(demo_steps, "evaluate_and_card", lambda *args, **kwargs: calls.append((args, kwargs)))
    common = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "eval")]
    assert demo_steps.main([*common, "--text-model", "~/lm", "--num-understanding", "5"]) == 0
    assert demo_steps.main([*common, "--skills"]) == 0
    (args, with_text), (_, plain) = calls
    assert args == (tmp_path / "ckpt", tmp_path / "eval")
    assert with_text == {
        "text_model_name_or_path": os.path.expanduser("~/lm"), "skills": False, "num_understanding": 5,
    }  # fmt: skip
    assert plain == {"text_model_name_or_path": None, "skills": True}
    with pytest.raises(SystemExit):  # the data step is `unimm prepare` now
        demo_steps.build_parser().parse_args(["llm_data"])


# --- the build on a tiny tokenizer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny visual tokenizer, the output of the demo's prepare recipe at a test's size)."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    vq_model = DualCodebookTokenizer(TOKENIZER_CONFIG).eval()
    vq_model.save_pretrained(folder / "tokenizer")
    DualCodebookImageProcessor.from_tokenizer_config(vq_model.config).save_pretrained(folder / "tokenizer")
    overrides = [
        f"visual_tokenizer={folder / 'tokenizer'}", f"output_dir={folder / 'prepared'}",
        f"max_train_samples={TRAIN_IMAGES}", f"max_eval_samples={EVAL_IMAGES}", "encode_batch_size=8",
        f"backbone={yaml.safe_dump(TINY_BACKBONE, default_flow_style=True).strip()}",
    ]  # fmt: skip
    assert cli_main(["prepare", str(DEMO_RECIPES / "prepare.yaml"), *overrides]) == 0
    return folder / "tokenizer", folder / "prepared"


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory) -> Path:
    """The prepared init/ assembled as if trained (the build's assemble step: ``unimm assemble``)."""
    tokenizer, data = prepared
    output = tmp_path_factory.mktemp("checkpoint") / "demo"
    assert (
        cli_main(
            [
                "assemble",
                f"--llm={data / 'init'}",
                f"--processor={data / 'init'}",
                f"--visual-tokenizer={tokenizer}",
                "--dtype=bfloat16",
                f"--output={output}",
                *(f"--training-data={line}" for line in TRAINING_DATA),
            ]
        )  # fmt: skip
        == 0
    )
    return output


@pytest.mark.integration
def test_the_prepared_model_reads_its_tables(prepared) -> None:
    _, data = prepared
    llm = UniMMForCausalLM.from_pretrained(data / "init")
    processor = UniMMProcessor.from_pretrained(data / "init")
    train = datasets.load_from_disk(str(data / "train"))
    assert {"generation", "understanding"} <= set(train["kind"])
    assert max(max(ids) for ids in train["input_ids"]) < llm.config.vocab_size
    texts, images = processor.batch_decode(train["input_ids"][:4], skip_special_tokens=False)
    for text, grids in zip(texts, images):
        assert text.startswith("<|user|>") and grids  # a chat with at least one image
    assert processor.vocabulary.vocab_size == llm.config.vocab_size


@pytest.mark.integration
def test_the_llm_stage_draws_its_sample_grid_with_the_prepared_model(prepared, tmp_path) -> None:
    tokenizer, data = prepared
    llm = UniMMForCausalLM.from_pretrained(data / "init")
    stage = LlmSftStage(
        LlmArguments(
            model_name_or_path=str(data / "init"), train_dataset=str(data / "train"),
            sample_prompts=SAMPLE_PROMPTS, sample_tokenizer_path=str(tokenizer),
            sample_images_per_prompt=SAMPLES_PER_PROMPT,
        )
    )  # fmt: skip
    # A generated image is the default grid decoded by the tokenizer's pixel decoder.
    downsample = TOKENIZER_CONFIG.downsample_factor
    size = (llm.config.default_grid_width * downsample, llm.config.default_grid_height * downsample)
    grid_size = (SAMPLES_PER_PROMPT * size[0], len(SAMPLE_PROMPTS) * size[1])
    (grid_path,) = stage.write_samples(llm, step=5, output_dir=tmp_path / "samples")
    assert Image.open(grid_path).size == grid_size and llm.training is False
    assert grid_path.with_suffix(".txt").read_text().splitlines() == SAMPLE_PROMPTS
    # A LoRA-wrapped model (the SmolLM2 recipe) draws its grid too.
    stage._sample_pipeline = None
    (lora_grid,) = stage.write_samples(apply_lora(llm, r=2), step=6, output_dir=tmp_path / "samples")
    assert Image.open(lora_grid).size == grid_size


@pytest.mark.integration
def test_the_assembled_checkpoint_answers_and_draws(checkpoint) -> None:
    pipeline = UniMMPipeline.from_pretrained(checkpoint, dtype=None)  # as stored
    assert pipeline.llm.dtype == torch.bfloat16 and pipeline.detokenizer is None
    end_of_turn = pipeline.processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_of_turn in pipeline.llm.generation_config.eos_token_id  # answers stop at the turn's end
    size = pipeline.processor.image_processor.size["height"]
    answer = pipeline.chat("What is this?", images=Image.new("RGB", (size, size), "white"), max_new_tokens=4)
    assert len(answer.texts) == 1
    images = pipeline.generate_images(["an emoji of grinning face"], decoder="pixel", seed=0).images
    assert images[0].size == (size, size)
    assert training_data_lines(checkpoint) == TRAINING_DATA


@pytest.mark.integration
def test_the_eval_step_writes_the_report_and_the_model_card(checkpoint, tmp_path) -> None:
    """One eval run with every part: the report, the skill tasks (a handful of examples each) and the text
    questions asked before and after. The "before" model is a tiny word-level LM saved to a folder (the
    checkpoint did not start from it: only the plumbing is checked, as SmolLM2's eval step uses it)."""
    text_tokenizer = build_word_level_tokenizer(["What is the capital of France?", "Paris."])
    values = dict(TINY_BACKBONE)
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=len(text_tokenizer), **values)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "text-model")
    text_tokenizer.save_pretrained(tmp_path / "text-model")
    output = tmp_path / "eval"
    demo_steps.evaluate_and_card(
        checkpoint, output, text_model_name_or_path=str(tmp_path / "text-model"), skills=True,
        skill_tasks=_tiny_skill_tasks(), **REPORT_COUNTS,
    )  # fmt: skip
    report = json.loads((output / "report.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and (output / "report.md").is_file()
    assert (report["understanding_total"], report["judge_real_total"]) == (4, 20)
    assert report["generation_total"] == len(DEMO_CLASSES)  # one image per class
    skills = json.loads((output / "skills" / "report.json").read_text())
    assert set(skills["tasks"]) == set(SKILL_TASKS)
    assert skills["tasks"]["prompt_wording"]["metrics"]["num_prompts"] == len(DEMO_CLASSES)  # one wording
    card = (checkpoint / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    understanding = (
        f"| understanding accuracy (Fashion-MNIST test, 4 images) | {report['understanding_accuracy']:.1%} |"
    )
    assert understanding in rows
    for name in (
        "generation correctness (judge;",
        "reconstruction PSNR / SSIM (fashion_mnist/pixel)",
        "general text questions correct (before → after multimodal training)",
        *(f"| {label}: " for label in SKILL_TASKS),  # a row per metric of each skill task
    ):
        assert any(name in row for row in rows), name
    assert training_data_lines(checkpoint) == TRAINING_DATA  # the card keeps what `unimm assemble` recorded

    # The text questions: 20 asked to both models; "after" is what pipeline.chat answers (text mode).
    result = json.loads((output / demo_steps.TEXT_QUESTIONS_FILE).read_text())
    assert (
        result["before"]["total"] == result["after"]["total"] == result["after_unconstrained"]["total"] == 20
    )
    assert len(result["after"]["results"]) == 20
    before_after = f"{result['before']['correct']}/20 → {result['after']['correct']}/20 |"
    assert any(
        row.startswith("| general text questions correct (before") and row.endswith(before_after)
        for row in rows
    )
    questions = [row["question"] for row in result["after"]["results"][:3]]
    chat = UniMMPipeline.from_pretrained(checkpoint).chat(
        questions, max_new_tokens=demo_steps.DEFAULT_MAX_NEW_TOKENS
    )
    assert chat.texts == [row["reply"] for row in result["after"]["results"][:3]]
