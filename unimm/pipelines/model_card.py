"""The model card of a pipeline checkpoint: its components, training data, metrics and how to use it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["unimm", "multimodal", "text-to-image", "image-to-text", "diffusers", "transformers"]
NOT_RECORDED = "_Not recorded._"


def count_parameters(component: Any) -> int:
    """Parameters of a model, or of every model inside a diffusers pipeline (0 for processors)."""
    if hasattr(component, "components"):
        return sum(count_parameters(part) for part in component.components.values())
    parameters = getattr(component, "parameters", None)
    return sum(p.numel() for p in parameters()) if callable(parameters) else 0


def _human(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def component_rows(pipeline: Any) -> list[tuple[str, str, str, str]]:
    """``(folder, class, parameters, what it is)`` for each saved component of a ``UniMMPipeline``."""
    llm, vocabulary = pipeline.llm, pipeline.llm.vocabulary
    text_config = llm.config.text_config
    tokenizer_config = pipeline.visual_tokenizer.config
    rows = [
        (
            "llm/",
            type(llm).__name__,
            _human(count_parameters(llm)),
            f"{text_config.model_type} backbone, {getattr(text_config, 'num_hidden_layers', '?')} layers; "
            f"{vocabulary.text_vocab_size} text + {vocabulary.num_new_tokens} image tokens; grids up to "
            f"{vocabulary.max_grid_height}x{vocabulary.max_grid_width}",
        ),
        (
            "processor/",
            type(pipeline.processor).__name__,
            "-",
            f"{type(pipeline.processor.tokenizer).__name__} with its chat template, "
            f"{type(pipeline.processor.image_processor).__name__}; "
            f"image prompts: {pipeline.config.prompt_format}",
        ),
        (
            "visual_tokenizer/",
            type(pipeline.visual_tokenizer).__name__,
            _human(count_parameters(pipeline.visual_tokenizer)),
            f"{tokenizer_config.codebook_size} shared codes "
            f"(semantic {tokenizer_config.semantic_code_dim}-d + "
            f"pixel {tokenizer_config.pixel_code_dim}-d), {tokenizer_config.downsample_factor} px per token, "
            f"trained at {tokenizer_config.image_size} px",
        ),
    ]
    detokenizer = pipeline.detokenizer
    if detokenizer is not None:
        decoder_config = detokenizer.decoder.config
        space = "latent" if getattr(detokenizer, "vae", None) is not None else "pixel"
        rows.append(
            (
                "detokenizer/",
                f"{type(detokenizer).__name__} ({type(detokenizer.decoder).__name__} + "
                f"{type(detokenizer.scheduler).__name__})",
                _human(count_parameters(detokenizer)),
                f"diffusion in {space} space, {decoder_config.prediction_type} prediction",
            )
        )
    return rows


def build_model_card(
    pipeline: Any,
    training_data: Sequence[str] | None = None,
    metrics: Mapping[str, float | str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """A Hub model card (YAML metadata + Markdown) describing ``pipeline``."""
    card_data = ModelCardData(library_name="unimm", pipeline_tag="any-to-any", tags=CARD_TAGS)
    location = repo_id or "path/to/checkpoint"
    components = "\n".join(
        f"| `{folder}` | {name} | {size} | {what} |" for folder, name, size, what in component_rows(pipeline)
    )
    data = "\n".join(f"- {entry}" for entry in training_data) if training_data else NOT_RECORDED
    results = (
        "| metric | value |\n|---|---|\n"
        + "\n".join(f"| {name} | {value} |" for name, value in metrics.items())
        if metrics
        else NOT_RECORDED
    )
    body = f"""
# {repo_id or "UniMM checkpoint"}

A unified multimodal autoregressive model made with [unimm](https://github.com/unimm/unimm): one language
model that answers questions about images and generates images by reading and writing discrete image tokens.

## Components

Each folder loads on its own with its own library (`import unimm` registers the classes; no
`trust_remote_code`).

| folder | class | parameters | what it is |
|---|---|---|---|
{components}

## Training data

{data}

## Metrics

{results}

## Usage

```python
from unimm import UniMMPipeline

pipe = UniMMPipeline.from_pretrained("{location}")
print(pipe.chat("What is this?", images=["image.png"]).text)
images = pipe.generate_images(["a photo of a sneaker"], num_images_per_prompt=4, seed=0).images
```

```bash
unimm chat --checkpoint {location} --prompt "What is this?" --image image.png
unimm generate --checkpoint {location} --prompt "a photo of a sneaker" --num-images-per-prompt 4
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
