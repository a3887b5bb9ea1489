"""Per-request seeds, per-request budgets and image counts, and one streamer per request."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from unimm.llm import ModalitySampling
from unimm.llm.sampling import RequestNoise

SAMPLED = ModalitySampling(do_sample=True, temperature=1.0)
TOP = ModalitySampling(do_sample=True, temperature=0.8, top_k=8, top_p=0.9)
GREEDY = ModalitySampling()

# Modes image / text / interleaved, with and without guidance: every slice of the head the loop computes.
REQUESTS = [
    dict(prompt=[1, 5, 6], mode="image", grid=(2, 3), scale=1.0, uncond=None, seed=3),
    dict(prompt=[1, 7, 8, 9, 10, 11, 12], mode="text", grid=None, scale=1.0, uncond=None, seed=4),
    dict(prompt=[1, 11], mode="interleaved", grid=(2, 2), scale=1.0, uncond=None, seed=None),
    dict(prompt=[1, 12, 13, 14], mode="image", grid=(3, 2), scale=4.0, uncond=[1, 4], seed=5),
    dict(prompt=[1, 9], mode="interleaved", grid=None, scale=2.0, uncond=[1], seed=6),
]


def generate(model, requests, seeds, **kwargs):
    return model.generate_multimodal(
        [r["prompt"] for r in requests], mode=[r["mode"] for r in requests],
        image_grid=[r["grid"] for r in requests], guidance_scale=[r["scale"] for r in requests],
        unconditional_input_ids=[r["uncond"] for r in requests], seed=seeds, **kwargs,
    )  # fmt: skip


def row(output, index: int) -> list[int]:
    return output.sequences[index, : int(output.sequence_lengths[index])].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("num_images_per_prompt", [1, 2])
@pytest.mark.parametrize("sampling", [SAMPLED, TOP], ids=["plain", "top_k_top_p"])
def test_a_seeded_request_samples_the_same_tokens_in_any_batch(tiny, kind, num_images_per_prompt, sampling):
    model = tiny.model(kind)
    kwargs = dict(
        max_new_tokens=12, text_sampling=sampling, image_sampling=sampling, eos_token_id=[],
        num_images_per_prompt=num_images_per_prompt,
    )  # fmt: skip
    batched = generate(model, REQUESTS, [r["seed"] for r in REQUESTS], **kwargs)
    # A different batch: other companions, other order, and the request alone.
    reordered = generate(model, REQUESTS[::-1][:3], [r["seed"] for r in REQUESTS[::-1][:3]], **kwargs)
    for index, request in enumerate(REQUESTS):
        if request["seed"] is None:
            continue
        alone = generate(model, [request], [request["seed"]], **kwargs)
        for copy in range(num_images_per_prompt):
            expected = row(alone, copy)
            assert row(batched, index * num_images_per_prompt + copy) == expected
            if index >= 2:  # in `reordered` at position 4 - index
                assert row(reordered, (4 - index) * num_images_per_prompt + copy) == expected


def test_seed_lists_are_reproducible_and_each_seed_and_copy_differs(tiny):
    model = tiny.model()
    kwargs = dict(mode="image", image_grid=(3, 3), image_sampling=SAMPLED, num_images_per_prompt=2)
    first = model.generate_multimodal([[1, 5], [1, 5]], seed=[7, 8], **kwargs)
    again = model.generate_multimodal([[1, 5], [1, 5]], seed=(7, 8), **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    images = {tuple(first.sequences[index].tolist()) for index in range(4)}
    assert len(images) == 4  # two seeds x two copies, all different
    # Unseeded entries draw from torch's default generator: reproducible with torch.manual_seed.
    torch.manual_seed(0)
    unseeded = model.generate_multimodal([[1, 5], [1, 5]], seed=[7, None], **kwargs)
    torch.manual_seed(0)
    unseeded_again = model.generate_multimodal([[1, 5], [1, 5]], seed=[7, None], **kwargs)
    assert torch.equal(unseeded.sequences, unseeded_again.sequences)
    assert torch.equal(unseeded.sequences[:2], first.sequences[:2])


def test_request_noise_covers_the_whole_vocabulary_whatever_the_slice():
    def noise(seed: int, start: int, end: int) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        return RequestNoise(generators, [2, 1], 10, torch.device("cpu"))(start, end)

    full = noise(0, 0, 10)
    assert full.shape == (3, 10)
    assert torch.equal(noise(0, 6, 10), full[:, 6:])
    assert torch.equal(full[2], torch.rand(10, generator=torch.Generator().manual_seed(1)))


def test_per_request_budgets_and_image_counts(tiny):
    model = tiny.model()
    prompts = [[1, 5, 6], [1, 7, 8], [1, 9]]
    output = model.generate_multimodal(
        prompts, mode=["text", "image", "text"], image_grid=(2, 2), max_new_tokens=[3, 20, 9],
        num_images_per_prompt=[1, 2, 1], image_sampling=GREEDY, eos_token_id=[],
    )  # fmt: skip
    assert output.sequences.shape[0] == 4
    image_length = model.vocabulary.image_sequence_length(2, 2)
    assert output.sequence_lengths.tolist() == [3, image_length, image_length, 9]
    for index, (prompt, budget) in enumerate([(prompts[0], 3), (prompts[2], 9)]):
        alone = model.generate_multimodal([prompt], mode="text", max_new_tokens=budget, eos_token_id=[])
        assert row(output, 3 * index) == row(alone, 0)


class Recorder(BaseStreamer):
    """Appends ``(name, event)`` to a shared log: ``("put", ids)`` or ``("end", None)``."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def put(self, value):
        assert value.ndim in (1, 2) and value.shape[0] == 1  # transformers' one-row shapes
        self.log.append((self.name, "put", value.flatten().tolist()))

    def end(self):
        self.log.append((self.name, "end", None))


def test_one_streamer_per_request_gets_its_prompt_its_text_and_ends_when_its_row_is_done(tiny):
    model = tiny.model()
    vocabulary = model.vocabulary
    log: list = []
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9], [1, 10]]
    modes = ["text", "image", "interleaved", "text"]
    streamers = [Recorder("short", log), None, Recorder("mixed", log), Recorder("long", log)]
    output = model.generate_multimodal(
        prompts, mode=modes, image_grid=(1, 2), max_new_tokens=[3, 1, 16, 16], streamer=streamers,
        text_sampling=SAMPLED, seed=[1, 2, 3, 4], eos_token_id=[],
    )  # fmt: skip
    for index, streamer in enumerate(streamers):
        if streamer is None:
            continue
        events = [(kind, value) for name, kind, value in log if name == streamer.name]
        assert events[0] == ("put", prompts[index]) and events[-1] == ("end", None)
        assert [kind for kind, _ in events].count("end") == 1
        streamed = [token for kind, value in events[1:-1] for token in value]
        assert streamed == [t for t in row(output, index) if t < vocabulary.text_vocab_size]
        assert len(row(output, index)) == (3 if index == 0 else 16)
    # The short row's streamer ends at its third token, while the others still stream.
    short_end = log.index(("short", "end", None))
    assert any(name == "long" and kind == "put" for name, kind, _ in log[short_end:])


def test_a_single_streamer_still_streams_a_call_of_one_row(tiny):
    model = tiny.model()
    log: list = []
    output = model.generate_multimodal(
        [[1, 5, 6]], mode="text", max_new_tokens=5, streamer=Recorder("one", log), eos_token_id=[]
    )
    assert log == [("one", "put", [1, 5, 6])] + [("one", "put", [t]) for t in row(output, 0)] + [
        ("one", "end", None)
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=[1]), r"`seed` has 1 entries but there are 2 prompts"),
        (dict(seed=[1, "2"]), r"`seed\[1\]` must be an int or None"),
        (dict(seed=[1, 2.0]), r"`seed\[1\]`"),
        (dict(seed=[True, 2]), r"`seed\[0\]`"),
        (dict(seed="7"), r"`seed` must be an int, None or a list"),
        (dict(seed=[1, 2], generator=torch.Generator()), r"`generator` or a list of per-request `seed`s"),
        (dict(streamer=[None]), r"`streamer` has 1 entries"),
        (dict(streamer=[None, None], num_images_per_prompt=2), r"`streamer`s needs num_images_per_prompt=1"),
        (dict(streamer=BaseStreamer()), r"single `streamer` takes one row"),
        (dict(max_new_tokens=[4, 0]), r"`max_new_tokens\[1\]` must be a positive int"),
        (dict(max_new_tokens=[4, 5, 6]), r"`max_new_tokens` has 3 entries"),
        (dict(num_images_per_prompt=[1, 2.5]), r"`num_images_per_prompt\[1\]`"),
    ],
)
def test_bad_seeds_streamers_and_per_request_counts_raise_value_error(tiny, kwargs, match):
    model = tiny.model()
    with pytest.raises(ValueError, match=match):
        model.generate_multimodal([[1, 5], [1, 6]], mode="text", max_new_tokens=kwargs.pop("max_new_tokens", 4),
                                  **kwargs)  # fmt: skip
