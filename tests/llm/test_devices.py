"""The decode engine on accelerators, checked on the CPU: the device of each loop tensor, generators of
another device, the compile mode per attention backend, the mask-free SDPA step, float32 guidance and top-p.

One CPU cannot hold a model over two devices, so the device rules are checked on the ``meta`` device, which
refuses to mix with the CPU as CUDA devices refuse to mix with each other."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from accelerate import dispatch_model
from torch.overrides import TorchFunctionMode

from unimm.llm import ModalitySampling
from unimm.llm import generation as generation_module
from unimm.llm.constraints import CLASS_CODES
from unimm.llm.sampling import RequestNoise, RowSampler, uniform_noise

META = torch.device("meta")
GREEDY = ModalitySampling()
TOP = ModalitySampling(do_sample=True, temperature=0.8, top_k=8, top_p=0.9)


def step_plan(rows: int, device: torch.device) -> dict:
    """One image-code step for ``rows`` conditional rows: every row free, inside an image, codes class."""
    return dict(
        in_image=torch.ones(rows, dtype=torch.bool, device=device),
        mask_class=torch.full((rows,), CLASS_CODES, device=device),
        forced=torch.full((rows,), -1, device=device),
    )


def guided_choice(model, rows: int, scale: float, sampling: ModalitySampling):
    """The loop's token choice for ``rows`` conditional rows, each with an unconditional row, on the head's
    device (as ``generate_multimodal`` builds it)."""
    device = model._logits_device()
    guided_index = torch.arange(rows, device=device)
    guidance = torch.full((rows, 1), scale, device=device)
    return model._token_choice(GREEDY, sampling, guided_index, guidance, text_only=False, scheduled=True)


def test_a_step_chooses_tokens_on_the_heads_device(tiny):
    """device_map="auto": hidden states from the last layer's device, the head (logits) on another one. Every
    tensor the step meets is on the head's device: masks, guidance, sampler, noise, forced tokens."""
    model = tiny.model()
    model.get_output_embeddings().to(META)  # the head on a second device, the backbone on the CPU
    assert model._logits_device() == META
    choice = guided_choice(model, rows=3, scale=4.0, sampling=TOP)
    hidden = torch.randn(6, model.config.text_config.hidden_size)  # (R, D): 3 conditional, 3 unconditional
    uniform = uniform_noise((3, model.vocabulary.vocab_size), torch.Generator().manual_seed(0), META)
    tokens = model._choose_tokens(hidden, choice, 0, uniform=uniform, **step_plan(3, META))
    assert tokens.device == META and tokens.shape == (3,)


def offloaded(model, tmp_path, modules: list[str]):
    """``model`` dispatched by accelerate with ``modules`` offloaded to disk: their weights are meta tensors
    between calls, loaded onto the CPU by their hooks for each call (a device map with "cpu"/"disk" entries)."""
    names = [f"language_model.model.{name}" for name in ("embed_tokens", "rotary_emb", "norm")]
    names += [
        f"language_model.model.layers.{index}" for index in range(model.config.text_config.num_hidden_layers)
    ]
    device_map = {name: "disk" if name in modules else "cpu" for name in names + ["language_model.lm_head"]}
    return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")


def test_an_offloaded_embedding_and_layer_generate_the_same_tokens(tiny, tmp_path):
    """The loop puts the prompts where the embedding runs (its hook's device), not on its meta weights."""
    kwargs = dict(
        mode=["interleaved", "image"], image_grid=(2, 2), guidance_scale=[1.0, 3.0],
        unconditional_input_ids=[None, [1]], max_new_tokens=10, image_sampling=GREEDY, eos_token_id=[],
    )  # fmt: skip
    expected = tiny.model().generate_multimodal([[1, 5, 6], [1, 7]], **kwargs)
    model = offloaded(
        tiny.model(), tmp_path, ["language_model.model.embed_tokens", "language_model.model.layers.0"]
    )
    assert model.get_input_embeddings().weight.device == META
    assert torch.equal(model.generate_multimodal([[1, 5, 6], [1, 7]], **kwargs).sequences, expected.sequences)


def test_the_logits_device_of_an_offloaded_head_is_where_it_runs(tiny, tmp_path):
    """An offloaded head's weights are meta between calls: the loop's tensors go where its hook runs it."""
    model = offloaded(tiny.model(), tmp_path, ["language_model.lm_head"])
    assert model.get_output_embeddings().weight.device == META
    assert model._logits_device() == torch.device("cpu")


def test_an_offloaded_head_generates_the_same_tokens(tiny, tmp_path):
    """compute_logits is not ``head(...)``: without running the head's hook it multiplied by meta weights
    (uninitialised memory, no error) and wrote garbage tokens."""
    kwargs = dict(
        mode=["interleaved", "image"], image_grid=(2, 2), guidance_scale=[1.0, 3.0],
        unconditional_input_ids=[None, [1]], max_new_tokens=10, image_sampling=GREEDY, eos_token_id=[],
    )  # fmt: skip
    expected = tiny.model().generate_multimodal([[1, 5, 6], [1, 7]], **kwargs)
    model = offloaded(tiny.model(), tmp_path, ["language_model.lm_head"])
    assert torch.equal(model.generate_multimodal([[1, 5, 6], [1, 7]], **kwargs).sequences, expected.sequences)
    assert model.get_output_embeddings().weight.device == META  # offloaded again after the calls


def test_fed_tokens_go_to_the_embeddings_device():
    """The tokens chosen on the head's device are fed (with their visibility) on the embedding's."""
    block = torch.tensor([[70], [71]])  # (N, T)
    part = torch.tensor([[True], [False]])
    feed, visible = generation_module.UniMMGenerationMixin._feed_rows(block, part, torch.tensor([1]), META)
    assert feed.device == META and visible.device == META and feed.shape == visible.shape == (3, 1)


def test_noise_is_drawn_on_the_generators_device_and_moved():
    """A CPU generator with a model elsewhere: ``torch.rand(generator=cpu, device="cuda")`` raises, so the
    numbers are drawn on the generator's device (advancing it) and moved; there, they are torch.rand's."""
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    noise = uniform_noise((2, 5), generator, META)
    assert noise.device == META and noise.shape == (2, 5)
    assert not torch.equal(generator.get_state(), state)  # drawn from the CPU generator
    expected = torch.rand((2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform_noise((2, 5), torch.Generator().manual_seed(0), torch.device("cpu")), expected)


def test_sampler_draws_from_a_generator_of_another_device():
    """The sampler and the per-request noise, built on the logits' device, draw from a CPU generator."""
    sampler = RowSampler(TOP, TOP, META)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    tokens = sampler(torch.randn(3, 10, device=META), torch.ones(3, dtype=torch.bool, device=META), generator)
    assert tokens.device == META and tokens.shape == (3,)
    assert not torch.equal(generator.get_state(), state)
    noise = RequestNoise([torch.Generator().manual_seed(1), None], [2, 1], 10, META)()
    assert noise.device == META and noise.shape == (3, 10)


def test_request_noise_is_each_generators_stream_step_by_step():
    """Drawn a few steps at a time, the noise is on the CPU the numbers of one draw per request per step,
    across draws; the requests without a seed share torch's default generator, in request order."""
    steps, vocab = 9, 6  # more steps than one draw holds
    torch.manual_seed(5)
    noise = RequestNoise(
        [torch.Generator().manual_seed(1), None, None], [2, 1, 2], vocab, torch.device("cpu")
    )
    drawn = [noise() for _ in range(steps)]
    seeded = torch.Generator().manual_seed(1)
    torch.manual_seed(5)
    for step in range(steps):
        assert torch.equal(drawn[step][:2], torch.rand((2, vocab), generator=seeded))
        assert torch.equal(drawn[step][2:], torch.rand((3, vocab)))


@pytest.mark.parametrize(
    "implementation, fullgraph",
    [("sdpa", True), ("eager", True), (None, True), ("flash_attention_2", False),
     ("flash_attention_3", False), ("kernels-community/flash-attn2", False)],
)  # fmt: skip
def test_flash_attention_compiles_with_graph_breaks(tiny, monkeypatch, implementation, fullgraph):
    """Flash attention unpads padded rows with ``nonzero``/``.item()``, which ``fullgraph=True`` refuses (and
    guidance rows always carry padding): its step compiles with graph breaks; the others as one graph."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda function, **options: compiled.append(options) or function)
    model = tiny.model()
    model.config.text_config._attn_implementation = implementation  # only the name is read: nothing runs
    model._compiled_decode_and_choose()
    assert compiled == [dict(dynamic=True, fullgraph=fullgraph)]
    model._compiled_decode_and_choose()
    assert len(compiled) == 1  # built once per model and mode


class AttentionCalls(TorchFunctionMode):
    """Records ``(queries, key heads, mask given, enable_gqa)`` of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append(
                (query.shape[-2], key.shape[1], mask is not None, kwargs.get("enable_gqa", False))
            )
        return func(*args, **kwargs)


def decode_calls(model, prompts, **kwargs) -> list[tuple]:
    """The SDPA calls of a generation's decode steps (after the prefill's, one per layer)."""
    with AttentionCalls() as recorder:
        model.generate_multimodal(prompts, **kwargs)
    return recorder.calls[model.config.text_config.num_hidden_layers :]


def test_decode_steps_without_padding_pass_sdpa_no_mask(tiny):
    """No row padded: one-token steps reach SDPA without a mask, so GQA runs on the 2 key heads (no
    repeat_kv copy of the cache) and CUDA may pick its flash kernel. Padded rows keep their mask."""
    model = tiny.model()  # 4 query heads, 2 key heads
    kwargs = dict(mode="text", max_new_tokens=4, eos_token_id=[])
    for prompts in ([[1, 5, 6]], [[1, 5, 6], [1, 7, 8]]):
        calls = decode_calls(model, prompts, **kwargs)
        assert calls and all(call == (1, 2, False, True) for call in calls)
    padded = decode_calls(model, [[1, 5, 6], [1, 7]], **kwargs)
    assert padded and all(has_mask for _, _, has_mask, _ in padded)
    guided = decode_calls(model, [[1, 5]], mode="image", image_grid=(2, 2), guidance_scale=2.0,
                          unconditional_input_ids=[[1, 4]])  # fmt: skip
    assert guided and all(has_mask for _, _, has_mask, _ in guided)


@pytest.mark.parametrize("cache_implementation", ["preallocated", "dynamic"])
def test_mask_free_steps_write_the_masked_tokens(tiny, monkeypatch, cache_implementation):
    """On a GQA Llama the mask-free SDPA steps give the tokens of eager attention and of the masked steps."""
    prompts = [[1, 5, 6], [1, 7, 8]]
    requests = [
        dict(mode="text", max_new_tokens=10),
        dict(mode="interleaved", max_new_tokens=14, image_grid=(2, 2)),
        dict(mode="image", image_grid=(2, 3), num_images_per_prompt=2),
    ]
    for request in requests:
        request["cache_implementation"] = cache_implementation
    sdpa, eager = tiny.model(), tiny.model(attn_implementation="eager")
    outputs = {}
    for name, model in (("sdpa", sdpa), ("eager", eager)):
        outputs[name] = [model.generate_multimodal(prompts, image_sampling=GREEDY, eos_token_id=[], **request)
                         for request in requests]  # fmt: skip
    step_mask = generation_module.UniMMGenerationMixin._step_mask

    def always_masked(attention_mask, column, width, static, four_d, padded):
        return step_mask(attention_mask, column, width, static, four_d, True)

    monkeypatch.setattr(generation_module.UniMMGenerationMixin, "_step_mask", staticmethod(always_masked))
    masked = [sdpa.generate_multimodal(prompts, image_sampling=GREEDY, eos_token_id=[], **request)
              for request in requests]  # fmt: skip
    for name, other in (("eager", outputs["eager"]), ("masked", masked)):
        for ours, theirs in zip(outputs["sdpa"], other):
            assert torch.equal(ours.sequences, theirs.sequences), name


def test_guidance_is_computed_in_float32_on_bfloat16_logits(tiny):
    """A bfloat16 model's logits are guided in float32: ``uncond + scale * (cond - uncond)`` in bfloat16
    rounds by 0.125 at logits of 16-32, times the scale. The sampler sees the float32 guidance of the upcast
    logits."""
    model = tiny.model().to(torch.bfloat16)
    choice = guided_choice(model, rows=2, scale=7.5, sampling=GREEDY)
    seen = []
    choice = dataclasses.replace(
        choice, sampler=lambda logits, *args: seen.append(logits) or logits.argmax(-1)
    )
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, model.config.text_config.hidden_size, generator=generator) * 100  # (R, D)
    with torch.no_grad():
        model._choose_tokens(hidden.bfloat16(), choice, 0, uniform=None, **step_plan(2, torch.device("cpu")))
        logits = model.compute_logits(hidden.bfloat16()).float()  # (R, V)
    assert logits.abs().max() > 16  # where bfloat16 rounds by 0.125 and more
    conditional, unconditional = logits[:2], logits[2:]
    expected = unconditional + 7.5 * (conditional - unconditional) + choice.mask_table[CLASS_CODES]
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], expected, rtol=1e-6, atol=1e-5)
    rounded = logits.bfloat16()[2:] + 7.5 * (logits.bfloat16()[:2] - logits.bfloat16()[2:])  # the old way
    assert not torch.allclose(rounded.float() + choice.mask_table[CLASS_CODES], expected, rtol=1e-3)


def test_top_p_is_computed_in_float32_on_bfloat16_logits():
    """The top-p boundary on bfloat16 logits is float32's: in bfloat16 the probabilities and their cumulative
    sum round by up to 0.004 near 1, enough to keep a token whose mass before it is just above top_p."""
    logits = torch.tensor([[0.0, -2.203125]])  # p = (0.9005, 0.0995): top_p 0.9 drops token 1, just
    uniform = torch.tensor([[0.5, 1 - 1e-6]])  # -log(U) ~ 1e-6: token 1 wins the race unless it is dropped
    sampler = RowSampler(ModalitySampling(do_sample=True, top_p=0.9), GREEDY, torch.device("cpu"))
    text = torch.zeros(1, dtype=torch.bool)
    assert sampler(logits, text, uniform=uniform).tolist() == [0]
    assert sampler(logits.bfloat16(), text, uniform=uniform).tolist() == [0]
