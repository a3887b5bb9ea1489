"""The ``--device`` and ``--dtype`` options of the commands, resolved in one place.

``--dtype auto`` is bfloat16 on a CUDA device that computes in it natively (Ampere and later) and float32
elsewhere (the CPU, older GPUs: pass ``--dtype float16`` there for speed). On CUDA, float32 matrix products
may run on TF32 tensor cores, as the transformers and diffusers examples allow."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the commands import torch only when they run: `unimm --help` stays light
    import torch

AUTO = "auto"
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = (AUTO, *DTYPES)


def add_dtype_argument(parser: argparse.ArgumentParser, default: str = AUTO) -> None:
    parser.add_argument(
        "--dtype",
        default=default,
        choices=DTYPE_CHOICES,
        help=f"weights dtype; auto: bfloat16 on a GPU that runs it natively, else float32 (default: {default})",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device`` names, CUDA when it is left out and available; CUDA gets TF32 matmuls."""
    import torch

    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # The legacy switch, not `fp32_precision`: torch raises on reading a TF32 flag set through both its old
        # and its new API, and libraries still read the old one.
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``--dtype`` names on ``device`` (``auto``: bfloat16 on a CUDA device that runs it natively)."""
    import torch

    if name != AUTO:
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32
