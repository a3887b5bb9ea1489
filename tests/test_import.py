"""`import unimm` registers the Auto classes and loads nothing else heavy; the rest comes on first use."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import unimm
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from unimm.llm import UniMMConfig
heavy = sorted(name for name in ("diffusers", "peft", "datasets", "deepspeed", "fastapi") if name in sys.modules)
print("heavy:", ",".join(heavy))
print("registered:", CONFIG_MAPPING["unimm"] is UniMMConfig, "unimm_dual_codebook" in CONFIG_MAPPING)
print("lazy:", unimm.UniMMPipeline.__name__, unimm.apply_lora.__name__, "diffusers" in sys.modules)
"""


def test_import_registers_auto_classes_and_defers_the_rest():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["heavy"] == ""  # no diffusion stack, peft, datasets, DeepSpeed or web framework yet
    assert lines["registered"] == "True True"
    assert lines["lazy"] == "UniMMPipeline apply_lora True"  # imported on first use
