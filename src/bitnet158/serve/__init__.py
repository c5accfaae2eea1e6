"""An OpenAI-compatible HTTP server with continuous batching.

engine.py runs the loop on its own thread: scheduler.py decides which requests run (admitting queued
ones into free cache slots between steps, handing out prompt tokens within a budget per step, retiring
finished and cancelled ones) and runner.py runs the model over them (prompt chunks and one token per
decoding request in one step, then a per-row sampling step).
app.py is the FastAPI application that turns HTTP requests into engine requests.
"""

from bitnet158.serve.app import create_app
from bitnet158.serve.engine import Engine

__all__ = ["Engine", "create_app"]
