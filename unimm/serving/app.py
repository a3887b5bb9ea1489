"""The FastAPI app: an OpenAI-compatible API and a chat page over one ``UniMMPipeline``.

    POST /v1/chat/completions    messages with text and image_url parts (data URLs); stream: true -> SSE
    POST /v1/images/generations  prompt, n, size, response_format b64_json, guidance_scale, seed;
                                 stream: true (+ partial_images 0-3) -> SSE of partial images, then the images
    GET  /v1/models, /v1/models/{id}, /health, /  (the page)

Handlers parse and check requests (a bad one gets a 4xx error in the OpenAI shape), then queue a job for
the ``GenerationBatcher``, which decodes the jobs that arrive together in one engine call.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import PIL.Image
from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unimm.data import ImageTooLargeError
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.conversations import open_image_argument
from unimm.pipelines.pipeline_unimm import DEFAULT_DECODER

from .batching import GenerationBatcher, QueueFullError
from .config import ServingConfig
from .engine import ChatAnswer, ChatJob, ImageJob, ServingEngine, warm_up
from .schemas import ChatCompletionRequest, ChatMessage, ImageGenerationRequest, error_body, parameter_path

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SIZE = re.compile(r"([0-9]+)x([0-9]+)")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_END = object()  # end of a streamed answer


class APIError(Exception):
    """An error answered in the OpenAI shape with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


@dataclass
class _Served:
    """What the handlers share, kept on ``app.state.served``."""

    pipeline: UniMMPipeline
    config: ServingConfig
    batcher: GenerationBatcher
    started: int

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(
                404,
                f"The model {model!r} does not exist: this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.started, "owned_by": "unimm"}


def _served(request: Request) -> _Served:
    return request.app.state.served


Served = Annotated[_Served, Depends(_served)]
router = APIRouter()


def create_app(pipeline: UniMMPipeline, config: ServingConfig | None = None) -> FastAPI:
    """The server of ``pipeline``; ``config`` holds its limits and batching settings."""
    config = config or ServingConfig()
    decoder = config.decoder or DEFAULT_DECODER
    if decoder == "diffusion" and pipeline.detokenizer is None:
        raise ValueError("this checkpoint has no detokenizer/: serve it with decoder='pixel'")
    pipeline.set_progress_bar_config(disable=True)  # a server's log is no place for progress bars
    engine = ServingEngine(pipeline, decoder, config.num_inference_steps, config.decoder_guidance_scale)
    if pipeline.compile_decoding:  # compile now, not while the first requests wait
        seconds = warm_up(engine, config.max_batch_size, pipeline.image_grid())
        logger.info("compiled warm-up over batches up to %d rows: %.1f s", config.max_batch_size, seconds)
    batcher = GenerationBatcher(
        engine.run, config.max_batch_size, config.batch_wait_ms, config.max_queue_size
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="unimm", summary="OpenAI-compatible API of a unified multimodal model", lifespan=lifespan
    )
    app.state.served = _Served(pipeline, config, batcher, int(time.time()))
    app.add_middleware(_BodyLimit, max_bytes=config.max_request_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    _add_error_handlers(app)
    return app


# ---------------------------------------------------------------------- routes
@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/health")
async def health(served: Served) -> dict[str, Any]:
    batcher = served.batcher
    return {
        "status": "ok",
        "model": served.config.model_name,
        "queued": batcher.queued,
        "running": batcher.running,
        "batches": batcher.batches,
        "requests": batcher.jobs,
    }


@router.get("/v1/models")
async def list_models(served: Served) -> dict[str, Any]:
    return {"object": "list", "data": [served.model_card()]}


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, served: Served) -> dict[str, Any]:
    served.check_model(model_id)
    return served.model_card()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, served: Served) -> dict[str, Any] | Response:
    served.check_model(body.model)
    config = served.config
    if body.n != 1:
        raise APIError(400, f"n={body.n}: this server writes one answer per request (n=1)", "n")
    max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
    if max_tokens > config.max_new_tokens:
        message = f"max_tokens={max_tokens} is over this server's limit of {config.max_new_tokens}"
        raise APIError(400, message, "max_tokens")
    conversation = await run_in_threadpool(_conversation, body.messages, config)
    job = ChatJob(conversation, max_tokens, body.temperature or 0.0, body.top_p, body.seed)
    reply = _ChatReply(config.model_name)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await _stream(served.batcher, job, reply, include_usage)
    return reply.completion(await _outcome(_submit(served.batcher, job)))


@router.post("/v1/images/generations", response_model=None)
async def images_generations(body: ImageGenerationRequest, served: Served) -> dict[str, Any] | Response:
    served.check_model(body.model)
    config = served.config
    if body.response_format != "b64_json":
        message = "response_format 'url' is not supported (this server keeps no image files): use 'b64_json'"
        raise APIError(400, message, "response_format", "unsupported_value")
    if body.n > config.max_images_per_request:
        message = f"n={body.n} is more than this server's limit of {config.max_images_per_request}"
        raise APIError(400, message, "n")
    if len(body.prompt) > config.max_prompt_length:
        message = (
            f"the prompt has {len(body.prompt)} characters, over the limit of {config.max_prompt_length}"
        )
        raise APIError(400, message, "prompt", "string_above_max_length")
    grid = _image_grid(served.pipeline, body.size)
    job = ImageJob(body.prompt, body.n, grid, body.guidance_scale, body.seed)
    factor = served.pipeline.visual_tokenizer.config.downsample_factor
    size = f"{grid[1] * factor}x{grid[0] * factor}"
    if body.stream:
        job.partial_images = body.partial_images or 0
        reply = _ImageEvents(
            body.output_format, size, served.pipeline.llm.vocabulary.image_sequence_length(*grid)
        )
        return await _stream_images(served.batcher, job, reply)
    images = await _outcome(_submit(served.batcher, job))
    data = await run_in_threadpool(
        lambda: [{"b64_json": _encode_image(image, body.output_format)} for image in images]
    )
    return {"created": int(time.time()), "data": data, "output_format": body.output_format, "size": size}


# ---------------------------------------------------------------------- requests -> jobs
def _conversation(messages: list[ChatMessage], config: ServingConfig) -> list[dict]:
    """OpenAI messages as transformers chat messages with the images decoded; checks the limits."""
    characters = sum(
        len(message.content or "")
        if not isinstance(message.content, list)
        else sum(len(part.text) for part in message.content if part.type == "text")
        for message in messages
    )
    if characters > config.max_prompt_length:
        raise APIError(
            400,
            f"the messages hold {characters} characters, over the limit of {config.max_prompt_length}",
            "messages",
            "string_above_max_length",
        )
    conversation, images = [], 0
    for turn, message in enumerate(messages):
        content: str | list[dict] = message.content or ""
        if isinstance(message.content, list):
            content = []
            for index, part in enumerate(message.content):
                param = f"messages[{turn}].content[{index}]"
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                    continue
                images += 1
                if images > config.max_images_per_request:
                    raise APIError(
                        400, f"more than {config.max_images_per_request} images in one request", param
                    )
                content.append({"type": "image", "image": _decode_image(part.image_url.url, config, param)})
        role = "system" if message.role == "developer" else message.role
        conversation.append({"role": role, "content": content})
    return conversation


def _decode_image(url: str, config: ServingConfig, param: str) -> PIL.Image.Image:
    """A ``data:image/...;base64,...`` URL to an RGB image, within the size limits: the bytes before
    decoding the base64, the pixels (``config.max_image_pixels``) from the file's header."""
    param = f"{param}.image_url"
    header, comma, data = url.partition(",")
    if not header.startswith("data:") or not comma:
        raise APIError(
            400,
            "image_url must be a data URL (data:image/png;base64,...): the server fetches no remote images",
            param,
            "invalid_image_url",
        )
    if not header.lower().endswith(";base64"):
        raise APIError(400, "image_url: only base64 data URLs are supported", param, "invalid_image_url")
    data = "".join(data.split())
    if len(data) * 3 // 4 > config.max_image_bytes:
        raise APIError(
            400,
            f"the image is about {len(data) * 3 // 4} bytes, more than the limit of {config.max_image_bytes}",
            param,
            "image_too_large",
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        raise APIError(400, "image_url: the data is not valid base64", param, "invalid_image") from None
    try:
        return open_image_argument(raw, param, max_pixels=config.max_image_pixels).convert("RGB")
    except ImageTooLargeError as error:
        raise APIError(400, error.detail, param, "image_too_large") from None
    except (OSError, ValueError):
        raise APIError(
            400, "cannot decode the image: send a PNG, JPEG, GIF or WebP file", param, "invalid_image"
        ) from None


def _image_grid(pipeline: UniMMPipeline, size: str | None) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (or ``"auto"``/``None``: the model's default) as an ``(h, w)`` code grid."""
    if size is None or size == "auto":
        return pipeline.image_grid()
    match = SIZE.fullmatch(size.strip())
    if match is None:
        raise APIError(
            400, f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '32x32') or 'auto', got {size!r}", "size"
        )
    try:
        return pipeline.image_grid(height=int(match[2]), width=int(match[1]))
    except ValueError as error:
        raise APIError(400, f"size {size!r}: {error}", "size", "invalid_size") from None


def _encode_image(image: PIL.Image.Image, output_format: str) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=IMAGE_FORMATS[output_format])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- jobs -> responses
def _submit(batcher: GenerationBatcher, job: ChatJob | ImageJob) -> asyncio.Future:
    try:
        return batcher.submit(job)
    except QueueFullError as error:
        raise APIError(429, str(error), code="queue_full", type="rate_limit_error") from None


async def _outcome(future: asyncio.Future) -> Any:
    """The job's result; a request the model refuses (a ``ValueError``: over the context, say) is a 400."""
    try:
        return await future
    except ValueError as error:
        raise APIError(400, str(error)) from None


class _ChatReply:
    """The OpenAI objects of one chat completion: the whole answer, or its stream of chunks."""

    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def completion(self, answer: ChatAnswer) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.text}
        return {
            **self._header("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
            "usage": self.usage(answer),
        }

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _event({**self._header("chat.completion.chunk"), "choices": [choice]})

    def usage_chunk(self, answer: ChatAnswer) -> str:
        return _event({**self._header("chat.completion.chunk"), "choices": [], "usage": self.usage(answer)})

    @staticmethod
    def usage(answer: ChatAnswer) -> dict[str, int]:
        total = answer.prompt_tokens + answer.completion_tokens
        return {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": total,
        }

    def _header(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _event(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _start_stream(
    batcher: GenerationBatcher, job: ChatJob | ImageJob, listen: Callable[[Callable[[Any], None]], None]
) -> tuple[asyncio.Queue, asyncio.Future, Any]:
    """Submit a streamed job whose worker hands its items (text pieces, previews) to the callback ``listen``
    installs on it: returns the queue of those items (``_END`` last), the job's future and the first item. A
    job that fails before its first item raises its error response here, before any event is sent."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    listen(lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
    future = _submit(batcher, job)
    # Items are queued from the worker before the job's result is set, so _END comes after them all.
    future.add_done_callback(lambda _: items.put_nowait(_END))
    try:
        first = await items.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        future.cancel()
        raise
    if first is _END and not future.cancelled() and future.exception() is not None:
        await _outcome(future)  # raises the error response
    return items, future, first


async def _stream(
    batcher: GenerationBatcher, job: ChatJob, reply: _ChatReply, include_usage: bool
) -> Response:
    """Server-sent events of the answer as it is generated. The response starts with the first piece of
    text, so a request the model refuses still gets its 4xx JSON error instead of a broken stream."""
    pieces, future, first = await _start_stream(batcher, job, lambda put: setattr(job, "on_text", put))

    async def events() -> AsyncIterator[str]:
        try:
            yield reply.chunk({"role": "assistant", "content": ""})
            piece = first
            while piece is not _END:
                yield reply.chunk({"content": piece})
                piece = await pieces.get()
            try:
                answer = future.result()
            except Exception as error:  # failed mid-stream: the status line is already sent
                logger.error("a streamed answer failed", exc_info=error)
                yield _event(error_body("the answer failed while it was generated", "server_error"))
                return
            yield reply.chunk({}, answer.finish_reason)
            if include_usage:
                yield reply.usage_chunk(answer)
            yield _event("[DONE]")
        finally:
            job.cancelled.set()  # a client that leaves mid-answer frees the engine at the next token
            future.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


class _ImageEvents:
    """The events of a streamed image generation, as OpenAI's Images API sends them
    (``openai.types.ImageGenStreamEvent``): ``image_generation.partial_image`` with ``partial_image_index``,
    then ``image_generation.completed`` with the usage. Both carry ``image_index`` (our own field, as
    ``guidance_scale`` and ``seed`` are): which of the request's ``n`` images the event is about."""

    def __init__(self, output_format: str, size: str, image_tokens: int) -> None:
        self.output_format, self.size, self.image_tokens = output_format, size, image_tokens

    def partial(self, image_index: int, partial_image_index: int, b64_json: str) -> str:
        payload = self._common("image_generation.partial_image", image_index, b64_json)
        return _named_event(payload["type"], {**payload, "partial_image_index": partial_image_index})

    def completed(self, image_index: int, b64_json: str, prompt_tokens: int) -> str:
        usage = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
            "output_tokens": self.image_tokens,
            "total_tokens": prompt_tokens + self.image_tokens,
        }
        payload = self._common("image_generation.completed", image_index, b64_json)
        return _named_event(payload["type"], {**payload, "usage": usage})

    def _common(self, kind: str, image_index: int, b64_json: str) -> dict[str, Any]:
        return {
            "type": kind,
            "b64_json": b64_json,
            "background": "opaque",  # the model draws every pixel
            "created_at": int(time.time()),
            "output_format": self.output_format,
            "quality": "auto",
            "size": self.size,
            "image_index": image_index,
        }


def _named_event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"


async def _stream_images(batcher: GenerationBatcher, job: ImageJob, reply: _ImageEvents) -> Response:
    """Server-sent events of the partial images as they are made, then of the images. As for chat, the
    response starts with the first event, so a request the model refuses still gets its 4xx JSON error."""
    previews, future, first = await _start_stream(
        batcher, job, lambda put: setattr(job, "on_preview", lambda *preview: put(preview))
    )

    async def events() -> AsyncIterator[str]:
        try:
            preview = first
            while preview is not _END:
                image_index, partial_image_index, image = preview
                data = await run_in_threadpool(_encode_image, image, reply.output_format)
                yield reply.partial(image_index, partial_image_index, data)
                preview = await previews.get()
            try:
                images = future.result()
            except Exception as error:  # failed mid-stream: the status line is already sent
                logger.error("a streamed image generation failed", exc_info=error)
                message = "the image generation failed while it ran"
                yield _named_event("error", error_body(message, "server_error"))
                return
            for image_index, image in enumerate(images):
                data = await run_in_threadpool(_encode_image, image, reply.output_format)
                yield reply.completed(image_index, data, job.prompt_tokens)
        finally:
            job.cancelled.set()  # a client that leaves frees the engine at the next preview
            future.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------------- errors in the OpenAI shape
class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413): by their Content-Length before reading them, or
    while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.message = f"the request body is over this server's limit of {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(error_body(self.message, code="request_too_large"), 413)
            return await response(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)  # FastAPI passes HTTPExceptions of body reads on
            return message

        await self.app(scope, counted, send)


def _encloses(outer: str | None, inner: str | None) -> bool:
    """Whether the parameter ``outer`` is ``inner`` or holds it (``None``: the whole body)."""
    if outer is None or outer == inner:
        return True
    return inner is not None and inner.startswith((f"{outer}.", f"{outer}["))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.type, error.param, error.code), error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        # The deepest location names the problem best (a union reports one error per member).
        first = max(problems, key=lambda problem: len(problem.get("loc", ())), default={"msg": "invalid"})
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request ({first.get('msg')})"
            return JSONResponse(error_body(message, code="invalid_json"), 400)
        param = parameter_path(first.get("loc", ()))
        message = f"{param or 'body'}: {first.get('msg')}"
        # The union members that failed on the way to ``first`` are not other problems.
        others = [
            problem
            for problem in problems
            if problem is not first and not _encloses(parameter_path(problem.get("loc", ())), param)
        ]
        if others:
            message += f" (and {len(others)} more problems)"
        return JSONResponse(error_body(message, param=param, code=first.get("type")), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        return JSONResponse(error_body(message), error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        message = "The server had an error while processing your request; its log has the details"
        return JSONResponse(error_body(message, "server_error"), 500)
