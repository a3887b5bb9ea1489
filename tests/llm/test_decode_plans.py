"""The decode loop's parts on their own: the normalised request, the two plans, the step noise."""

import pytest
import torch

from unimm.llm import ModalitySampling
from unimm.llm.decode_plans import ScheduledPlan, StateMachinePlan, constraint_state, decode_plan
from unimm.llm.generation_request import normalise_request
from unimm.llm.sampling import RequestNoise, RowSampler, StepNoise

CPU = torch.device("cpu")
SAMPLED = ModalitySampling(do_sample=True)
ARGUMENTS = dict(
    attention_mask=None, mode="text", image_grid=None, guidance_scale=1.0, unconditional_input_ids=None,
    unconditional_attention_mask=None, text_sampling=None, image_sampling=None, max_new_tokens=8,
    num_images_per_prompt=1, eos_token_id=None, pad_token_id=None, generator=None, seed=None, streamer=None,
    cache_implementation="preallocated", compile=False,
)  # fmt: skip


def request(model, input_ids, **arguments):
    """``generate_multimodal``'s arguments, normalised (its defaults where not given)."""
    return normalise_request(model, CPU, input_ids=input_ids, **(ARGUMENTS | arguments))


def test_a_request_is_normalised_to_one_value_per_request_and_expanded_to_rows(tiny):
    model = tiny.model()
    normalised = request(
        model, [[1, 5], [1, 6, 7]], mode="image", image_grid=[(2, 3), None], guidance_scale=[1.0, 3.0],
        unconditional_input_ids=[None, (1, 4)], num_images_per_prompt=[2, 2], eos_token_id=2,
    )  # fmt: skip
    assert normalised.modes == ["image", "image"]
    assert normalised.grids == [(2, 3), (model.config.default_grid_height, model.config.default_grid_width)]
    assert normalised.budgets == [model.vocabulary.image_sequence_length(*grid) for grid in normalised.grids]
    assert normalised.eos_token_ids == [2] and normalised.pad_token_id == 0
    assert normalised.rows == [0, 0, 1, 1] and normalised.guided_rows == [2, 3]
    sequences, rows = normalised.sequences()
    assert sequences == [[1, 5], [1, 5], [1, 6, 7], [1, 6, 7], [1, 4], [1, 4]]
    assert rows == [0, 1, 2, 3, 2, 3]
    guided_index, guidance = normalised.guidance(CPU)
    assert guided_index.tolist() == [2, 3] and guidance.shape == (2, 1) and guidance.dtype == torch.float32


def test_image_requests_of_known_grids_get_the_schedule_and_any_other_the_state_machine(tiny):
    model = tiny.model()
    images = request(model, [[1, 5], [1, 6]], mode="image", image_grid=[(2, 3), (1, 2)])
    assert isinstance(decode_plan(model.vocabulary, images, CPU), ScheduledPlan)
    for mode in (["image", "text"], ["interleaved", "image"]):
        mixed = request(model, [[1, 5], [1, 6]], mode=mode, image_grid=(2, 2))
        assert isinstance(decode_plan(model.vocabulary, mixed, CPU), StateMachinePlan)


def run_plan(plan, codes: torch.Tensor) -> list:
    """Drive ``plan`` as the loop does, choosing ``codes[step]`` wherever a token is free; returns the blocks'
    ``(step, end, tokens)``."""
    blocks, step = [], plan.first_step
    while True:
        constraints = plan.constraints(step)
        tokens = torch.where(constraints.forced >= 0, constraints.forced, codes[step])
        block = plan.advance(step, tokens, constraints)
        blocks.append((step, block.end, block.tokens.tolist()))
        if block.finished:
            return blocks
        step = block.end


@pytest.mark.parametrize("grids", [[(2, 3), (4, 1)], [(1, 4)], [(3, 3), (2, 2), (1, 1)]])
def test_the_schedule_writes_what_the_state_machine_writes_in_fewer_blocks(tiny, grids):
    """An image batch decoded by the schedule equals the state machine step by step: same tokens and lengths.
    The schedule's header joins the prompts, and each forced token after a free one is fed with it."""
    model = tiny.model()
    vocabulary = model.vocabulary
    normalised = request(model, [[1, 5]] * len(grids), mode="image", image_grid=grids)
    scheduled = decode_plan(vocabulary, normalised, CPU)
    state_machine = StateMachinePlan(constraint_state(vocabulary, normalised, CPU))
    shape, generator = (scheduled.max_steps, len(grids)), torch.Generator().manual_seed(0)
    codes = torch.randint(vocabulary.code_token_offset, vocabulary.vocab_size, shape, generator=generator)
    scheduled_blocks, state_blocks = run_plan(scheduled, codes), run_plan(state_machine, codes)
    assert torch.equal(scheduled.result()[0], state_machine.result()[0])
    assert torch.equal(scheduled.lengths, state_machine.lengths)
    header = [
        vocabulary.boi_token_id,
        vocabulary.height_token_id(grids[0][0]),
        vocabulary.width_token_id(grids[0][1]),
    ]
    assert scheduled.first_step == 3 and scheduled.with_header([[1, 5]], [0]) == [[1, 5, *header]]
    assert state_machine.first_step == 0 and len(state_blocks) == scheduled.max_steps
    # Every block starts at a free step; the forced steps that follow ride along.
    assert len(scheduled_blocks) < len(state_blocks)
    assert [start for start, _, _ in scheduled_blocks] == [
        step for step in range(3, scheduled.max_steps) if (scheduled.schedule.forced[step] < 0).any()
    ]
    assert all(end > start for start, end, _ in scheduled_blocks)


def test_the_state_machine_finishes_when_every_row_is_done(tiny):
    model = tiny.model()
    normalised = request(model, [[1, 5], [1, 6]], max_new_tokens=[2, 4], eos_token_id=2)
    plan = decode_plan(model.vocabulary, normalised, CPU)
    assert isinstance(plan, StateMachinePlan) and plan.text_only and plan.max_steps == 4
    steps = [torch.tensor([7, 8]), torch.tensor([9, 2]), torch.tensor([0, 3]), torch.tensor([0, 4])]
    finished = []
    for step, tokens in enumerate(steps):
        constraints = plan.constraints(step)
        tokens = torch.where(constraints.forced >= 0, constraints.forced, tokens)
        block = plan.advance(step, tokens, constraints)
        assert block.end == step + 1 and block.outside_image and block.tokens.shape == (2, 1)
        finished.append(block.finished)
    # Row 0 stops at its budget, row 1 at its end-of-sequence; done rows write the pad id.
    assert finished == [False, True, True, True]
    tokens, lengths = plan.result()
    assert lengths.tolist() == [2, 2] and tokens.tolist() == [[7, 9], [8, 2]]


def test_step_noise_is_none_when_greedy_and_each_requests_stream_when_seeded():
    greedy = StepNoise(RowSampler(ModalitySampling(), ModalitySampling(), CPU), 2, 10, None, None, CPU)
    assert greedy(0) is None
    sampled = RowSampler(ModalitySampling(do_sample=True), ModalitySampling(do_sample=True), CPU)
    batch = StepNoise(sampled, 2, 10, torch.Generator().manual_seed(0), None, CPU)
    assert torch.equal(batch(4), torch.rand((2, 6), generator=torch.Generator().manual_seed(0)))

    def request_noise() -> RequestNoise:
        return RequestNoise([torch.Generator().manual_seed(1)], [2], 10, CPU)

    skipping = StepNoise(sampled, 2, 10, None, request_noise(), CPU)
    skipping.skip(3)  # forced steps advance a request's own stream as in any other batch
    reference = request_noise()
    expected = [reference() for _ in range(4)][-1]
    assert torch.equal(skipping(0), expected)


@pytest.mark.integration
def test_compiled_full_head_steps_with_per_request_seeds_equal_eager(tiny):
    """Per-request noise is a view of a draw of several steps, at storage offset 0 on the first step of each
    draw when the step computes the whole head. Dynamo specialises that offset, so those steps are a kind of
    their own for the guard skipping: they used to fail with "Recompilation triggered with
    skip_guard_eval_unsafe stance" on the fifth text step."""
    model = tiny.model()
    kwargs = dict(
        mode=["text", "interleaved"], image_grid=(2, 2), max_new_tokens=12, text_sampling=SAMPLED,
        seed=[3, None], eos_token_id=[],
    )  # fmt: skip
    torch.manual_seed(0)
    eager = model.generate_multimodal([[1, 5, 6], [1, 7]], **kwargs)
    torch.manual_seed(0)
    compiled = model.generate_multimodal([[1, 5, 6], [1, 7]], compile=True, **kwargs)
    assert torch.equal(eager.sequences, compiled.sequences)


@pytest.mark.integration
def test_compiled_generation_runs_under_a_callers_inference_mode(tiny):
    """Inference tensors made the compiled step fail (BackendCompilerFailed: AOT autograd could not merge the
    cache's views); the loop runs outside the caller's inference mode and returns ordinary tensors."""
    model = tiny.model()
    kwargs = dict(mode="image", image_grid=(2, 2), image_sampling=SAMPLED, seed=0)
    eager = model.generate_multimodal([[1, 5, 6]], **kwargs)
    with torch.inference_mode():
        compiled = model.generate_multimodal([[1, 5, 6]], compile=True, **kwargs)
    assert torch.equal(eager.sequences, compiled.sequences) and not compiled.sequences.is_inference()
