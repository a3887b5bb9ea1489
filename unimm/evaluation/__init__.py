"""Evaluation: metrics (PSNR/SSIM, codebook usage and perplexity, bits per image, linear probes), answer
scoring, prompt judges, feature spaces for Fréchet distances, and the evaluation tasks of ``unimm eval``
(understanding, reconstruction, prompt following, Fréchet distance, the demo report, and the unified skills:
prompt wording, multi-turn chat, interleaved answers, edits, compositions, naming)."""

from .answers import contains_match, exact_match, normalize_answer, score_answer, token_f1
from .demo_task import DemoTask
from .feature_spaces import FeatureSpace, load_feature_space
from .judge import FashionMNISTJudge, load_judge
from .metrics import (
    bits_per_image,
    codebook_counts,
    codebook_perplexity,
    codebook_usage,
    linear_probe_accuracy,
    psnr,
    ssim,
)
from .prompt_judges import PromptJudge, load_prompt_judge
from .report import EvaluationReport, answer_to_class, evaluate_pipeline
from .skill_tasks import (
    SKILL_TASKS,
    CompositionTask,
    EditTask,
    InterleavedTask,
    MultiTurnTask,
    NamingTask,
    PromptWordingTask,
)
from .task_base import EvalTask, TaskContext, TaskResult
from .task_data import load_task_data, vocabulary_warning
from .task_runner import ALL_TASKS, EvaluationRun, build_task, load_task_file, run_tasks
from .tasks import TASKS, FrechetTask, PromptFollowingTask, ReconstructionTask, UnderstandingTask

__all__ = [
    "ALL_TASKS",
    "SKILL_TASKS",
    "TASKS",
    "CompositionTask",
    "DemoTask",
    "EditTask",
    "EvalTask",
    "EvaluationReport",
    "EvaluationRun",
    "FashionMNISTJudge",
    "FeatureSpace",
    "FrechetTask",
    "InterleavedTask",
    "MultiTurnTask",
    "NamingTask",
    "PromptFollowingTask",
    "PromptJudge",
    "PromptWordingTask",
    "ReconstructionTask",
    "TaskContext",
    "TaskResult",
    "UnderstandingTask",
    "answer_to_class",
    "bits_per_image",
    "build_task",
    "codebook_counts",
    "codebook_perplexity",
    "codebook_usage",
    "contains_match",
    "evaluate_pipeline",
    "exact_match",
    "linear_probe_accuracy",
    "load_feature_space",
    "load_judge",
    "load_prompt_judge",
    "load_task_data",
    "load_task_file",
    "normalize_answer",
    "psnr",
    "run_tasks",
    "score_answer",
    "ssim",
    "token_f1",
    "vocabulary_warning",
]
