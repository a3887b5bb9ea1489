from dataclasses import asdict

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from unimm.llm import ModalitySampling
from unimm.llm import generation as generation_module
from unimm.llm.constraints import DONE, IMAGE, ConstraintState, build_mask_table
from unimm.llm.sampling import RowSampler, default_image_sampling, describe_sampling, set_image_sampling

GREEDY = ModalitySampling()
SAMPLED = ModalitySampling(do_sample=True, temperature=1.0)


def boost_token(model, token_id: int, at_calls: set[int] | None = None, amount: float = 1e4):
    """Make the model strongly prefer ``token_id`` (on the given logits calls, or always)."""
    original = model.compute_logits
    calls = {"n": 0}

    def compute_logits(hidden_states, start=0, end=None):
        logits = original(hidden_states, start, end)
        if (at_calls is None or calls["n"] in at_calls) and start <= token_id:
            logits[..., token_id - start] += amount
        calls["n"] += 1
        return logits

    model.compute_logits = compute_logits


def check_images(vocabulary, ids: list[int]) -> list[torch.Tensor]:
    """Every image token lies in a well-formed image (token_ids_to_image validates rows and <|eol|>)."""
    texts, images = vocabulary.split_images(ids)
    spans = sum(1 for t in ids if t == vocabulary.boi_token_id)
    assert spans == len(images), f"unfinished or malformed image in {ids}"
    assert all(t < vocabulary.text_vocab_size for piece in texts for t in piece)
    return images


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_constraints_on_mixed_batch(tiny, kind):
    model = tiny.model(kind)
    vocabulary = model.vocabulary
    boost_token(model, vocabulary.boi_token_id, amount=3.0)  # interleaved rows open images now and then
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 11], [1, 12, 13], [1, 14, 15, 16]]
    modes = ["image", "text", "interleaved", "image", "interleaved"]
    grids = [(2, 3), None, None, (4, 1), (1, 2)]
    for seed in range(2):
        output = model.generate_multimodal(
            prompts, mode=modes, image_grid=grids, max_new_tokens=40, text_sampling=SAMPLED,
            image_sampling=SAMPLED, seed=seed,
        )  # fmt: skip
        for row, length in enumerate(output.sequence_lengths.tolist()):
            ids = output.sequences[row, :length].tolist()
            images = check_images(vocabulary, ids)
            assert [image.shape for image in images] == [image.shape for image in output.image_token_ids[row]]
            if modes[row] == "image":
                assert len(images) == 1 and tuple(images[0].shape) == grids[row]
                assert ids == vocabulary.image_to_token_ids(images[0]).tolist()
            elif modes[row] == "text":
                assert max(ids) < vocabulary.text_vocab_size
            elif grids[row] is not None:
                assert all(tuple(image.shape) == grids[row] for image in images)
        assert output.image_token_ids[2] or output.image_token_ids[4], "boosted <|boi|> never opened an image"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_mixed_batch_equals_each_prompt_alone(tiny, kind):
    model = tiny.model(kind)
    requests = [
        dict(prompt=[1, 5, 6], mode="image", grid=(2, 3), scale=1.0, uncond=None),
        dict(prompt=[1, 7, 8, 9, 10, 11, 12], mode="text", grid=None, scale=1.0, uncond=None),
        dict(prompt=[1, 11], mode="interleaved", grid=(2, 2), scale=1.0, uncond=None),
        dict(prompt=[1, 12, 13, 14], mode="image", grid=(3, 2), scale=4.0, uncond=[1, 4]),
    ]
    kwargs = dict(max_new_tokens=12, text_sampling=GREEDY, image_sampling=GREEDY, eos_token_id=[])
    batched = model.generate_multimodal(
        [r["prompt"] for r in requests], mode=[r["mode"] for r in requests],
        image_grid=[r["grid"] for r in requests], guidance_scale=[r["scale"] for r in requests],
        unconditional_input_ids=[r["uncond"] for r in requests], **kwargs,
    )  # fmt: skip
    for row, r in enumerate(requests):
        alone = model.generate_multimodal(
            [r["prompt"]], mode=r["mode"], image_grid=r["grid"], guidance_scale=r["scale"],
            unconditional_input_ids=[r["uncond"]], **kwargs,
        )  # fmt: skip
        length = int(alone.sequence_lengths[0])
        assert int(batched.sequence_lengths[row]) == length
        assert batched.sequences[row, :length].tolist() == alone.sequences[0, :length].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cache_implementations_agree(tiny, kind):
    model = tiny.model(kind)
    kwargs = dict(
        mode=["image", "text", "interleaved", "image"], image_grid=[(2, 3), None, (2, 2), (3, 2)],
        guidance_scale=[1.0, 1.0, 1.0, 4.0], unconditional_input_ids=[None, None, None, [1, 4]],
        max_new_tokens=12, image_sampling=GREEDY, eos_token_id=[],
    )  # fmt: skip
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1, 11], [1, 12, 13, 14]]
    outputs = [
        model.generate_multimodal(prompts, cache_implementation=implementation, **kwargs)
        for implementation in ("preallocated", "dynamic", "static")
    ]
    for other in outputs[1:]:
        assert torch.equal(outputs[0].sequences, other.sequences)
        assert torch.equal(outputs[0].sequence_lengths, other.sequence_lengths)


@pytest.mark.integration
@pytest.mark.parametrize("implementation", ["preallocated", "static"])
def test_compiled_decode_step_equals_eager(tiny, implementation):
    """torch.compile of the decode step (dynamic shapes: batch and length change between calls without a new
    graph) writes the eager tokens, greedy on a mixed guided batch and sampled with a seed."""
    model = tiny.model()
    kwargs = dict(
        mode=["image", "text", "interleaved", "image"], image_grid=[(2, 3), None, (2, 2), (3, 2)],
        guidance_scale=[1.0, 1.0, 1.0, 4.0], unconditional_input_ids=[None, None, None, [1, 4]],
        max_new_tokens=12, image_sampling=GREEDY, eos_token_id=[], cache_implementation=implementation,
    )  # fmt: skip
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1, 11], [1, 12, 13, 14]]
    eager = model.generate_multimodal(prompts, **kwargs)
    compiled = model.generate_multimodal(prompts, compile=True, **kwargs)
    assert torch.equal(eager.sequences, compiled.sequences)
    sampled = dict(mode="image", image_grid=(2, 2), guidance_scale=3.0, unconditional_input_ids=[[1]] * 2)
    sampled.update(image_sampling=SAMPLED, seed=[3, 4], cache_implementation=implementation)
    eager = model.generate_multimodal([[1, 5], [1, 6, 7]], **sampled)
    compiled = model.generate_multimodal([[1, 5], [1, 6, 7]], compile=True, **sampled)
    assert torch.equal(eager.sequences, compiled.sequences)
    if implementation == "static":
        return  # the rest exercises the step's paths, not the cache: each compile costs a minute on 2 cores
    # A 4x4 grid runs each kind of step (one code; a code with its <|eol|>) more than twice: the later ones
    # take the steady-state path that skips dynamo's guards, and still write the eager tokens. Three images per
    # prompt make 12 rows, above the fused reductions' limit: oneDNN on packed weights.
    sampled.update(image_grid=(4, 4), seed=5, num_images_per_prompt=3)
    eager = model.generate_multimodal([[1, 5], [1, 6, 7]], **sampled)
    compiled = model.generate_multimodal([[1, 5], [1, 6, 7]], compile=True, **sampled)
    assert torch.equal(eager.sequences, compiled.sequences)
    # One row has no padding: its one-token steps run without an attention mask.
    single = dict(mode="interleaved", image_grid=(2, 2), max_new_tokens=12, image_sampling=GREEDY,
                  eos_token_id=[], cache_implementation=implementation)  # fmt: skip
    eager = model.generate_multimodal([[1, 5, 6]], **single)
    assert torch.equal(
        eager.sequences, model.generate_multimodal([[1, 5, 6]], compile=True, **single).sequences
    )


@pytest.mark.integration
def test_decode_step_compiled_with_graph_breaks_equals_eager(tiny, monkeypatch):
    """The compile mode of flash attention (graph breaks allowed, no CPU kernels), run here with SDPA."""
    monkeypatch.setattr(generation_module, "_compiles_fullgraph", lambda attn_implementation: False)
    model = tiny.model()
    kwargs = dict(
        mode=["image", "interleaved"], image_grid=(2, 2), guidance_scale=[3.0, 1.0],
        unconditional_input_ids=[[1], None], max_new_tokens=10, image_sampling=GREEDY, eos_token_id=[],
    )  # fmt: skip
    eager = model.generate_multimodal([[1, 5, 6], [1, 7]], **kwargs)
    compiled = model.generate_multimodal([[1, 5, 6], [1, 7]], compile=True, **kwargs)
    assert torch.equal(eager.sequences, compiled.sequences)
    assert list(model._compiled_steps) == [False]


def test_eager_attention_matches_sdpa(tiny):
    """The decode loop hands SDPA a 4-D mask and other implementations the 2-D one; same tokens."""
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 12, 13, 14]]
    kwargs = dict(
        mode=["image", "text", "image"], image_grid=(2, 2), guidance_scale=[1.0, 1.0, 3.0],
        unconditional_input_ids=[None, None, [1]], max_new_tokens=8, image_sampling=GREEDY, eos_token_id=[],
    )  # fmt: skip
    sdpa = tiny.model().generate_multimodal(prompts, **kwargs)
    eager = tiny.model(attn_implementation="eager")
    assert eager.config.text_config._attn_implementation == "eager"
    assert torch.equal(eager.generate_multimodal(prompts, **kwargs).sequences, sdpa.sequences)


def reference_guided_image(model, prompt, unconditional, grid, scale):
    """Naive classifier-free guidance without cache: two full forwards per code."""
    vocabulary = model.vocabulary
    height, width = grid
    head = [vocabulary.boi_token_id, vocabulary.height_token_id(height), vocabulary.width_token_id(width)]
    conditional, uncond = prompt + head, unconditional + head
    for _ in range(height):
        for _ in range(width):
            c = model(torch.tensor([conditional])).logits[0, -1]
            u = model(torch.tensor([uncond])).logits[0, -1]
            guided = u + scale * (c - u)
            code = int(guided[vocabulary.code_token_offset :].argmax()) + vocabulary.code_token_offset
            conditional.append(code)
            uncond.append(code)
        conditional.append(vocabulary.eol_token_id)
        uncond.append(vocabulary.eol_token_id)
    return conditional[len(prompt) :] + [vocabulary.eoi_token_id]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guidance_follows_formula_against_naive_reference(tiny, scale):
    model = tiny.model()
    prompt, unconditional = [1, 5, 6, 7], [1, 4]
    output = model.generate_multimodal(
        [prompt], mode="image", image_grid=(2, 3), guidance_scale=scale, unconditional_input_ids=[unconditional],
        image_sampling=GREEDY,
    )  # fmt: skip
    expected = reference_guided_image(model, prompt, unconditional, (2, 3), scale)
    assert output.sequences[0].tolist() == expected


def test_guidance_one_equals_unguided_and_guidance_changes_output(tiny):
    model = tiny.model()
    kwargs = dict(mode="image", image_grid=(3, 3), image_sampling=SAMPLED, seed=7)
    unguided = model.generate_multimodal([[1, 5, 6]], **kwargs)
    guided_one = model.generate_multimodal(
        [[1, 5, 6]], guidance_scale=1.0, unconditional_input_ids=[[1]], **kwargs
    )
    assert torch.equal(unguided.sequences, guided_one.sequences)
    # Greedy, so the (near-uniform) random model's small logit differences, amplified, change the argmax.
    kwargs["image_sampling"] = GREEDY
    unguided = model.generate_multimodal([[1, 5, 6]], **kwargs)
    guided = model.generate_multimodal(
        [[1, 5, 6]], guidance_scale=5.0, unconditional_input_ids=[[1]], **kwargs
    )
    assert not torch.equal(unguided.sequences, guided.sequences)


def test_unconditional_rows_do_not_see_generated_text(tiny):
    """Interleaved: text written before an image is dropped from the unconditional context, so the image
    equals the one image mode draws from (prompt + that text) with the same unconditional prompt."""
    model = tiny.model()
    vocabulary = model.vocabulary
    boost_token(model, vocabulary.boi_token_id, at_calls={2})  # open an image after two text tokens
    prompt, unconditional = [1, 5, 6], [1, 4]
    kwargs = dict(guidance_scale=3.0, unconditional_input_ids=[unconditional], image_grid=(2, 2),
                  image_sampling=GREEDY, eos_token_id=[])  # fmt: skip
    interleaved = model.generate_multimodal([prompt], mode="interleaved", max_new_tokens=16, **kwargs)
    ids = interleaved.sequences[0].tolist()
    assert ids[2] == vocabulary.boi_token_id and max(ids[:2]) < vocabulary.text_vocab_size
    image_length = vocabulary.image_sequence_length(2, 2)
    alone = model.generate_multimodal([prompt + ids[:2]], mode="image", **kwargs)
    assert alone.sequences[0].tolist() == ids[2 : 2 + image_length]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_text_mode_matches_plain_generate_with_image_tokens_suppressed(tiny, kind):
    model = tiny.model(kind)
    vocabulary = model.vocabulary
    prompt = torch.tensor([[1, 5, 6, 7]])
    ours = model.generate_multimodal(prompt, mode="text", max_new_tokens=10, eos_token_id=[])
    reference = model.language_model.generate(
        prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False,
        suppress_tokens=list(range(vocabulary.text_vocab_size, vocabulary.vocab_size)),
    )  # fmt: skip
    assert ours.sequences[0].tolist() == reference[0, prompt.shape[1] :].tolist()


def test_text_rows_stop_at_eos_and_pad(tiny):
    model = tiny.model()
    boost_token(model, 30, at_calls={0, 1, 2, 4, 5})
    boost_token(model, 2, at_calls={3})  # eos as the 4th token
    output = model.generate_multimodal([[1, 5], [1, 6]], mode="text", max_new_tokens=8, eos_token_id=2)
    assert output.sequence_lengths.tolist() == [4, 4]
    assert output.sequences.tolist() == [[30, 30, 30, 2]] * 2


def test_sampling_is_seeded_and_num_images_per_prompt_expands(tiny):
    model = tiny.model()
    kwargs = dict(mode="image", image_grid=(2, 2), image_sampling=SAMPLED, num_images_per_prompt=3)
    first = model.generate_multimodal([[1, 5], [1, 6, 7]], seed=3, **kwargs)
    second = model.generate_multimodal([[1, 5], [1, 6, 7]], seed=3, **kwargs)
    assert first.sequences.shape[0] == 6 and len(first.image_token_ids) == 6
    assert torch.equal(first.sequences, second.sequences)
    assert len({tuple(first.sequences[row].tolist()) for row in range(3)}) > 1


def test_image_sampling_defaults_to_the_checkpoints_own(tiny, tmp_path):
    """A call that names no image sampling samples as the generation config says (``image_temperature``,
    ``image_top_k``, ``image_top_p``), which round-trips with ``save_pretrained``; a named one wins."""
    model = tiny.model()
    kwargs = dict(mode="image", image_grid=(3, 3), num_images_per_prompt=4, seed=5)
    plain = model.generate_multimodal([[1, 5]], **kwargs).sequences
    assert torch.equal(plain, model.generate_multimodal([[1, 5]], image_sampling=SAMPLED, **kwargs).sequences)
    own = ModalitySampling(do_sample=True, temperature=0.5, top_k=3)
    set_image_sampling(model.generation_config, own)
    assert model.generation_config.to_diff_dict() | {"image_temperature": 0.5, "image_top_k": 3} == (
        model.generation_config.to_diff_dict()
    )
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert default_image_sampling(loaded.generation_config) == own
    assert describe_sampling(asdict(own)) == ", image codes sampled at temperature 0.5, top-k 3"
    assert describe_sampling(asdict(SAMPLED)) == describe_sampling({}) == ""
    defaulted = loaded.generate_multimodal([[1, 5]], **kwargs).sequences
    assert torch.equal(defaulted, model.generate_multimodal([[1, 5]], image_sampling=own, **kwargs).sequences)
    assert not torch.equal(defaulted, plain)
    assert torch.equal(
        plain, loaded.generate_multimodal([[1, 5]], image_sampling=SAMPLED, **kwargs).sequences
    )
    # Back to the plain default: the fields leave the config; impossible values are refused.
    set_image_sampling(loaded.generation_config, ModalitySampling(do_sample=True))
    assert not hasattr(loaded.generation_config, "image_temperature")
    assert default_image_sampling(loaded.generation_config) == SAMPLED
    loaded.generation_config.image_top_p = 1.5
    with pytest.raises(ValueError, match="generation_config.*top_p"):
        loaded.generate_multimodal([[1, 5]], **kwargs)
    with pytest.raises(ValueError, match="do_sample=True"):
        set_image_sampling(loaded.generation_config, GREEDY)


def test_row_sampler_per_modality_parameters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]] * 4)
    is_image = torch.tensor([False, False, True, True])
    sampler = RowSampler(GREEDY, ModalitySampling(do_sample=True, top_k=2), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        tokens = sampler(logits, is_image, generator)
        assert tokens[:2].tolist() == [1, 1]  # text rows are greedy
        seen.update(tokens[2:].tolist())
    assert seen == {1, 2}  # image rows sample from the top 2 only
    nucleus = RowSampler(ModalitySampling(do_sample=True, top_p=0.5), GREEDY, torch.device("cpu"))
    assert all(nucleus(logits, is_image, generator)[:2].tolist() == [1, 1] for _ in range(20))


def test_row_sampler_draws_from_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(64, 4)
    sampler = RowSampler(SAMPLED, SAMPLED, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    counts = sum(torch.bincount(sampler(logits, torch.zeros(64, dtype=torch.bool), generator), minlength=4)
                 for _ in range(200))  # fmt: skip
    frequencies = counts / counts.sum()
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.01, rtol=0)


class Collector(BaseStreamer):
    def __init__(self):
        self.values, self.ended = [], False

    def put(self, value):
        self.values.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_text_tokens_only(tiny):
    model = tiny.model()
    boost_token(model, model.vocabulary.boi_token_id, at_calls={1})
    streamer = Collector()
    output = model.generate_multimodal(
        [[1, 5, 6]],
        mode="interleaved",
        image_grid=(1, 2),
        max_new_tokens=12,
        streamer=streamer,
        eos_token_id=[],
    )
    ids = output.sequences[0].tolist()
    assert streamer.values[0] == [1, 5, 6] and streamer.ended
    streamed = [token for value in streamer.values[1:] for token in value]
    assert streamed == [t for t in ids if t < model.vocabulary.text_vocab_size]
    assert len(streamed) == len(ids) - model.vocabulary.image_sequence_length(1, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=[[1, 5, 90]]), r"input_ids\[0\].*not inside an image"),
        (dict(input_ids=[[1, 64, 67, 71, 90, 65]]), r"input_ids\[0\].*malformed image"),
        (dict(input_ids=[[1, 5], []]), r"input_ids\[1\]. is empty"),
        (dict(input_ids=[[1] * 250], max_new_tokens=10), r"input_ids\[0\].*exceeds the context"),
        (dict(guidance_scale=0.5), r"guidance_scale\[0\]"),
        (dict(guidance_scale=2.0), r"unconditional_input_ids\[0\]. is required"),
        (dict(image_sampling=ModalitySampling(do_sample=True, top_k=0)), r"image_sampling.top_k"),
        (dict(text_sampling=ModalitySampling(do_sample=True, top_p=0.0)), r"text_sampling.top_p"),
        (dict(mode="video"), r"mode\[0\]"),
        (dict(image_grid=(5, 1)), r"image_grid\[0\]"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(input_ids=[[1], [1]], streamer=Collector()), "streamer"),
        (dict(cache_implementation="paged"), "cache_implementation"),
        (dict(compile=True, cache_implementation="dynamic"), "compile=True"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(tiny, kwargs, match):
    model = tiny.model()
    arguments = dict(input_ids=[[1, 5]], mode="image")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate_multimodal(**arguments)


def test_generation_runs_in_bfloat16(tiny):
    model = tiny.model().to(torch.bfloat16)
    output = model.generate_multimodal(
        [[1, 5, 6], [1, 7]], mode=["image", "interleaved"], image_grid=(2, 2), guidance_scale=[3.0, 1.0],
        unconditional_input_ids=[[1], None], max_new_tokens=8, seed=0,
    )  # fmt: skip
    assert tuple(output.image_token_ids[0][0].shape) == (2, 2)


def test_schedule_equals_the_state_machine_step_by_step(tiny):
    """The closed-form schedule of an image-only batch (grids of every shape, one budget cut short) is what
    plan()/advance() give step by step, whatever codes are chosen."""
    vocabulary = tiny.model().vocabulary
    grids = torch.tensor([[2, 3], [4, 1], [1, 4], [3, 3]])
    budgets = torch.tensor([vocabulary.image_sequence_length(*grid) for grid in grids.tolist()])
    budgets[3] -= 4
    state = ConstraintState(
        vocabulary, image_mode=torch.ones(4, dtype=torch.bool), allow_image=torch.zeros(4, dtype=torch.bool),
        requested_grid=grids, budget=budgets, eos_token_ids=torch.tensor([2]), pad_token_id=0,
    )  # fmt: skip
    schedule = state.schedule()
    codes = torch.randint(vocabulary.code_token_offset, vocabulary.vocab_size, (int(budgets.max()), 4))
    for step in range(int(budgets.max())):
        mask_class, forced = state.plan()
        assert torch.equal(schedule.mask_class[step], mask_class)
        assert torch.equal(schedule.forced[step], forced)
        assert torch.equal(schedule.in_image[step], state.phase == IMAGE)
        assert torch.equal(schedule.unfinished[step], state.phase != DONE)
        part_of_image = state.advance(torch.where(forced >= 0, forced, codes[step]))
        assert torch.equal(schedule.part_of_image[step], part_of_image)
    assert (state.phase == DONE).all()


def test_a_row_writing_its_own_size_only_chooses_sizes_that_fit_its_budget(tiny):
    """Interleaved rows open an image once a 1x1 one fits; the largest size the mask then allows is the
    largest that still fits, so the image is always closed (never cut by the budget)."""
    vocabulary = tiny.model().vocabulary
    table = build_mask_table(vocabulary, torch.device("cpu"), torch.float32)
    largest = vocabulary.image_sequence_length(vocabulary.max_grid_height, vocabulary.max_grid_width)
    budgets = torch.tensor([5, 6, 9, 13, largest - 1, largest])
    rows = len(budgets)
    state = ConstraintState(
        vocabulary, image_mode=torch.zeros(rows, dtype=torch.bool), allow_image=torch.ones(rows, dtype=torch.bool),
        requested_grid=torch.zeros(rows, 2, dtype=torch.long), budget=budgets, eos_token_ids=torch.tensor([2]),
        pad_token_id=0,
    )  # fmt: skip
    written = [[] for _ in range(rows)]
    for _ in range(int(budgets.max())):
        mask_class, forced = state.plan()
        allowed = table[mask_class] == 0  # (rows, V)
        # Open an image where allowed, else write text; inside, take the largest allowed size and any code.
        boi = torch.full((rows,), vocabulary.boi_token_id)
        largest_allowed = (allowed * torch.arange(vocabulary.vocab_size)).argmax(-1)
        first_allowed = allowed.float().argmax(-1)
        in_text = state.phase == 0
        choice = torch.where(
            in_text, torch.where(allowed[:, vocabulary.boi_token_id], boi, first_allowed), largest_allowed
        )
        tokens = torch.where(forced >= 0, forced, choice)
        for row, token in enumerate(tokens.tolist()):
            if state.phase[row] != DONE:
                written[row].append(token)
        state.advance(tokens)
    assert written[0].count(vocabulary.boi_token_id) == 0  # 5 tokens: no 1x1 image (6 tokens) fits
    sizes = []
    for row in range(1, rows):
        tokens = written[row]
        assert tokens[0] == vocabulary.boi_token_id and vocabulary.eoi_token_id in tokens, (row, tokens)
        height = tokens[1] - vocabulary.height_token_offset + 1
        width = tokens[2] - vocabulary.width_token_offset + 1
        assert vocabulary.image_sequence_length(height, width) <= budgets[row]
        sizes.append((height, width))
    assert sizes[0] == (1, 1) and sizes[-1] == (vocabulary.max_grid_height, vocabulary.max_grid_width)
    assert sizes[-2] != sizes[-1]  # one token short of the largest image: a smaller one
