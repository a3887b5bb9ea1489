"""`import unimm` loads neither torch nor transformers; the Auto classes learn unimm's model types as soon as
transformers' Auto classes are imported, and everything else comes on first use. `unimm --help` imports no
command module."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
import unimm
print("bare:", ",".join(sorted(name for name in ("torch", "transformers") if name in sys.modules)))
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from unimm.llm import UniMMConfig
heavy = sorted(name for name in ("diffusers", "peft", "datasets", "deepspeed", "fastapi") if name in sys.modules)
print("heavy:", ",".join(heavy))
print("registered:", CONFIG_MAPPING["unimm"] is UniMMConfig, "unimm_dual_codebook" in CONFIG_MAPPING)
print("lazy:", unimm.UniMMPipeline.__name__, unimm.apply_lora.__name__, "diffusers" in sys.modules)
"""

# transformers' Auto classes imported before unimm: registration happens at `import unimm`.
AUTO_FIRST = """
from transformers import AutoConfig
import unimm
print(type(AutoConfig.for_model("unimm_dual_codebook")).__name__)
"""

# A unimm subpackage imported directly: it registers itself, and the hook does not import it a second time.
SUBPACKAGE_FIRST = """
from unimm.tokenizer import DualCodebookConfig
from transformers import AutoConfig
print(type(AutoConfig.for_model("unimm")).__name__, AutoConfig.for_model("unimm_dual_codebook").__class__
      is DualCodebookConfig)
"""

HELP_PROBE = """
import sys
from unimm import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print("imported:", ",".join(sorted(name for name in ("torch", "transformers", *(module for module, _ in
      cli.COMMANDS.values())) if name in sys.modules)))
"""


def _run(code: str) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def _last_line(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[-1]


def test_import_is_bare_registers_with_the_auto_classes_and_defers_the_rest():
    lines = _run(PROBE)
    assert lines["bare"] == ""  # neither torch nor transformers
    assert lines["heavy"] == ""  # no diffusion stack, peft, datasets, DeepSpeed or web framework yet
    assert lines["registered"] == "True True"
    assert lines["lazy"] == "UniMMPipeline apply_lora True"  # imported on first use


@pytest.mark.parametrize(
    ("code", "expected"),
    [(AUTO_FIRST, "DualCodebookConfig"), (SUBPACKAGE_FIRST, "UniMMConfig True")],
    ids=["auto-classes-first", "subpackage-first"],
)
def test_registration_in_any_import_order(code, expected):
    assert _last_line(code) == expected


def test_help_imports_no_command_module():
    assert _run(HELP_PROBE)["imported"] == ""
