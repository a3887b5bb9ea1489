"""Settings of the HTTP server: request limits, batching, image decoding. Every field is a ``unimm serve``
option of the same name (``max_batch_size`` -> ``--max-batch-size``)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass
class ServingConfig:
    model_name: str = field(default="unimm", metadata={"help": "model id in the API"})
    # Limits: a request over one gets a 4xx error in the OpenAI shape.
    max_prompt_length: int = field(
        default=4000, metadata={"help": "most characters of text in one request's prompt or messages"}
    )
    max_image_bytes: int = field(default=8 * MIB, metadata={"help": "largest uploaded image, in bytes"})
    # The server's own limit, passed to unimm.data.open_image (so $UNIMM_MAX_IMAGE_PIXELS, the library's
    # default, does not apply): checked from the file's header, before any pixel is decoded.
    max_image_pixels: int = field(
        default=4096 * 4096,
        metadata={"help": "largest uploaded image, in pixels (width x height), read from its header"},
    )
    max_images_per_request: int = field(
        default=8, metadata={"help": "largest `n` of an image request, and most images in one chat request"}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "largest `max_tokens` of a chat request"})
    default_max_tokens: int = field(
        default=128, metadata={"help": "answer length when a chat request gives no `max_tokens`"}
    )
    max_queue_size: int = field(
        default=64, metadata={"help": "requests waiting for the model; more are refused with 429"}
    )
    # Batching: the first waiting request waits up to batch_wait_ms for others to join it.
    max_batch_size: int = field(
        default=16, metadata={"help": "most rows (chat answers or images) decoded in one engine call"}
    )
    batch_wait_ms: float = field(
        default=10.0, metadata={"help": "how long a batch collects requests before it starts, in ms"}
    )
    # Image decoding, the same for every request.
    decoder: str | None = field(
        default=None,
        metadata={
            "help": "'pixel' (the tokenizer's fast decoder) or 'diffusion' (the detokenizer) (default: pixel)"
        },
    )
    num_inference_steps: int = field(default=20, metadata={"help": "diffusion decoder steps"})
    decoder_guidance_scale: float = field(default=2.0, metadata={"help": "diffusion decoder guidance"})

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_length", "max_image_bytes", "max_image_pixels", "max_images_per_request",
            "max_new_tokens", "default_max_tokens", "max_queue_size", "max_batch_size", "num_inference_steps",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_tokens={self.default_max_tokens} exceeds max_new_tokens={self.max_new_tokens}"
            )
        if self.decoder not in (None, "diffusion", "pixel"):
            raise ValueError(f"decoder must be 'diffusion' or 'pixel', got {self.decoder!r}")

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: every allowed image as base64 (4/3 of its bytes) plus the text."""
        return self.max_images_per_request * self.max_image_bytes * 4 // 3 + MIB
