"""`bitnet158 serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated

import typer

from bitnet158.errors import UserError


def serve(
    model: Annotated[Path | None, typer.Option(help="Model folder (default: the embedded model).",
                                               show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health.", envvar="BITNET158_API_KEY",
        show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together (one KV-cache slot each).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; more are answered 429.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(
        min=1, show_default=False,
        help="CPU threads for the kernels (default: $BITNET158_THREADS, else every CPU this process may use but "
             "one, which the HTTP side gets).")]
    = None,
) -> None:
    """Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /metrics, a chat page at /."""
    import uvicorn  # the serve extra; imported here so the other commands work without it

    from bitnet158.cli.model_loading import embedded_model_path
    from bitnet158.serve import ModelSource, create_app

    if max_batch < 1 or max_queue < 0:
        raise UserError("--max-batch must be at least 1 and --max-queue at least 0")
    name = (model or embedded_model_path()).name
    app = create_app(ModelSource(model, device, threads), name, api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue)
    # The tokenizer and the app live as long as the process: keep them out of the garbage collector's full
    # passes, which take longer the more objects they walk (every stream waits meanwhile).
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level="info")
