"""Serve a checkpoint over HTTP: an OpenAI-compatible API and a chat page, batching concurrent requests.

    unimm serve                                   # the demo model on http://127.0.0.1:8000
    unimm serve outputs/my-model --port 9000 --max-batch-size 32

Open http://127.0.0.1:8000 for the chat page (chat about uploaded images, generate images), or point any
OpenAI client at http://127.0.0.1:8000/v1:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    client.images.generate(model="demo", prompt="a cat", extra_body={"guidance_scale": 3.0, "seed": 0})

Endpoints: POST /v1/chat/completions (stream: true for server-sent events), POST /v1/images/generations,
GET /v1/models, GET /health. Requests that arrive within --batch-wait-ms of each other are decoded in one
batch. The server listens on 127.0.0.1 unless --host says otherwise, and has no authentication.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import MISSING, fields
from pathlib import Path

from unimm.commands.devices import add_device_argument, add_dtype_argument
from unimm.commands.pipeline_arguments import DEFAULT_CHECKPOINT, load_pipeline, report_error
from unimm.serving.config import ServingConfig

logger = logging.getLogger(__name__)

# ServingConfig field annotations (strings under `from __future__ import annotations`) -> argparse types.
OPTION_TYPES = {"int": int, "float": float, "str": str, "str | None": str}
OPTION_CHOICES = {"decoder": ("diffusion", "pixel")}
DEFAULTS_SHOWN = {"model_name": "the checkpoint folder's name"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        nargs="?",
        default=str(DEFAULT_CHECKPOINT),
        help=f"pipeline folder or Hub repo id (default: the demo model, {DEFAULT_CHECKPOINT})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    add_dtype_argument(parser)
    add_device_argument(parser)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode through the compiled engine, built before the first request by a warm-up over batches of "
        "1, 2, 4, ... --max-batch-size rows (start-up takes longer, requests are faster); --no-compile: eager",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int8-dynamic", "int4"),
        default=None,
        help="quantize the language model's weights as they load (torchao: int8 on CPU or CUDA, int4 on CUDA; "
        "int8-dynamic also quantizes each activation row, for int8 by int8 products)",
    )
    for field in fields(ServingConfig):
        shown = DEFAULTS_SHOWN.get(field.name, field.default)
        default = "" if shown in (MISSING, None) else f" (default: {shown})"
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=OPTION_TYPES[str(field.type)],
            choices=OPTION_CHOICES.get(field.name),
            default=None,
            help=field.metadata["help"] + default,
        )


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The ``ServingConfig`` of the given options; the model is named after its folder by default."""
    given = {field.name: getattr(args, field.name) for field in fields(ServingConfig)}
    given = {name: value for name, value in given.items() if value is not None}
    given.setdefault("model_name", Path(args.checkpoint).name or "unimm")
    return ServingConfig(**given)


def main(args: argparse.Namespace) -> int:
    from unimm.serving import bind_socket, create_app, serve

    try:
        config = serving_config(args)
        sock = bind_socket(args.host, args.port)  # before the load: a taken port fails at once
    except (OSError, ValueError) as error:
        return report_error(error)
    started = time.perf_counter()
    try:
        app = create_app(load_pipeline(args), config)  # with --compile, this warms the compiled steps up
    except (OSError, ValueError) as error:
        sock.close()
        return report_error(error)
    compiled = "compiled" if args.compile else "eager (--no-compile)"
    logger.info("ready in %.1f s, %s", time.perf_counter() - started, compiled)
    serve(app, sock)
    return 0
