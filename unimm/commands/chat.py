"""Chat with a checkpoint, about images or not: one question, or a conversation in the terminal.

    unimm chat --prompt "What is this?" --image shirt.png     # answer once and exit
    unimm chat --image shirt.png                              # a conversation, the image with message 1

In a conversation, type a message and press Enter; `/image PATH` attaches an image to your next message,
`/reset` forgets the conversation, `/exit` (or Ctrl-D) quits. Answers are printed as they are generated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from unimm.commands.pipeline_arguments import add_pipeline_arguments, load_pipeline, report_error

logger = logging.getLogger(__name__)

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
IMAGE_COMMAND = "/image "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--prompt", default=None, help="ask this one question, print the answer and exit")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image to ask about (repeat for several); with no --prompt it goes with the first message",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="longest answer in tokens (default: 128)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of the answer; 0 is greedy (default)",
    )


def main(args: argparse.Namespace) -> int:
    from unimm.llm import ModalitySampling

    try:
        pipeline = load_pipeline(args)
    except (OSError, ValueError) as error:
        return report_error(error)
    sampling = ModalitySampling(do_sample=args.temperature > 0, temperature=args.temperature or 1.0)
    options = {"max_new_tokens": args.max_new_tokens, "text_sampling": sampling, "seed": args.seed}
    if args.prompt is not None:
        try:
            print_answer(pipeline, [user_message(args.prompt, args.image)], options)
        except (OSError, ValueError) as error:
            return report_error(error)
        return 0
    return converse(pipeline, list(args.image), options)


def user_message(text: str, images: list[str]) -> dict:
    content = [{"type": "image", "path": path} for path in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def print_answer(pipeline, messages: list[dict], options: dict) -> str:
    """Stream the answer to ``messages`` to stdout; returns it."""
    pieces = []
    for piece in pipeline.chat(messages, stream=True, **options):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces).strip()


def converse(pipeline, images: list[str], options: dict) -> int:
    """The terminal conversation: read a line, answer it with the whole conversation as context."""
    print(
        f"Chat with {pipeline.name_or_path}. {IMAGE_COMMAND.strip()} PATH attaches an image, {RESET_COMMAND} "
        f"starts over, {EXIT_COMMANDS[0]} quits."
    )
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in EXIT_COMMANDS:
            return 0
        if line == RESET_COMMAND:
            history, images = [], []
            continue
        if line.startswith(IMAGE_COMMAND):
            path = line.removeprefix(IMAGE_COMMAND).strip()
            if os.path.isfile(path):
                images.append(path)
            else:
                print(f"no image file at {path!r}; give the path of an existing image", file=sys.stderr)
            continue
        if not line:
            continue
        message = user_message(line, images)
        print("assistant> ", end="", flush=True)
        try:
            answer = print_answer(pipeline, [*history, message], options)
        except (OSError, ValueError) as error:
            print()
            print(f"error: {error}", file=sys.stderr)
            images = []
            continue
        history += [message, {"role": "assistant", "content": answer}]
        images = []
