"""Quantized LLM weights (``unimm.pipelines.quantization``): named choices, int8 on the CPU against float32, the
save/load round trip, the pipeline with a quantized LLM, and int4 on CUDA (gpu tier)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import TorchAoConfig

import unimm
from unimm.llm import ModalitySampling, UniMMForCausalLM
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.quantization import (
    QUANTIZATION_CHOICES,
    is_quantized,
    load_quantized_llm,
    quantization_config,
    quantized_parameters,
)
from unimm.pipelines.testing import build_random_pipeline

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed (pip install 'unimm[quantization]')",
)
# int8 weights with one scale per output row move a tiny random model's logits by at most 0.6% of their largest
# value (llama and qwen2, three seeds each); a wrong scale or a transposed weight moves them by the whole range.
LOGIT_TOLERANCE = 0.02


@pytest.fixture
def saved_model(tiny, tmp_path):
    model = tiny.model("llama")
    model.save_pretrained(tmp_path / "llm")
    return model, tmp_path / "llm"


def _logits(model: UniMMForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@needs_torchao
def test_named_choices_resolve_to_torchao_configs():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    config = quantization_config("int8")
    assert isinstance(config, TorchAoConfig)
    assert isinstance(config.quant_type, Int8WeightOnlyConfig)
    assert isinstance(quantization_config("int8-dynamic").quant_type, Int8DynamicActivationInt8WeightConfig)
    assert set(QUANTIZATION_CHOICES) == {"int8", "int8-dynamic", "int4"}
    # A transformers config of the user's own passes through unchanged.
    assert quantization_config(config) is config
    with pytest.raises(ValueError, match="one of"):
        quantization_config("int3")


def test_int4_on_the_cpu_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="CUDA only.*int8"):
        quantization_config("int4", "cpu")
    with pytest.raises(ValueError, match="CUDA only"):
        load_quantized_llm(tmp_path / "not-even-there", "int4")


def test_missing_torchao_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'unimm\[quantization\]'"):
        quantization_config("int8")


@needs_torchao
@pytest.mark.parametrize("quantization", ["int8", "int8-dynamic"])
def test_int8_model_is_quantized_close_to_fp32_and_generates(saved_model, tiny, quantization):
    reference, path = saved_model
    model = load_quantized_llm(path, quantization)
    assert is_quantized(model) and not is_quantized(reference)
    # Every linear layer of the backbone, and nothing else: embeddings and the head keep their dtype.
    linears = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings()
    ]
    assert sorted(quantized_parameters(model)) == sorted(linears) and linears
    assert type(model.get_input_embeddings().weight) is torch.nn.Parameter
    assert model.dtype == torch.float32

    input_ids = torch.randint(3, tiny.text_vocab, (2, 10))
    expected, actual = _logits(reference, input_ids), _logits(model, input_ids)
    assert actual.dtype == expected.dtype
    assert (actual - expected).abs().max() <= LOGIT_TOLERANCE * expected.abs().max()

    output = model.generate_multimodal(
        [[1, 5, 6], [1, 7]],
        mode="image",
        image_grid=(2, 3),
        guidance_scale=2.0,
        unconditional_input_ids=[[1], [1]],
        image_sampling=ModalitySampling(do_sample=True),
        seed=0,
    )
    for images in output.image_token_ids:
        assert images[0].shape == (2, 3)
        assert images[0].min() >= 0 and images[0].max() < tiny.codebook


@needs_torchao
@pytest.mark.parametrize("quantization", ["int8", "int8-dynamic"])
def test_quantized_model_round_trips_through_save_pretrained(saved_model, tiny, tmp_path, quantization):
    """Decided: a quantized model saves as it is (its config records the quantization, transformers writes
    torchao's tensors to safetensors) and loads back quantized, with the same outputs."""
    _, path = saved_model
    model = load_quantized_llm(path, quantization)
    model.save_pretrained(tmp_path / "quantized")
    loaded = UniMMForCausalLM.from_pretrained(tmp_path / "quantized")
    assert is_quantized(loaded)
    assert quantized_parameters(loaded) == quantized_parameters(model)
    input_ids = torch.randint(3, tiny.text_vocab, (2, 10))
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(model, input_ids), rtol=0, atol=0)


@needs_torchao
def test_a_backbone_without_linear_layers_is_refused(tiny, tmp_path):
    tiny.model("gpt2").save_pretrained(tmp_path / "gpt2")  # Conv1D, which torchao does not quantize
    with pytest.raises(ValueError, match="no linear layer.*'gpt2'"):
        load_quantized_llm(tmp_path / "gpt2", "int8")


@needs_torchao
@pytest.mark.integration
def test_pipeline_with_a_quantized_llm_chats_and_draws(tmp_path):
    """The route ``UniMMPipeline.from_pretrained(..., quantization=...)`` takes: the quantized LLM passed as
    the pipeline's component."""
    build_random_pipeline("tiny", seed=0).save_pretrained(tmp_path)
    llm = load_quantized_llm(tmp_path / "llm", "int8")
    pipeline = UniMMPipeline.from_pretrained(tmp_path, llm=llm)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.llm is llm and quantized_parameters(pipeline.llm)
    images = pipeline.generate_images(["a red shirt", "a dog"], seed=[0, 1], decoder="pixel").images
    assert len(images) == 2
    answer = pipeline.chat("what is this ?", images=[images[0]], max_new_tokens=4)
    assert isinstance(answer.texts[0], str)


@needs_torchao
@pytest.mark.integration
@pytest.mark.parametrize("quantization", ["int8", "int8-dynamic"])
def test_compiled_engine_on_int8_weights_matches_the_eager_engine(saved_model, quantization):
    """The compiled CPU decode step swaps linears for its own kernels (fused reductions, oneDNN's packed
    copies); torchao's int8 weights are not plain tensors, so those swaps must leave them to torchao, but for
    int8 by int8 products (``int8-dynamic``), which ``torch._int_mm`` computes to torchao's values."""
    _, path = saved_model
    model = load_quantized_llm(path, quantization)
    arguments = dict(
        input_ids=[[1, 5, 6], [1, 7]],
        mode="image",
        image_grid=(2, 3),
        guidance_scale=2.0,
        unconditional_input_ids=[[1], [1]],
        seed=0,
    )
    eager = model.generate_multimodal(**arguments)
    compiled = model.generate_multimodal(**arguments, compile=True)
    for expected, actual in zip(eager.image_token_ids, compiled.image_token_ids):
        torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)


@needs_torchao
@pytest.mark.gpu
def test_int4_on_cuda_generates_close_to_bf16(device):
    """int4 weights (groups of 64, tinygemm's layout) on the demo model, whose layer sizes the groups divide."""
    path = Path(unimm.__file__).resolve().parent / "demo_checkpoint" / "llm"
    model = load_quantized_llm(path, "int4", device=device)
    reference = UniMMForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    assert model.dtype == torch.bfloat16
    assert quantized_parameters(model)
    input_ids = torch.randint(3, 3000, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    expected, actual = _logits(reference, input_ids).float(), _logits(model, input_ids).float()
    # The same int4 rounding emulated on the CPU (asymmetric, groups of 64) gives cosine similarities of 0.990
    # and 0.992 for these two rows (next-token agreement only 88%); a wrong layout or scale scrambles the logits.
    similarity = torch.nn.functional.cosine_similarity(actual.flatten(1), expected.flatten(1)).min()
    assert similarity >= 0.97, f"int4 logits have a cosine similarity of {similarity:.3f} with bf16's"
    output = model.generate_multimodal(
        [[1, 5, 6]], mode="image", guidance_scale=3.0, unconditional_input_ids=[[1]], seed=0
    )
    assert output.image_token_ids[0][0].shape == (
        model.config.default_grid_height,
        model.config.default_grid_width,
    )
