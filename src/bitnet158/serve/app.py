"""The FastAPI application: OpenAI's completions, chat completions and models endpoints, plus /health,
/metrics (Prometheus), the OpenAPI docs at /docs and a chat page at /."""

from __future__ import annotations

import html
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bitnet158.model import BitNetForCausalLM
from bitnet158.serve.chat_page import CHAT_PAGE
from bitnet158.serve.completions import Generator
from bitnet158.serve.engine import Engine
from bitnet158.serve.errors import install_error_handlers
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
from bitnet158.serve.runner import ModelRunner
from bitnet158.serve.scheduler import Scheduler
from bitnet158.tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20
# Prompt tokens per step, so that arrivals do not stall the running requests for long. Whole prompts
# (the PyTorch path, CUDA's long ones) are prefilled between two decode steps, at least one per step: a few
# prompts' worth.
# The native CPU path cuts prompts into chunks that share a step with every decoding request: a 901-token
# prompt beside 8 streams stretches their gaps to 160 ms with 512 per step, to 64 ms with 128 (and its
# own first token comes 15% later).
MAX_PREFILL_TOKENS = 512
MAX_CHUNKED_PREFILL_TOKENS = 128

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500)}
_GENERATION_RESPONSES = {
    **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}
}


def create_app(
    model: BitNetForCausalLM,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
) -> FastAPI:
    """An app serving `model` under the name `model_name`; its engine thread runs while the app does."""
    metrics = Metrics()
    eos_ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    runner = ModelRunner(model, max_batch)
    budget = MAX_CHUNKED_PREFILL_TOKENS if runner.native else MAX_PREFILL_TOKENS
    engine = Engine(runner, Scheduler(max_batch, max_queue, budget), eos_ids, metrics)
    generator = Generator(engine, tokenizer, model_name, model.config.max_position_embeddings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
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

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health()

    @app.get("/metrics", response_class=Response, responses={**_ERRORS, 200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, responses=_ERRORS)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.replace("__MODEL__", html.escape(model_name)))

    return app
