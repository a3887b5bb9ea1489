"""Per-modality sampling parameters and one batched sampler with per-row parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Steps of noise a :class:`RequestNoise` draws at once: a launch per request every few steps, not every step.
# A constant, never a function of the batch, so that a request draws the same numbers alone or batched.
NOISE_STEPS_PER_DRAW = 4


def uniform_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape`` on ``device``, drawn on the generator's own device and moved: a
    CPU generator then drives a CUDA model (``torch.rand`` refuses a generator of another device), and the
    numbers depend on the generator alone, as with diffusers' ``randn_tensor`` (which draws normal noise)."""
    source = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=source).to(device)


@dataclass
class ModalitySampling:
    """How the tokens of one modality (text, or image codes) are chosen.

    ``do_sample=False`` is greedy decoding; otherwise the logits are divided by ``temperature`` and
    filtered by ``top_k`` (``None``: off) and ``top_p`` (``None`` or 1.0: off) before sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self, argument: str) -> None:
        """Raise ``ValueError`` naming ``argument`` (e.g. ``"image_sampling"``) for impossible values."""
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"`{argument}.top_k` must be a positive int or None (off), got {self.top_k!r}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`{argument}.top_p` must be in (0, 1] or None (off), got {self.top_p!r}.")
        if self.do_sample and not self.temperature > 0.0:
            raise ValueError(
                f"`{argument}.temperature` must be > 0 when sampling, got {self.temperature!r}; "
                "use do_sample=False for greedy decoding."
            )


# A checkpoint's own image sampling: fields of its generation config (``generation_config.json``), as
# ``temperature``/``top_k``/``top_p`` are for text in transformers; each maps to the ModalitySampling field.
IMAGE_SAMPLING_FIELDS = {"image_temperature": "temperature", "image_top_k": "top_k", "image_top_p": "top_p"}


def default_image_sampling(generation_config: Any) -> ModalitySampling:
    """Image codes' sampling when a call names none: temperature 1 and no filter, or what the checkpoint's
    generation config sets (``image_temperature``, ``image_top_k``, ``image_top_p``; ``unimm assemble
    --image-temperature`` writes them)."""
    values = {
        name: getattr(generation_config, key)
        for key, name in IMAGE_SAMPLING_FIELDS.items()
        if getattr(generation_config, key, None) is not None
    }
    sampling = ModalitySampling(do_sample=True, **values)
    sampling.validate("generation_config (image_temperature, image_top_k, image_top_p)")
    return sampling


def set_image_sampling(generation_config: Any, sampling: ModalitySampling) -> None:
    """Make ``sampling`` (with ``do_sample=True``) the default of a generation config: the inverse of
    :func:`default_image_sampling`; fields at their plain default are removed."""
    if not sampling.do_sample:
        raise ValueError(
            "a checkpoint's image sampling samples (do_sample=True): greedy codes repeat one image"
        )
    sampling.validate("image_sampling")
    # A config made from the model config drops unknown fields when it is read back: this one is edited now.
    generation_config._from_model_config = False
    plain = ModalitySampling(do_sample=True)
    for key, name in IMAGE_SAMPLING_FIELDS.items():
        value = getattr(sampling, name)
        if value == getattr(plain, name):
            if hasattr(generation_config, key):
                delattr(generation_config, key)
        else:
            setattr(generation_config, key, value)


def describe_sampling(values: dict[str, Any]) -> str:
    """``", image codes sampled at temperature 0.7, top-k 64"`` for a report, from ModalitySampling's fields as a
    dict; empty for the plain default (temperature 1, no filter) and for no record."""
    parts = []
    if values.get("temperature", 1.0) != 1.0:
        parts.append(f"temperature {values['temperature']:g}")
    if values.get("top_k") is not None:
        parts.append(f"top-k {values['top_k']}")
    if values.get("top_p") is not None:
        parts.append(f"top-p {values['top_p']:g}")
    return f", image codes sampled at {', '.join(parts)}" if parts else ""


class RowSampler:
    """Samples one token per row, each row with the parameters of its current modality.

    The parameters of the two modalities are stacked once into ``(2,)`` tensors; each step gathers them
    by a per-row modality index, so a mixed batch costs the same tensor ops as a uniform one."""

    def __init__(self, text: ModalitySampling, image: ModalitySampling, device: torch.device):
        modes = (text, image)
        temperature = [m.temperature if m.do_sample else 1.0 for m in modes]
        top_k = [(m.top_k or 0) if m.do_sample else 0 for m in modes]
        top_p = [(m.top_p or 1.0) if m.do_sample else 1.0 for m in modes]
        self.do_sample = torch.tensor([m.do_sample for m in modes], device=device)
        self.temperature = torch.tensor(temperature, dtype=torch.float32, device=device)
        self.top_k = torch.tensor(top_k, device=device)
        self.top_p = torch.tensor(top_p, dtype=torch.float32, device=device)
        self.any_sample = any(m.do_sample for m in modes)
        self.always_sample = all(m.do_sample for m in modes)
        # From the python values: reading the tensors back would be a host sync per call on an accelerator.
        self.max_top_k = max(top_k)
        self.any_top_p = any(p < 1.0 for p in top_p)

    def __call__(
        self,
        logits: torch.Tensor,
        is_image: torch.Tensor,
        generator: torch.Generator | None = None,
        uniform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``logits`` ``(R, V)`` (already masked) and ``is_image`` ``(R,)`` bool -> next tokens ``(R,)``.

        The sampling noise is ``uniform`` ``(R, V)`` (numbers in [0, 1), e.g. from :class:`RequestNoise`)
        when given, else drawn from ``generator`` (of any device). Scores are float32 whatever the logits'
        dtype: bfloat16 probabilities and their cumulative sum round by up to 0.004 near 1, which moves the
        top-p boundary."""
        if not self.any_sample:
            return logits.argmax(dim=-1)
        greedy = None if self.always_sample else logits.argmax(dim=-1)
        modality = is_image.long()
        do_sample = self.do_sample[modality]
        scores = logits.float() / self.temperature[modality].unsqueeze(-1)
        if self.max_top_k:
            k = self.top_k[modality].clamp(max=scores.shape[-1])  # (R,), 0 = off
            top_values = scores.topk(min(self.max_top_k, scores.shape[-1]), dim=-1).values  # (R, k_max)
            kth = top_values.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))  # (R, 1)
            scores = scores.masked_fill((k > 0).unsqueeze(-1) & (scores < kth), float("-inf"))
        if self.any_top_p:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # Drop a token once the mass before it already reaches top_p (the top token always stays).
            drop = (probs.cumsum(dim=-1) - probs) >= self.top_p[modality].unsqueeze(-1)
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)
        probs = scores.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E = -log(U) ~ Exp(1) draws from p like torch.multinomial, in
        # a few elementwise passes instead of a per-row cumulative search (about 4x faster on CPU).
        if uniform is None:
            uniform = uniform_noise(probs.shape, generator, probs.device)
        noise = uniform.log().neg_()
        sampled = (probs / noise).argmax(dim=-1)
        return sampled if self.always_sample else torch.where(do_sample, sampled, greedy)


class RequestNoise:
    """Sampling noise where each request's rows draw from that request's own generator.

    Every step, every request takes ``(rows, vocab_size)`` numbers, over the whole vocabulary whatever
    slice of it the batch computes logits for, and the slice is then cut out of them: a row's noise
    depends on its request's generator and the step only, never on the other requests of the batch.
    The numbers are drawn :data:`NOISE_STEPS_PER_DRAW` steps at a time, ``(steps, rows, vocab_size)`` per
    generator (on the CPU the very numbers of one draw per step). A ``None`` generator draws from torch's
    default generator of the device; all such requests share one draw, since their numbers depend on the
    batch anyway."""

    def __init__(
        self,
        generators: list[torch.Generator | None],
        rows_per_request: list[int],
        vocab_size: int,
        device: torch.device,
    ):
        self.draws = list(zip(generators, rows_per_request))
        self.vocab_size = vocab_size
        self.device = device
        self.drawn: torch.Tensor | None = None  # (NOISE_STEPS_PER_DRAW, R, vocab_size)
        self.used = NOISE_STEPS_PER_DRAW

    def __call__(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Uniform noise ``(R, end - start)`` for the columns ``[start, end)`` of this step's logits."""
        if self.used == NOISE_STEPS_PER_DRAW:
            self.drawn, self.used = self._draw(), 0
        self.used += 1
        return self.drawn[self.used - 1, :, start:end]

    def _draw(self) -> torch.Tensor:
        """The next steps' noise of every row, ``(NOISE_STEPS_PER_DRAW, R, vocab_size)``, request-major."""
        steps, vocab_size, device = NOISE_STEPS_PER_DRAW, self.vocab_size, self.device
        unseeded = [rows for generator, rows in self.draws if generator is None]
        shared = uniform_noise((steps, sum(unseeded), vocab_size), None, device) if unseeded else None
        shared_parts = iter(shared.split(unseeded, dim=1) if unseeded else ())
        # A tensor of its own per seeded request (not a slice of a shared buffer): the same alone or batched.
        parts = [
            next(shared_parts)
            if generator is None
            else uniform_noise((steps, rows, vocab_size), generator, device)
            for generator, rows in self.draws
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class StepNoise:
    """Each decode step's uniform sampling noise, drawn outside the (compiled) step: ``(N, end - offset)``
    for the head's columns ``[offset, end)``, from one ``generator`` for the batch (``None``: torch's
    default) or from ``request_noise``; ``None`` when the sampler never samples (greedy decoding)."""

    def __init__(
        self,
        sampler: RowSampler,
        rows: int,
        end: int,
        generator: torch.Generator | None,
        request_noise: RequestNoise | None,
        device: torch.device,
    ):
        self.sample = sampler.any_sample
        self.rows, self.end, self.device = rows, end, device
        self.generator, self.request_noise = generator, request_noise

    def __call__(self, offset: int) -> torch.Tensor | None:
        if not self.sample:
            return None
        if self.request_noise is not None:
            return self.request_noise(offset, self.end)
        return uniform_noise((self.rows, self.end - offset), self.generator, self.device)

    def skip(self, steps: int) -> None:
        """Steps whose tokens are all forced take no noise from the batch's generator, but each request's own
        stream advances on them too, as it does in any other batch."""
        if self.request_noise is not None and self.sample:
            for _ in range(steps):
                self.request_noise()
