"""The FastAPI application: OpenAI's completions, chat completions and models endpoints, plus /health,
/metrics (Prometheus), the OpenAPI docs at /docs and a chat page at /."""

from __future__ import annotations

import asyncio
import html
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bitnet158.cli.model_loading import load_tokenizer
from bitnet158.serve.chat_page import CHAT_PAGE
from bitnet158.serve.completions import Generator
from bitnet158.serve.engine_process import EngineProcess, ModelSource
from bitnet158.serve.errors import APIError, install_error_handlers
from bitnet158.serve.metrics import Metrics
from bitnet158.serve.middleware import GuardMiddleware
from bitnet158.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)

MAX_BODY_BYTES = 1 << 20

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
_GENERATION_RESPONSES = {
    **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}
}


def create_app(
    source: ModelSource,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
) -> FastAPI:
    """An app serving the model `source` names, under the name `model_name`. Its engine process starts (and loads
    the model) before this returns, a `UserError` if it cannot, and stops with the app."""
    tokenizer = load_tokenizer(source.path)  # first: a wrong path is an error at once, before a process starts
    metrics = Metrics()
    engine = EngineProcess(source, max_batch, max_queue, metrics)
    engine.start()
    generator = Generator(engine, tokenizer, model_name, engine.context)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.attach(asyncio.get_running_loop())
        yield
        engine.stop()

    app = FastAPI(title="bitnet158", description="OpenAI-compatible API for BitNet b1.58 models.",
                  version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=MAX_BODY_BYTES, metrics=metrics)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, http: Request):
        """Continue a prompt."""
        return await generator.completion(body, http)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        """Answer a conversation, rendered with the model's chat template."""
        return await generator.chat(body, http)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health():
        """200 while the engine process runs; 503 once it has exited (the server cannot generate)."""
        if not engine.running:
            raise APIError(503, "The model's engine has stopped.", "server_error", "engine_stopped")
        return Health()

    @app.get("/metrics", response_class=Response, responses={**_ERRORS, 200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, responses=_ERRORS)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.replace("__MODEL__", html.escape(model_name)))

    return app
