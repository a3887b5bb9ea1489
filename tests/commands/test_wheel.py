"""The package as users install it: a wheel, installed outside the source tree, runs `unimm demo` on the
demo model it carries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 600


def test_unimm_demo_runs_from_an_installed_wheel(tmp_path: Path):
    # No build isolation: the build needs nothing but this environment's setuptools (CI has no index for it).
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*build, "-w", str(tmp_path / "dist"), str(REPOSITORY)], check=True, timeout=TIMEOUT_SECONDS
    )
    (wheel,) = (tmp_path / "dist").glob("unimm-*.whl")
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, timeout=TIMEOUT_SECONDS)
    run = tmp_path / "elsewhere"
    run.mkdir()
    # The installed copy comes first on the path; the dependencies come from this environment.
    environment = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import unimm; print(unimm.__file__)"],
        cwd=run, env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip() == str(site / "unimm" / "__init__.py")
    demo = [sys.executable, "-m", "unimm.cli", "demo", "--num-images", "1", "--num-prompts", "1"]
    demo += ["--num-images-per-prompt", "1", "--decoder", "pixel", "--output-dir", "out"]
    result = subprocess.run(
        demo, cwd=run, env=environment, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "What is this?" in result.stdout
    assert (run / "out" / "demo.png").is_file()
