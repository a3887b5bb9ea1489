"""The generation engine on CUDA in bf16, eager and ``compile=True``, with each cache and attention backend:
every greedy token is the float32 reference's best one (teacher-forced, guidance included), a warm compiled
engine takes new batch sizes and lengths without recompiling, and sampling takes CPU or CUDA generators."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from unimm.llm import ModalitySampling, UniMMForCausalLM

pytestmark = pytest.mark.gpu

GREEDY = ModalitySampling(do_sample=False)
SAMPLED = ModalitySampling(do_sample=True, temperature=1.0)
SCALE = 3.0
MAX_NEW_TOKENS = 16
FLASH_ATTENTION = "flash_attention_2"


def load_llm(checkpoint: str, device: torch.device, attn_implementation: str = "sdpa") -> UniMMForCausalLM:
    model = UniMMForCausalLM.from_pretrained(
        f"{checkpoint}/llm", dtype=torch.bfloat16, attn_implementation=attn_implementation
    )
    return model.to(device).eval()


@pytest.fixture(scope="module")
def llm(demo_checkpoint, cuda) -> UniMMForCausalLM:
    """The demo LLM in bf16 with SDPA; its compiled step is kept between the tests of this module."""
    return load_llm(demo_checkpoint, cuda)


@pytest.fixture(scope="module")
def requests(demo_cpu, image_prompts, class_prompts, text_prompts) -> dict:
    """A mixed batch: four guided image requests, then the text questions."""
    conditional, unconditional = image_prompts(demo_cpu, class_prompts[:4])
    return {
        "prompts": conditional + text_prompts,
        "mode": ["image"] * len(conditional) + ["text"] * len(text_prompts),
        "guidance_scale": [SCALE] * len(conditional) + [1.0] * len(text_prompts),
        "unconditional_input_ids": unconditional + [None] * len(text_prompts),
    }


def assert_reference_tokens(output, requests: dict, reference: UniMMForCausalLM, greedy_check) -> None:
    images = [index for index, mode in enumerate(requests["mode"]) if mode == "image"]
    texts = [index for index, mode in enumerate(requests["mode"]) if mode == "text"]
    prompts, unconditional = requests["prompts"], requests["unconditional_input_ids"]
    grids = [output.image_token_ids[index][0] for index in images]
    image_gap = greedy_check.image(
        reference, [prompts[i] for i in images], [unconditional[i] for i in images], grids, SCALE
    )
    assert image_gap <= greedy_check.tolerance(torch.bfloat16, SCALE)
    written = greedy_check.generated(output)
    text_gap = greedy_check.text(reference, [prompts[i] for i in texts], [written[i] for i in texts])
    assert text_gap <= greedy_check.tolerance(torch.bfloat16)


def generate(model: UniMMForCausalLM, requests: dict, **options):
    arguments = {key: value for key, value in requests.items() if key != "prompts"}
    return model.generate_multimodal(
        requests["prompts"], image_sampling=GREEDY, max_new_tokens=MAX_NEW_TOKENS, **arguments, **options
    )


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("cache_implementation", ["preallocated", "static"])
def test_mixed_batch_writes_the_references_greedy_tokens(
    llm, requests, demo_cpu, greedy_check, cache_implementation, compile
):
    output = generate(llm, requests, cache_implementation=cache_implementation, compile=compile)
    assert_reference_tokens(output, requests, demo_cpu.llm, greedy_check)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_eager_and_compiled_write_the_references_greedy_tokens(
    demo_checkpoint, cuda, requests, demo_cpu, greedy_check
):
    """Guided rows always carry padding: flash attention's unpadding runs in every step."""
    model = load_llm(demo_checkpoint, cuda, FLASH_ATTENTION)
    assert model.config.text_config._attn_implementation == FLASH_ATTENTION
    for compile in (False, True):
        assert_reference_tokens(
            generate(model, requests, compile=compile), requests, demo_cpu.llm, greedy_check
        )


def test_a_warm_compiled_engine_takes_new_batch_sizes_and_lengths_without_recompiling(
    llm, demo_cpu, image_prompts, class_prompts, text_prompts
):
    from torch._dynamo.utils import counters

    conditional, unconditional = image_prompts(demo_cpu, class_prompts)

    def images(batch: int, first: int = 0) -> None:
        prompts = slice(first, first + batch)
        llm.generate_multimodal(
            conditional[prompts], mode="image", guidance_scale=SCALE, unconditional_input_ids=unconditional[prompts],
            image_sampling=SAMPLED, seed=batch, compile=True,
        )  # fmt: skip

    def texts(batch: int) -> None:
        llm.generate_multimodal(
            text_prompts[:batch], mode="text", max_new_tokens=MAX_NEW_TOKENS, compile=True
        )

    # Warm-up over the kinds of batch a server sees: one row, a few, and more rows than the CPU's fused linears
    # take (batch 5 with guidance: 10 rows), each twice (a second length marks the dimensions dynamic).
    for _ in range(2):
        for batch in (1, 2, 5):
            images(batch)
        for batch in (1, 2):
            texts(batch)
    graphs = counters["stats"]["unique_graphs"]
    for batch, first in ((3, 1), (8, 2), (4, 6), (10, 0)):  # other batch sizes, other prompt lengths
        images(batch, first)
    texts(3)
    assert counters["stats"]["unique_graphs"] == graphs, (
        "a warm engine compiled again (TORCH_LOGS=recompiles says why)"
    )


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_sampling_draws_from_cpu_or_cuda_generators_reproducibly(llm, requests, cuda, compile):
    options = {key: value for key, value in requests.items() if key != "prompts"}
    options.update(image_sampling=SAMPLED, max_new_tokens=MAX_NEW_TOKENS, compile=compile)
    prompts = requests["prompts"]
    for make_generator in (torch.Generator, lambda: torch.Generator(device=cuda)):
        first = llm.generate_multimodal(prompts, generator=make_generator().manual_seed(0), **options)
        again = llm.generate_multimodal(prompts, generator=make_generator().manual_seed(0), **options)
        assert torch.equal(first.sequences, again.sequences)
    per_request = [7, None, 8, 9, None, 3, 4]
    torch.manual_seed(0)
    first = llm.generate_multimodal(prompts, seed=per_request, **options)
    torch.manual_seed(0)
    again = llm.generate_multimodal(prompts, seed=per_request, **options)
    assert torch.equal(first.sequences, again.sequences)
    assert all(tuple(grids[0].shape) == (8, 8) for grids in first.image_token_ids[:4])
