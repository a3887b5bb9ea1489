"""Fixtures of the gpu tier: the demo checkpoint as the float32 CPU reference, in-distribution images drawn by
it, and checks of greedy outputs against that reference.

Outputs of a bf16 CUDA run cannot equal a float32 CPU run token for token (a near tie may flip), and CUDA's
own kernels change with batch size and fusion. The checks here are what must hold anyway: every token a
greedy run chose is the reference model's best token up to a tolerance, teacher-forced over the run's own
sequence (guidance included), so a wrong cache, mask, device or dtype shows as a large gap. Helpers are
fixtures: a conftest is not importable in importlib mode."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import PIL.Image
import pytest
import torch

from unimm.commands.pipeline_arguments import DEFAULT_CHECKPOINT
from unimm.llm import ModalitySampling, UniMMForCausalLM
from unimm.pipelines import UniMMPipeline

GREEDY = ModalitySampling(do_sample=False)
IMAGES_PER_CLASS = 2
NUM_CLASSES = 10
# Logit gaps a greedy run may show against the float32 reference, per unit of guidance amplification. On the
# CPU, bf16 guided images of the demo model show 0.19 at scale 3, float32 exactly 0; a wrong cache, mask or
# device gives gaps of several units.
GAP_PER_GUIDANCE = {torch.float32: 1e-2, torch.bfloat16: 0.5, torch.float16: 0.25}


@pytest.fixture(scope="session")
def cuda(device: torch.device) -> torch.device:
    """The CUDA device under test (tests marked ``gpu`` only run when it is one)."""
    return device


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    return str(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="session")
def demo_cpu(demo_checkpoint: str) -> UniMMPipeline:
    """The demo checkpoint in float32 on the CPU: the reference every CUDA run is compared with."""
    pipeline = UniMMPipeline.from_pretrained(demo_checkpoint, dtype=torch.float32, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def demo_cuda(demo_checkpoint: str, cuda: torch.device) -> UniMMPipeline:
    """The demo checkpoint in bfloat16 on CUDA, as the README and ``--dtype auto`` load it there."""
    pipeline = UniMMPipeline.from_pretrained(demo_checkpoint, dtype=torch.bfloat16, device=cuda)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def class_prompts() -> list[str]:
    from unimm.data.demo_datasets import fashion_mnist_caption

    return [fashion_mnist_caption(label, template_index=0) for label in range(NUM_CLASSES)]


@pytest.fixture(scope="session")
def demo_images(demo_cpu: UniMMPipeline, class_prompts: list[str]) -> tuple[list[PIL.Image.Image], list[int]]:
    """Images of every Fashion-MNIST class drawn by the reference (pixel decoder), and their classes: test
    images that need no dataset on the GPU machine, in the model's own distribution."""
    output = demo_cpu.generate_images(
        class_prompts, num_images_per_prompt=IMAGES_PER_CLASS, seed=0, decoder="pixel"
    )
    labels = [label for label in range(NUM_CLASSES) for _ in range(IMAGES_PER_CLASS)]
    return output.images, labels


@pytest.fixture(autouse=True)
def _restore_tf32() -> Iterator[None]:
    """Loading through the CLI turns TF32 on for the process; other tests compare float32 numbers."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


def _unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    return [row[keep.bool()].tolist() for row, keep in zip(input_ids, attention_mask)]


@pytest.fixture(scope="session")
def image_prompts():
    """``image_prompts(pipeline, prompts) -> (conditional ids, unconditional ids)``, lists per prompt (the
    pipeline's own text-to-image prompts)."""
    return lambda pipeline, prompts: pipeline.image_prompt_ids(list(prompts))


@pytest.fixture(scope="session")
def text_prompts(demo_cpu: UniMMPipeline) -> list[list[int]]:
    """Chat prompts without images, of different lengths, as lists of ids."""
    questions = ["What is a sneaker?", "hello", "Describe a bag in a few words, please."]
    conversations = [[{"role": "user", "content": question}] for question in questions]
    batch = demo_cpu.processor(messages=conversations, add_generation_prompt=True)
    return _unpadded(batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def _logits(model: UniMMForCausalLM, ids: list[int]) -> torch.Tensor:
    """Float32 logits ``(T, V)`` of one sequence, teacher-forced."""
    device = model.get_input_embeddings().weight.device
    return model(torch.tensor([ids], device=device)).logits[0].float().cpu()


def generated(output) -> list[list[int]]:
    """The tokens each row of a ``generate_multimodal`` output wrote (padding cut)."""
    return [row[:length] for row, length in zip(output.sequences.tolist(), output.sequence_lengths.tolist())]


def text_gap(
    model: UniMMForCausalLM, prompts: Sequence[Sequence[int]], sequences: Sequence[Sequence[int]]
) -> float:
    """Largest gap, over every token a greedy text-mode run wrote after each prompt, between ``model``'s best
    text token and the one written (0 when the run wrote exactly ``model``'s greedy tokens)."""
    text_vocab = model.vocabulary.text_vocab_size
    worst = 0.0
    for prompt, chosen in zip(prompts, sequences, strict=True):
        logits = _logits(model, [*prompt, *chosen])[len(prompt) - 1 : -1, :text_vocab]  # (len(chosen), text)
        gaps = logits.max(-1).values - logits[torch.arange(len(chosen)), torch.tensor(chosen)]
        worst = max(worst, float(gaps.max()))
    return worst


def image_gap(
    model: UniMMForCausalLM,
    prompts: Sequence[Sequence[int]],
    unconditional: Sequence[Sequence[int]],
    codes: Sequence[torch.Tensor],
    scale: float,
) -> float:
    """Largest gap, over every code of every image, between the best code under classifier-free guidance of
    ``model`` (``uncond + scale * (cond - uncond)``, float32) and the code a greedy run chose."""
    vocabulary = model.vocabulary
    worst = 0.0
    for prompt, uncond, grid in zip(prompts, unconditional, codes, strict=True):
        image = vocabulary.image_to_token_ids(grid.cpu()).tolist()
        positions = [
            index for index, token in enumerate(image) if vocabulary.is_code_token(torch.tensor(token))
        ]
        chosen = torch.tensor([image[index] for index in positions]) - vocabulary.code_token_offset
        start = vocabulary.code_token_offset
        conditional = _logits(model, [*prompt, *image])[[len(prompt) + i - 1 for i in positions], start:]
        if scale == 1.0:
            guided = conditional
        else:
            plain = _logits(model, [*uncond, *image])[[len(uncond) + i - 1 for i in positions], start:]
            guided = plain + scale * (conditional - plain)  # (codes, K)
        gaps = guided.max(-1).values - guided[torch.arange(len(positions)), chosen]
        worst = max(worst, float(gaps.max()))
    return worst


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """The largest gap a run in ``dtype`` may show: rounding of the logits, which guidance ``uncond + s (cond -
    uncond)`` amplifies up to ``2 s - 1`` times."""
    return GAP_PER_GUIDANCE[dtype] * (2 * scale - 1)


class GreedyCheck:
    """The gap functions and their tolerance, handed to tests as the ``greedy_check`` fixture."""

    generated = staticmethod(generated)
    text = staticmethod(text_gap)
    image = staticmethod(image_gap)
    tolerance = staticmethod(tolerance)


@pytest.fixture(scope="session")
def greedy_check() -> type[GreedyCheck]:
    return GreedyCheck
