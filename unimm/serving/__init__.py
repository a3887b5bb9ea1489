"""``unimm serve``: an OpenAI-compatible HTTP API and a chat page over one pipeline, batching the
requests that arrive together into one engine call.

    from unimm.serving import BackgroundServer, ServingConfig, create_app

    app = create_app(UniMMPipeline.from_pretrained("checkpoints/demo"), ServingConfig(max_batch_size=16))
    with BackgroundServer(app) as server:
        ...  # OpenAI(base_url=server.url + "/v1", api_key="unused")

Names are imported on first use, so ``unimm --help`` does not load the web framework.
"""

from __future__ import annotations

from unimm.lazy import lazy_exports

_EXPORTS = {
    "create_app": "app",
    "GenerationBatcher": "batching",
    "QueueFullError": "batching",
    "ServingConfig": "config",
    "ChatAnswer": "engine",
    "ChatJob": "engine",
    "ImageJob": "engine",
    "ServingEngine": "engine",
    "BackgroundServer": "server",
    "bind_socket": "server",
    "serve": "server",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
